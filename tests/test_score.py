"""`metaaligner score`: transcript splitting, reward-model scoring, exact normalisation, quarantine, staging, and the
round trip into `reformulate --format hh_rlhf_scores` (tiny models built from config on CPU, real Ray and S3)."""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metaaligner.cli import main as cli_main
from metaaligner.config import RewardModelConfig, ScoreConfig
from metaaligner.data.contract import Rejected
from metaaligner.data.formats.hh_rlhf_raw import split_batch, split_pair
from metaaligner.data.scoring.job import output_schema, run_scoring
from metaaligner.data.scoring.reward_models import RewardModel, create_tiny_reward_model, inspect_model
from metaaligner.data.scoring.zscore import ValueHistogram, zscore
from metaaligner.storage import Storage

WORDS = ("the lamp is red and blue you can ask me about jokes cats dogs weather food music help please thanks "
         "why how what would should could never always maybe funny sad kind rude safe harm").split()
HUMOUR_LIMIT = 60  # tokens; the planted long rows exceed it, ordinary rows do not


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def hh_row(rng: random.Random, long: bool = False) -> dict:
    turns = "".join(f"\n\nHuman: {sentence(rng, 4)}\n\nAssistant: {sentence(rng, 3)}" for _ in range(rng.randrange(2)))
    prompt = f"{turns}\n\nHuman: {sentence(rng, 60 if long else rng.randrange(3, 8))}?\n\nAssistant:"
    return {"chosen": f"{prompt} {sentence(rng, rng.randrange(2, 9))}",
            "rejected": f"{prompt} {sentence(rng, rng.randrange(2, 9))}"}


def hh_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [hh_row(rng) for _ in range(n)]


BAD_ROWS = {
    "no_assistant_turn": [{"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi\n\nAssistant: yo"}],
    "no_final_assistant_turn": [{"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c",
                                 "rejected": "\n\nHuman: a\n\nAssistant: d"}],
    "prompt_mismatch": [{"chosen": "\n\nHuman: one\n\nAssistant: x", "rejected": "\n\nHuman: two\n\nAssistant: x"}],
    "missing_field": [{"chosen": "\n\nHuman: a\n\nAssistant: b"}],
    "wrong_type": [{"chosen": ["x"], "rejected": "\n\nHuman: a\n\nAssistant: b"}],
    "invalid_json": ["{not json", "[1, 2]"],
}


@pytest.fixture(scope="module")
def reward_dirs(tmp_path_factory):
    """Three tiny reward models: a 1-label GPT-2, a 2-label Llama (scored by head 1, sign -1), and a GPT-2 with a
    short position limit so that planted long rows are quarantined."""
    root = tmp_path_factory.mktemp("reward-models")
    corpus = [r["chosen"] for r in hh_rows(200, seed=99)]
    return {
        "Harmlessness": create_tiny_reward_model(root / "harmless", corpus, arch="gpt2", num_labels=1, seed=1),
        "Helpfulness": create_tiny_reward_model(root / "helpful", corpus, arch="llama", num_labels=2, seed=2),
        "Humour": create_tiny_reward_model(root / "humour", corpus, arch="gpt2", num_labels=1,
                                           max_positions=HUMOUR_LIMIT, seed=3),
    }


MODEL_SETTINGS = {"Harmlessness": {"input": "text"}, "Helpfulness": {"head": 1, "sign": -1, "input": "text"},
                  "Humour": {"input": "text"}}
PLAIN = {"split": "plain", "length_of": "input", "min_tokens": 0, "dtype": "float32"}  # not the reference's defaults


def direct_rewards(folder, settings: dict, prompts: list[str], responses: list[str]) -> np.ndarray:
    """The reference way: one unpadded call per (prompt + response), logit[head] * sign."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), use_safetensors=True).eval()
    head, sign = settings.get("head", 0), settings.get("sign", 1)
    with torch.inference_mode():
        return np.array([sign * model(**tok(p + r, return_tensors="pt")).logits[0, head].item()
                         for p, r in zip(prompts, responses)])


def expected_scores(reward_dirs, rows: list[dict]) -> dict[str, np.ndarray]:
    """The reference's labels: rewards rounded with np.round(x, 1), then z over chosen+rejected with np.std."""
    prompts, chosen, rejected = zip(*(split_pair(r) for r in rows))
    out = {}
    for k, (name, folder) in enumerate(reward_dirs.items(), start=1):
        raw = np.round(direct_rewards(folder, MODEL_SETTINGS[name], list(prompts * 2), list(chosen + rejected)), 1)
        z = (raw - raw.mean()) / raw.std()
        out[f"chosen_score{k}"], out[f"rejected_score{k}"] = z[:len(rows)], z[len(rows):]
    return out


