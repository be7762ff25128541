"""The reformulation job end to end on Ray Data with the real S3 server and local files."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metaaligner.cli import main as cli_main
from metaaligner.config import ReformulateConfig
from metaaligner.data.reformulate.job import run_reformulation
from metaaligner.synthetic import make_pair


def synthetic_rows(n, seed=0):
    rng = random.Random(seed)
    return [make_pair(f"s{i}", rng) for i in range(n)]


def write_parquet_parts(rows, uri, storage, parts):
    fs, path = storage.filesystem(uri)
    step = -(-len(rows) // parts)
    for k in range(parts):
        chunk = rows[k * step:(k + 1) * step]
        for r in chunk:
            r["preferences"] = json.dumps(r["preferences"]) if isinstance(r["preferences"], dict) else r["preferences"]
        fs.create_dir(path, recursive=True)
        pq.write_table(pa.Table.from_pylist(chunk), f"{path}/part-{k}.parquet", filesystem=fs)


def read_items(uri, storage, kind):
    fs, path = storage.filesystem(uri)
    return sorted(pq.read_table(f"{path}/{kind}", filesystem=fs).to_pylist(), key=lambda r: r["id"])


def test_s3_to_s3_end_to_end(ray_cluster, s3_bucket, storage):
    rows = synthetic_rows(3000)
    write_parquet_parts(rows, f"s3://{s3_bucket}/in", storage, parts=4)
    cfg = ReformulateConfig(input=f"s3://{s3_bucket}/in", output=f"s3://{s3_bucket}/out",
                            objectives="synthetic", batch_size=500)
    summary = run_reformulation(cfg, storage)

    assert summary["rows_read"] == summary["valid_pairs"] == 3000 and summary["quarantined"] == 0
    contrastive = read_items(cfg.output, storage, "contrastive")
    equal = read_items(cfg.output, storage, "equal")
    assert summary["items"] == {"contrastive": len(contrastive), "equal": len(equal)}
    prefs = [json.loads(r["preferences"]) for r in rows]
    assert len(contrastive) == sum((">" in p.values()) + ("<" in p.values()) for p in prefs)
    assert len(equal) == sum("=" in p.values() for p in prefs)
    assert all(i["subset"] == "contrastive" and i["condition"] == "better" for i in contrastive)
    per_objective = {}
    for i in contrastive + equal:
        for o in i["objectives"]:
            per_objective.setdefault(o, {}).setdefault(i["subset"], 0)
            per_objective[o][i["subset"]] += 1
    assert summary["items_by_objective"] == per_objective
    assert storage.read_json(f"{cfg.output}/_summary.json")["valid_pairs"] == 3000


def test_output_is_identical_across_block_and_file_splits(ray_cluster, s3_bucket, storage, tmp_path):
    rows = synthetic_rows(600, seed=5)
    write_parquet_parts([dict(r) for r in rows], f"s3://{s3_bucket}/one", storage, parts=1)
    local = tmp_path / "many"
    write_parquet_parts([dict(r) for r in rows], str(local), storage, parts=7)
    a = ReformulateConfig(input=f"s3://{s3_bucket}/one", output=f"s3://{s3_bucket}/a", objectives="synthetic",
                          batch_size=1000)
    b = ReformulateConfig(input=str(local), output=str(tmp_path / "b"), objectives="synthetic", batch_size=37)
    run_reformulation(a, storage)
    run_reformulation(b, storage)
    for kind in ("contrastive", "equal"):
        assert read_items(a.output, storage, kind) == read_items(b.output, storage, kind)
    c = b.model_copy(update={"seed": 43, "output": str(tmp_path / "c")})
    run_reformulation(c, storage)
    assert read_items(c.output, storage, "contrastive") != read_items(b.output, storage, "contrastive")


BAD_LINES = {
    "invalid_json": ["{not json", "[1, 2]"],
    "missing_field": [{"id": "m1", "question": "q", "response_1": "a", "preferences": {"Calmness": ">"}}],
    "empty_field": [{"id": "e1", "question": " ", "response_1": "a", "response_2": "b", "preferences": {"Calmness": ">"}}],
    "wrong_type": [{"id": "w1", "question": "q", "response_1": ["a"], "response_2": "b", "preferences": {"Calmness": ">"}}],
    "bad_preference_symbol": [{"id": "b1", "question": "q", "response_1": "a", "response_2": "b", "preferences": {"Calmness": 1}}],
    "unknown_objective": [{"id": "u1", "question": "q", "response_1": "a", "response_2": "b", "preferences": {"Wit": ">"}}],
    "duplicate_id": [{"id": "s3", "question": "q", "response_1": "a", "response_2": "b", "preferences": {"Calmness": "<"}}],
}


def test_quarantine_reconciles_with_every_kind_of_bad_row(ray_cluster, tmp_path, storage):
    good = synthetic_rows(200, seed=9)
    lines = [json.dumps(r) for r in good]
    for bad in BAD_LINES.values():
        lines += [b if isinstance(b, str) else json.dumps(b) for b in bad]
    random.Random(0).shuffle(lines)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(lines[:120]) + "\n")
    (tmp_path / "in" / "b.jsonl").write_text("\n".join(lines[120:]) + "\n")
    out = tmp_path / "out"
    code = cli_main(["reformulate", "--input", str(tmp_path / "in"), "--output", str(out),
                     "--objectives", "synthetic", "--format", "canonical"])
    assert code == 0
    summary = json.loads((out / "_summary.json").read_text())
    n_bad = sum(len(v) for v in BAD_LINES.values())
    assert summary["rows_read"] == len(lines) == summary["valid_pairs"] + summary["quarantined"]
    assert summary["valid_pairs"] == 200 and summary["quarantined"] == n_bad
    assert summary["quarantined_by_reason"] == {k: len(v) for k, v in BAD_LINES.items()}
    quarantine = pq.read_table(out / "_quarantine").to_pylist()
    assert len(quarantine) == n_bad and all(q["detail"] and q["record"] and q["source"] for q in quarantine)
    dup = [q for q in quarantine if q["reason"] == "duplicate_id"]
    assert len(dup) == 1  # exactly one of the two "s3" rows was kept
    kept = [i for i in pq.read_table(out / "contrastive").to_pylist() + pq.read_table(out / "equal").to_pylist()
            if i["pair_id"] == "s3"]
    assert kept


def test_ultrafeedback_and_hh_csv_inputs(ray_cluster, s3_bucket, storage, tmp_path):
    import pyarrow.csv as pacsv

    keys = ("instruction_following", "honesty", "truthfulness", "helpfulness")
    comp = lambda text, r: {"model": "m", "response": text, "annotations": {k: {"Rating": v} for k, v in zip(keys, r)}}
    completions = [comp("a|b\n" * 50, "5432"), comp("c", ["1", "N/A", "4", "4"]), comp("d ü", "3333")]
    rows = [{"instruction": f"Q{i} | with\nnewline ✓", "completions": completions} for i in range(20)]
    rows.append({"instruction": "", "completions": []})
    fs, path = storage.filesystem(f"s3://{s3_bucket}/uf/data.jsonl")
    with fs.open_output_stream(path) as f:
        f.write("\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode())
    cfg = ReformulateConfig(input=f"s3://{s3_bucket}/uf", output=f"s3://{s3_bucket}/uf-out", format="ultrafeedback",
                            template="ultrafeedback")
    s = run_reformulation(cfg, storage)
    assert s["rows_read"] == 21 and s["rows_quarantined"] == 1 and s["pairs_total"] == 60 == s["valid_pairs"]
    assert s["ratings_non_numeric"] == 40  # honesty N/A in pairs (0,1) and (1,2) of each instruction
    items = read_items(cfg.output, storage, "contrastive")
    assert all(i["prompt"].startswith("You are an assistant to human.") for i in items)

    hh = pa.table({"prompt": ["\n\nHuman: hi \"there\", | ok?\n\nAssistant:"] * 5,
                   "chosen_response": [f"yes\nline {i}" for i in range(5)], "rejected_response": ["no"] * 5,
                   "chosen_score1": [1.0] * 5, "rejected_score1": [0.2] * 5, "chosen_score2": [0.52] * 5,
                   "rejected_score2": [0.52] * 5, "chosen_score3": [0.0] * 5, "rejected_score3": [1.0] * 5})
    (tmp_path / "hh").mkdir()
    pacsv.write_csv(hh, tmp_path / "hh" / "scores.csv")
    cfg = ReformulateConfig(input=str(tmp_path / "hh"), output=str(tmp_path / "hh-out"), format="hh_rlhf_scores",
                            objectives="hh_rlhf", template="hh_rlhf")
    s = run_reformulation(cfg, storage)
    assert s["valid_pairs"] == 5 and s["items"] == {"contrastive": 10, "equal": 5}


def test_hf_save_to_disk_input(ray_cluster, tmp_path, storage):
    import datasets

    rows = synthetic_rows(50, seed=2)
    for r in rows:
        r["preferences"] = json.dumps(r["preferences"])
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    cfg = ReformulateConfig(input=str(tmp_path / "hf"), output=str(tmp_path / "out"), objectives="synthetic")
    assert run_reformulation(cfg, storage)["valid_pairs"] == 50


@pytest.mark.parametrize("override,message", [
    ({"objectives": "nonexistent"}, "unknown objective set"),
    ({"input": "s3://no-such-bucket-x/in"}, "does not exist"),
    ({"input": "EMPTY"}, "no input files"),
])
def test_bad_configuration_fails_fast(ray_cluster, tmp_path, storage, override, message):
    (tmp_path / "empty").mkdir()
    fields = {"input": str(tmp_path / "empty"), "output": str(tmp_path / "out"), **override}
    if fields["input"] == "EMPTY":
        fields["input"] = str(tmp_path / "empty")
    with pytest.raises((ValueError, RuntimeError), match=message):
        run_reformulation(ReformulateConfig(**fields), storage)


def test_unreachable_endpoint_and_bad_template_fail_fast(tmp_path):
    from metaaligner.config import StorageConfig

    with pytest.raises(RuntimeError, match="unreachable"):
        run_reformulation(ReformulateConfig(input="s3://b/in", output="s3://b/out", objectives="synthetic"),
                          StorageConfig(endpoint_url="http://127.0.0.1:9"))
    assert cli_main(["reformulate", "--input", "x", "--output", "y", "--objectives", "nope"]) == 2


def test_holdout_split_is_the_same_whatever_the_file_layout(ray_cluster, storage, tmp_path):
    rows = synthetic_rows(400, seed=11)  # 20 distinct questions: whole questions go to one side
    write_parquet_parts([dict(r) for r in rows], str(tmp_path / "one"), storage, parts=1)
    write_parquet_parts([dict(r) for r in rows], str(tmp_path / "many"), storage, parts=5)
    common = {"objectives": "synthetic", "holdout_fraction": 0.25, "split_seed": 5}
    a = ReformulateConfig(input=str(tmp_path / "one"), output=str(tmp_path / "a"), batch_size=1000, **common)
    b = ReformulateConfig(input=str(tmp_path / "many"), output=str(tmp_path / "b"), batch_size=37, **common)
    sa, sb = run_reformulation(a, storage), run_reformulation(b, storage)
    for kind in ("contrastive", "equal", "test"):
        assert read_items(a.output, storage, kind) == read_items(b.output, storage, kind)
    trained = {i["pair_id"] for kind in ("contrastive", "equal") for i in read_items(a.output, storage, kind)}
    test = read_items(a.output, storage, "test")
    by_id = {r["id"]: r for r in rows}
    held_questions = {by_id[t["id"]]["question"] for t in test}
    assert test and not held_questions & {by_id[p]["question"] for p in trained}
    assert set(test[0]) == {"id", "question", "golden", "candidates"}
    for s in (sa, sb):
        assert s["holdout_pairs"] + s["training_pairs"] == s["valid_pairs"] == s["rows_read"] == 400
        assert s["test_rows"] + s["holdout_no_golden"] == s["holdout_pairs"] > 0
        assert s["test_rows"] == len(test) and len(trained) == s["training_pairs"]


def test_released_fastchat_rows_convert_without_algorithm_1(ray_cluster, storage, tmp_path):
    from metaaligner.data.formats.canonical import validate_pair
    from metaaligner.data.io.discovery import discover
    from metaaligner.data.reformulate.algorithm import reformulate_pair
    from metaaligner.objectives import load_objective_set
    from metaaligner.prompts import get_template

    syn = load_objective_set("synthetic")
    expected = [i for r in synthetic_rows(60, seed=3)
                for i in reformulate_pair(validate_pair(r, syn, None), syn, get_template("ultrafeedback"), 1)]
    lines = [{"id": n, "conversations": [{"from": "human", "value": i["prompt"]}, {"from": "gpt", "value": i["target"]}]}
             for n, i in enumerate(expected)]
    lines.append({"id": "bad", "conversations": [{"from": "human", "value": "Improve: x"}, {"from": "gpt", "value": "y"}]})
    (tmp_path / "released").mkdir()
    (tmp_path / "released" / "data.json").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "out"
    assert cli_main(["reformulate", "--input", str(tmp_path / "released"), "--output", str(out),
                     "--format", "fastchat", "--objectives", "synthetic"]) == 0
    s = json.loads((out / "_summary.json").read_text())
    assert s["rows_read"] == len(lines) and s["valid_pairs"] == len(expected) == s["items_total"]
    assert s["quarantined_by_reason"] == {"unparseable_prompt": 1}
    keys = ("subset", "condition", "objectives", "prompt", "weak_answer", "target", "template")
    got = read_items(str(out), storage, "contrastive") + read_items(str(out), storage, "equal")
    assert sorted(tuple(json.dumps(i[k]) for k in keys) for i in got) == \
           sorted(tuple(json.dumps(i[k]) for k in keys) for i in expected)
    _, files = discover(str(out / "equal"), storage, ("parquet",), skip_test_files=True)  # as train reads it
    assert files and set(pq.read_table(files[0]).column_names) >= {"id", "subset", "prompt", "weak_answer", "target"}


def test_test_split_files_are_not_reformulated_unless_asked(ray_cluster, storage, tmp_path):
    (tmp_path / "in").mkdir()
    for name, rows in (("train.jsonl", synthetic_rows(30, seed=1)), ("test.jsonl", synthetic_rows(20, seed=2))):
        (tmp_path / "in" / name).write_text("\n".join(json.dumps({**r, "id": name + r["id"]}) for r in rows) + "\n")
    cfg = ReformulateConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), objectives="synthetic")
    assert run_reformulation(cfg, storage)["rows_read"] == 30
    both = cfg.model_copy(update={"include_test_files": True, "output": str(tmp_path / "both")})
    assert run_reformulation(both, storage)["rows_read"] == 50