def model_flags(reward_dirs, prefix: str = "") -> list[str]:
    return [a for name, d in reward_dirs.items() for a in ("--reward-model", f"{name}={prefix or d}")]


def write_config(path, reward_dirs, **score) -> str:
    import yaml

    models = [{"name": n, "path": str(d), **MODEL_SETTINGS[n]} for n, d in reward_dirs.items()]
    path.write_text(yaml.safe_dump({"score": {"reward_models": models, **PLAIN, **score}}))
    return str(path)


def read_output(uri: str, storage) -> list[dict]:
    fs, path = storage.filesystem(uri)
    manifest = storage.read_json(f"{uri}/_SUCCESS")
    files = [f"{path}/{f['path']}" for f in manifest["files"] if not f["path"].startswith("_")]
    tables = [pq.read_table(f, filesystem=fs) for f in files]
    for t in tables:
        assert t.schema.equals(output_schema(3)), t.schema
    rows = pa.concat_tables(tables).to_pylist()
    return sorted(rows, key=lambda r: (r["prompt"], r["chosen_response"], r["rejected_response"]))


# --- units (no Ray) ---------------------------------------------------------------------------------------------

def test_split_pair_takes_the_last_assistant_turn_and_checks_the_prompt():
    prompt = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c?\n\nAssistant:"
    assert split_pair({"chosen": prompt + " yes", "rejected": prompt + " no"}) == (prompt, " yes", " no")
    assert split_pair({"chosen": prompt, "rejected": prompt + " x"}) == (prompt, "", " x")
    for reason, rows in BAD_ROWS.items():
        for row in rows:
            if isinstance(row, dict):
                with pytest.raises(Rejected) as e:
                    split_pair(row)
                assert e.value.reason == reason
    with pytest.raises(Rejected) as e:  # a lone surrogate (valid JSON, not UTF-8) never reaches Arrow
        split_pair({"chosen": "\n\nHuman: \ud800\n\nAssistant: a", "rejected": "\n\nHuman: \ud800\n\nAssistant: b"})
    assert e.value.reason == "invalid_utf8"


def test_split_batch_quarantines_each_bad_line_with_its_record():
    lines = [json.dumps(hh_row(random.Random(1)))] + [b if isinstance(b, str) else json.dumps(b)
                                                      for rows in BAD_ROWS.values() for b in rows]
    out = split_batch(pa.table({"text": lines, "path": ["f.jsonl"] * len(lines)}), json_lines=True).to_pylist()
    assert out[0]["reason"] is None and out[0]["prompt"].endswith("\n\nAssistant:") and out[0]["record"] is None
    expected = [reason for reason, rows in BAD_ROWS.items() for _ in rows]
    assert [r["reason"] for r in out[1:]] == expected
    assert all(r["record"] == line and r["detail"] and r["source"] == "f.jsonl" for r, line in zip(out[1:], lines[1:]))
    cells = pa.table({"chosen": [b"\n\nHuman: a\n\nAssistant: b", b"\xff"],
                      "rejected": [b"\n\nHuman: a\n\nAssistant: c"] * 2})
    csv_like = split_batch(cells, json_lines=False).to_pylist()  # CSV cells arrive as bytes
    assert csv_like[0]["chosen_response"] == " b" and csv_like[1]["reason"] == "invalid_utf8"


def test_histogram_statistics_are_numpy_exact_and_order_independent():
    rng = np.random.default_rng(0)
    values = np.round(rng.normal(1.7, 3.0, 5001), 1)
    merged = ValueHistogram()
    for part in np.array_split(values, 3)[::-1]:
        h = ValueHistogram()
        h.add(part)
        merged.merge(h)
    whole = ValueHistogram()
    whole.add(values)
    s = merged.stats()
    assert s == whole.stats() and s["count"] == 5001
    assert s["mean"] == pytest.approx(values.mean(), rel=1e-13) and s["std"] == pytest.approx(values.std(), rel=1e-13)
    np.testing.assert_allclose(zscore(values, s["mean"], s["std"]), (values - values.mean()) / values.std(), rtol=1e-12)
    z = zscore(values, s["mean"], s["std"])
    assert all(len(set(z[values == v])) == 1 for v in values[:50])  # equal rounded rewards tie exactly
    assert zscore(np.array([2.0, 2.0]), 2.0, 0.0).tolist() == [0.0, 0.0]  # a constant column: all ties


def test_reward_model_scores_match_a_direct_call_and_settings_resolve(reward_dirs):
    rows = hh_rows(9, seed=4)
    prompts, chosen, _ = map(list, zip(*(split_pair(r) for r in rows)))
    for name, folder in reward_dirs.items():
        spec = RewardModelConfig(name=name, path=str(folder), **MODEL_SETTINGS[name])
        model = RewardModel(spec, Storage(), micro_batch_size=4)  # padded, length-sorted micro-batches
        np.testing.assert_allclose(model.score(model.encode(prompts, chosen)),
                                   direct_rewards(folder, MODEL_SETTINGS[name], prompts, chosen), atol=1e-5)
        assert model.plan.input == "text"
    auto = inspect_model(RewardModelConfig(name="h", path=str(reward_dirs["Humour"]), input="auto"), Storage())
    assert auto.input == "text"  # no sep token: prompt + response as one text
    plan = inspect_model(RewardModelConfig(name="h", path=str(reward_dirs["Humour"])), Storage())
    assert (plan.max_length, plan.head, plan.num_labels) == (HUMOUR_LIMIT, 0, 1)
    labelled = inspect_model(RewardModelConfig(name="h", path=str(reward_dirs["Helpfulness"]), head="LABEL_1"),
                             Storage())
    assert labelled.head == 1
    for bad, message in (({"head": 2}, "out of range"), ({"head": "HUMOR"}, "not a label"),
                         ({"max_length": HUMOUR_LIMIT + 1}, "exceeds")):
        with pytest.raises(ValueError, match=message):
            inspect_model(RewardModelConfig(name="h", path=str(reward_dirs["Humour"]), **bad), Storage())


def test_config_errors_fail_before_any_work(tmp_path, reward_dirs):
    models = [{"name": "A", "path": "p"}, {"name": "A", "path": "q"}]
    with pytest.raises(ValueError, match="unique"):
        ScoreConfig(input="i", output="o", reward_models=models)
    with pytest.raises(ValueError):
        ScoreConfig(input="i", output="o", reward_models=[{"name": "A", "path": "p", "sign": 2}])
    model = [{"name": "A", "path": str(reward_dirs["Humour"])}]
    with pytest.raises(ValueError, match="inside the input"):
        run_scoring(ScoreConfig(input=str(tmp_path), output=str(tmp_path / "out"), reward_models=model),
                    Storage())
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        run_scoring(ScoreConfig(input=str(tmp_path), output=str(tmp_path.parent / "o"),
                                reward_models=[{"name": "A", "path": str(tmp_path)}]), Storage())
    assert not (tmp_path.parent / "o").exists()  # nothing staged


# --- the job on Ray ---------------------------------------------------------------------------------------------

def test_score_s3_end_to_end_then_reformulate(ray_cluster, s3_bucket, storage, reward_dirs, tmp_path):
    good = hh_rows(40, seed=7)
    rng = random.Random(8)
    long_rows = [hh_row(rng, long=True) for _ in range(2)]
    lines = [json.dumps(r) for r in good + long_rows]
    lines += [b if isinstance(b, str) else json.dumps(b) for rows in BAD_ROWS.values() for b in rows]
    random.Random(0).shuffle(lines)
    fs, path = storage.filesystem(f"s3://{s3_bucket}/raw")
    with fs.open_output_stream(f"{path}/train.jsonl.gz", compression=None) as f:  # the hh-rlhf release format
        f.write(gzip.compress(("\n".join(lines[:30]) + "\n").encode()))
    with fs.open_output_stream(f"{path}/more.jsonl") as f:
        f.write(("\n".join(lines[30:]) + "\n").encode())
    storage.copy_dir(str(reward_dirs["Humour"]), f"s3://{s3_bucket}/models/humour")
    config = write_config(tmp_path / "score.yaml", reward_dirs, batch_size=8, micro_batch_size=4)
    out = f"s3://{s3_bucket}/scored"
    code = cli_main(["score", "--config", config, "--input", f"s3://{s3_bucket}/raw", "--output", out,
                     "--format", "hh_rlhf_raw", *model_flags({k: v for k, v in reward_dirs.items() if k != "Humour"}),
                     "--reward-model", f"Humour=s3://{s3_bucket}/models/humour"])
    assert code == 0

    summary = storage.read_json(f"{out}/_summary.json")
    n_bad = sum(len(v) for v in BAD_ROWS.values())
    assert summary["rows_read"] == len(lines) == summary["rows_scored"] + summary["rows_quarantined"]
    assert summary["rows_scored"] == 40
    assert summary["quarantined_by_reason"] == {**{k: len(v) for k, v in BAD_ROWS.items()}, "too_long": 2}
    assert summary["rows_quarantined"] == n_bad + 2
    assert summary["objectives"] == ["Harmlessness", "Helpfulness", "Humour"]
    assert [m["head"] for m in summary["reward_models"]] == [0, 1, 0]

    rows = read_output(out, storage)
    assert [r for r in rows if r["prompt"] + r["chosen_response"] in {x["chosen"] for x in long_rows}] == []
    expected = expected_scores(reward_dirs, sorted(good, key=lambda r: split_pair(r)))
    for column, values in expected.items():
        np.testing.assert_allclose([r[column] for r in rows], values, rtol=1e-9, atol=1e-12)
    stats = summary["normalisation"]["per_model"]["Harmlessness"]
    assert stats["count"] == 80 and stats["std"] > 0

    qfs, qpath = storage.filesystem(f"{out}/_quarantine")
    quarantine = pq.read_table(qpath, filesystem=qfs).to_pylist()
    assert len(quarantine) == n_bad + 2 and all(q["detail"] and q["record"] and q["source"] for q in quarantine)
    too_long = [q for q in quarantine if q["reason"] == "too_long"]
    assert all("Humour" in q["detail"] and json.loads(q["record"]) in long_rows for q in too_long)

    # the real reformulation job reads the output as it is
    ref = tmp_path / "reformulated"
    assert cli_main(["reformulate", "--input", out, "--output", str(ref), "--format", "hh_rlhf_scores",
                     "--objectives", "hh_rlhf", "--template", "hh_rlhf"]) == 0
    rs = json.loads((ref / "_summary.json").read_text())
    assert rs["rows_read"] == rs["valid_pairs"] == 40 and rs["quarantined"] == 0
    assert set(rs["items_by_objective"]) == {"Harmlessness", "Helpfulness", "Humour"}
    prefs = [[">" if r[f"chosen_score{k}"] > r[f"rejected_score{k}"] else "<" if r[f"chosen_score{k}"] <
              r[f"rejected_score{k}"] else "=" for k in (1, 2, 3)] for r in rows]
    assert any("=" in p for p in prefs)  # equal rounded rewards -> identical z-scores -> ties, as the reference
    assert rs["items"] == {"contrastive": sum((">" in p) + ("<" in p) for p in prefs),
                           "equal": sum("=" in p for p in prefs)}


def test_scores_do_not_depend_on_files_batches_or_actors(ray_cluster, storage, reward_dirs, tmp_path):
    rows = hh_rows(30, seed=11)
    (tmp_path / "in").mkdir()
    for k in range(3):
        pq.write_table(pa.Table.from_pylist(rows[k * 10:(k + 1) * 10]), tmp_path / "in" / f"part-{k}.parquet")
    config = write_config(tmp_path / "score.yaml", reward_dirs)
    base = ["score", "--config", config, "--input", str(tmp_path / "in")]
    assert cli_main([*base, "--output", str(tmp_path / "a"), "--batch-size", "30", "--micro-batch-size", "64"]) == 0
    assert cli_main([*base, "--output", str(tmp_path / "b"), "--batch-size", "4", "--micro-batch-size", "3",
                     "--concurrency", "2"]) == 0
    a, b = read_output(str(tmp_path / "a"), storage), read_output(str(tmp_path / "b"), storage)
    assert len(a) == 30 and a == b  # bit-identical z-scores
    expected = expected_scores(reward_dirs, sorted(rows, key=lambda r: split_pair(r)))
    np.testing.assert_allclose([r["rejected_score2"] for r in a], expected["rejected_score2"], rtol=1e-9, atol=1e-12)


def test_too_many_bad_rows_fail_without_commit(ray_cluster, storage, reward_dirs, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    lines = [json.dumps(r) for r in hh_rows(3, seed=3)] + ["{not json"] * 4 + [json.dumps({"text": "x"})] * 2
    (tmp_path / "in" / "data.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    code = cli_main(["score", "--input", str(tmp_path / "in"), "--output", str(out), *model_flags(reward_dirs),
                     "--max-bad-fraction", "0.5"])
    assert code != 0
    err = capsys.readouterr().err
    assert "6 of 9 input rows" in err and "invalid_json: 4 rows (e.g." in err and "missing_field: 2 rows" in err
    assert "is --format right?" in err
    assert not (out / "_SUCCESS").exists() and not (out / "_summary.json").exists()
    staged = list((out / "_staging").glob("*/_quarantine/*.parquet"))
    assert staged and sum(pq.read_table(f).num_rows for f in staged) == 6


# --- as the reference computes it (issue 17 item 4) -------------------------------------------------------------

MARK = "\n\nAssistant:"


def reference_oracle(chosen: str, rejected: str) -> tuple[str, str, str]:
    """The reference's `tokenize` (prepare_dataset_with_rewards.py), restated: split both transcripts at every
    marker, the prompt is the chosen one's parts but the last joined back, then a space and the marker; the
    responses are the last parts, stripped."""
    c, r = chosen.split(MARK), rejected.split(MARK)
    return MARK.join(c[:-1]) + " " + MARK, c[-1].strip(), r[-1].strip()


REFERENCE_ROWS = [  # (row, the reference's split written out, our note)
    ({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello there. ", "rejected": "\n\nHuman: Hi\n\nAssistant:  Go away\n"},
     ("\n\nHuman: Hi \n\nAssistant:", "Hello there.", "Go away"), None),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c? \n\nAssistant:\u00a0d\u3000",  # multi-turn, unicode spaces
      "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c? \n\nAssistant:e"},
     ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c?  \n\nAssistant:", "d", "e"), None),
    ({"chosen": "\n\nHuman: tell me a joke ", "rejected": " \n\nHuman: tell me a joke"},  # no assistant turn
     (" \n\nAssistant:", "Human: tell me a joke", "Human: tell me a joke"), "no_assistant_turn"),
    ({"chosen": "\n\nHuman: one\n\nAssistant: x", "rejected": "\n\nHuman: two\n\nAssistant: y"},
     ("\n\nHuman: one \n\nAssistant:", "x", "y"), "prompt_mismatch"),  # the chosen prompt is taken
    ({"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "rejected": "\n\nHuman: a\n\nAssistant: d"},
     ("\n\nHuman: a \n\nAssistant:", "b\n\nHuman: c", "d"), "final_human_turn"),
]


def test_reference_split_matches_the_reference_byte_for_byte():
    rows = [row for row, _, _ in REFERENCE_ROWS]
    out = split_batch(pa.table({"text": [json.dumps(r) for r in rows]}), json_lines=True, split="reference")
    got = list(zip(*(out.column(c).to_pylist() for c in ("prompt", "chosen_response", "rejected_response"))))
    for (row, expected, note), split, got_note in zip(REFERENCE_ROWS, got, out.column("note").to_pylist()):
        assert split == expected == reference_oracle(row["chosen"], row["rejected"]), row
        assert got_note == note
    assert out.column("reason").null_count == len(rows)  # kept, as the reference keeps them
    # the example: ours used to give ('\n\nHuman: Hi\n\nAssistant:', ' Hello there. ')
    assert got[0][:2] == ("\n\nHuman: Hi \n\nAssistant:", "Hello there.")


def direct_reference_rewards(folder, plan, pairs: list[tuple[str, str]]) -> np.ndarray:
    """One unpadded bf16 call per input, as the reference: tokenizer(q, r) (or r alone), truncated to the limit,
    logit[head] * sign."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), use_safetensors=True,
                                                               dtype=torch.bfloat16).eval()
    out = []
    with torch.inference_mode():
        for q, r in pairs:
            args = (r,) if plan.input == "response" else (q, r)
            enc = tok(*args, return_tensors="pt", truncation=True, max_length=plan.max_length)
            out.append(plan.sign * model(**enc).logits[0][plan.head].item())
    return np.array(out)


def test_score_as_the_reference_by_default(ray_cluster, storage, reward_dirs, tmp_path):
    """The reference's inputs and row filter: the split above, pair inputs, humour on the response alone with logit
    1, transcripts under 8 tokens (any model's tokenizer) or over a model's limit dropped (quarantined here), bf16."""
    import yaml

    humour = create_tiny_reward_model(tmp_path / "humour", [r["chosen"] for r in hh_rows(200, seed=99)], arch="gpt2",
                                      num_labels=2, max_positions=HUMOUR_LIMIT, seed=5)
    models = [{"name": "Harmlessness", "path": str(reward_dirs["Harmlessness"])},
              {"name": "Helpfulness", "path": str(reward_dirs["Helpfulness"]), "head": 1, "sign": -1},
              {"name": "Humour", "path": str(humour), "input": "response", "head": 1}]
    rng = random.Random(21)
    long_row = hh_row(rng, long=True)  # its response fits the humour model, its transcript does not
    rows = hh_rows(12, seed=20) + [r for r, _, _ in REFERENCE_ROWS] + [long_row, {"chosen": "Hi", "rejected": "Hi"}]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "train.json").write_text(json.dumps(rows))  # an array file, as an export may be
    (tmp_path / "score.yaml").write_text(yaml.safe_dump({"score": {"reward_models": models, "micro_batch_size": 1}}))
    out = tmp_path / "out"
    assert cli_main(["score", "--config", str(tmp_path / "score.yaml"), "--input", str(tmp_path / "in"),
                     "--output", str(out)]) == 0
    summary = json.loads((out / "_summary.json").read_text())
    assert (summary["split"], summary["length_of"], summary["min_tokens"], summary["dtype"]) == \
           ("reference", "transcript", 8, "bfloat16")
    assert [m["input"] for m in summary["reward_models"]] == ["pair", "pair", "response"]

    plans = [inspect_model(RewardModelConfig(**m), Storage()) for m in models]
    folders = [reward_dirs["Harmlessness"], reward_dirs["Helpfulness"], humour]
    from transformers import AutoTokenizer

    toks = [AutoTokenizer.from_pretrained(str(f)) for f in folders]

    def kept(row) -> bool:  # the reference's filter: 8 <= tokens <= limit for both transcripts, every model
        return all(8 <= len(t.encode(row[side])) <= p.max_length for t, p in zip(toks, plans)
                   for side in ("chosen", "rejected"))

    keep = [r for r in rows if kept(r)]
    assert long_row not in keep and rows[-1] not in keep and len(keep) >= 14
    assert summary["rows_scored"] == len(keep) and summary["quarantined_by_reason"] == {
        "too_long": 1, "too_short": len(rows) - len(keep) - 1}
    assert summary["split_notes"] == dict(Counter(n for r, _, n in REFERENCE_ROWS if n and r in keep))
    splits = [reference_oracle(r["chosen"], r["rejected"]) for r in keep]
    got = read_output(str(out), storage)
    assert sorted(splits) == [(g["prompt"], g["chosen_response"], g["rejected_response"]) for g in got]
    order = sorted(range(len(keep)), key=lambda i: splits[i])
    for k, (folder, plan) in enumerate(zip(folders, plans), start=1):
        raw = np.round(direct_reference_rewards(folder, plan, [(splits[i][0], splits[i][s]) for s in (1, 2)
                                                               for i in order]), 1)
        z = (raw - raw.mean()) / raw.std()
        np.testing.assert_allclose([g[f"chosen_score{k}"] for g in got] + [g[f"rejected_score{k}"] for g in got], z,
                                   rtol=1e-9, atol=1e-12)
