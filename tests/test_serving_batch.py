"""Offline batch correction on Ray Data: S3 in/out with the SeaweedFS server, model folder from s3://, local JSONL."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def _rows(n: int) -> list[dict]:
    rows = [{"id": f"r{i}", "question": f"Question {i}: how do plants grow?", "answer": f"Answer {i}.",
             "objectives": ["Honesty", "Helpfulness"] if i % 2 else None} for i in range(n)]
    rows[3]["objectives"] = ["Sarcasm"]  # unknown objective -> an error record, not dropped
    return rows


def test_correct_cli_on_s3(ray_cluster, s3_server, s3_bucket, storage, tiny_model_dir, tmp_path):
    from metaaligner.cli import main

    s3 = storage.client
    rows = _rows(10)
    for part, chunk in enumerate((rows[:6], rows[6:])):
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(chunk, schema=pa.schema([
            ("id", pa.string()), ("question", pa.string()), ("answer", pa.string()),
            ("objectives", pa.list_(pa.string()))])), buf)
        s3.put_object(Bucket=s3_bucket, Key=f"in/part-{part}.parquet", Body=buf.getvalue().to_pybytes())
    storage.copy_dir(str(tiny_model_dir), f"s3://{s3_bucket}/models/tiny")

    out = f"s3://{s3_bucket}/out"
    rc = main(["correct", "--input", f"s3://{s3_bucket}/in", "--output", out, "--model", f"s3://{s3_bucket}/models/tiny",
               "--endpoint-url", storage.config.endpoint_url, "--default-objectives", "Truthfulness",
               "--concurrency", "2", "--batch-size", "4"])
    assert rc == 0
    summary = storage.read_json(f"{out}/_summary.json")
    assert summary["rows"] == 10 and summary["corrected"] == 9 and summary["errors"] == 1
    assert summary["completion_tokens"] > 0 and summary["input_files"] == 2 and summary["too_long"] == 0
    manifest = storage.read_json(f"{out}/_SUCCESS")  # committed through the staging protocol
    assert manifest["job"] == "correct" and all(f["path"].endswith(".parquet") for f in manifest["files"])
    assert not storage.exists(f"{out}/_staging")

    fs, path = storage.filesystem(out)
    table = pq.read_table(path, filesystem=fs).sort_by("id")
    got = {r["id"]: r for r in table.to_pylist()}
    assert set(got) == {r["id"] for r in rows}
    assert "Sarcasm" in got["r3"]["error"] and got["r3"]["correction"] is None
    assert got["r1"]["objectives_used"] == ["Honesty", "Helpfulness"]
    assert got["r0"]["objectives_used"] == ["Truthfulness"]  # default for rows without objectives
    ok = [r for r in got.values() if r["error"] is None]
    assert all(isinstance(r["correction"], str) and 1 <= r["completion_tokens"] for r in ok)
    assert sum(r["completion_tokens"] for r in ok) == summary["completion_tokens"]


def test_correct_local_jsonl_and_bad_input(ray_cluster, tiny_model_dir, tmp_path):
    from metaaligner.config import StorageConfig
    from metaaligner.serving.batch import run_correction
    from metaaligner.serving.config import CorrectConfig

    src = tmp_path / "in"
    src.mkdir()
    rows = [{"question": "What is 2+2?", "answer": "5", "objectives": json.dumps(["Harmlessness"])},
            {"question": "Tell me a joke.", "answer": "No.", "objectives": "Humour"}]
    (src / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = CorrectConfig(input=str(src), output=str(tmp_path / "out"), model=str(tiny_model_dir), objectives="hh_rlhf",
                        template="hh_rlhf", generation={"max_new_tokens": 4}, num_cpus=0.5)
    summary = run_correction(cfg, StorageConfig())
    assert summary["rows"] == 2 and summary["errors"] == 0 and summary["completion_tokens"] <= 8
    table = pq.read_table(tmp_path / "out")
    assert table.column("template_used").to_pylist() == ["hh_rlhf"] * 2
    assert sorted(table.column("objectives_used").to_pylist()) == [["Harmlessness"], ["Humour"]]
    assert (tmp_path / "out" / "_summary.json").is_file()

    (src / "b.jsonl").write_text(json.dumps({"q": "x", "a": "y"}) + "\n")
    with pytest.raises(ValueError, match="missing columns"):
        run_correction(cfg.model_copy(update={"input": str(src / "b.jsonl")}), StorageConfig())
    with pytest.raises(ValueError, match="unknown objectives"):
        run_correction(cfg.model_copy(update={"default_objectives": ["Nope"]}), StorageConfig())



def test_correct_quarantines_a_bad_json_line_and_reads_objectives_as_evaluate_does(ray_cluster, tiny_model_dir,
                                                                                  tmp_path):
    """One reader and one objectives parser for correct and evaluate: a line that is not JSON is quarantined with
    its reason (not a failed run), and "A; B" names two objectives, as in evaluate."""
    from metaaligner.serving.batch import run_correction
    from metaaligner.serving.config import CorrectConfig

    src = tmp_path / "in"
    src.mkdir()
    good = [{"id": "a", "question": "What is 2+2?", "answer": "5", "objectives": "Harmlessness; Humour"},
            {"id": "b", "question": "Tell me a joke.", "answer": "No.", "objectives": ["Helpfulness"]}]
    lines = [json.dumps(good[0]), '{"id": "broken", "question": ', json.dumps(good[1]), "[1, 2]"]
    (src / "a.jsonl").write_text("\n".join(lines) + "\n")
    cfg = CorrectConfig(input=str(src), output=str(tmp_path / "out"), model=str(tiny_model_dir), objectives="hh_rlhf",
                        generation={"max_new_tokens": 4}, num_cpus=0.5)
    summary = run_correction(cfg)
    assert summary["rows_read"] == 4 and summary["rows"] == 2 and summary["errors"] == 0
    assert summary["quarantined"] == 2 and summary["quarantined_by_reason"] == {"invalid_json": 2}
    got = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert got["a"]["objectives_used"] == ["Harmlessness", "Humour"] and got["b"]["objectives_used"] == ["Helpfulness"]
    shards = sorted((tmp_path / "out" / "_quarantine").glob("*.jsonl"))
    records = [json.loads(line) for shard in shards for line in shard.read_text().splitlines()]
    assert sorted(r["record"] for r in records) == sorted([lines[1], lines[3]])
    assert {r["source"] for r in records} == {str(src / "a.jsonl")}
    manifest = json.loads((tmp_path / "out" / "_SUCCESS").read_text())
    assert any(f["path"].startswith("_quarantine/") for f in manifest["files"])

    (src / "a.jsonl").write_text("\n".join(lines[:2] + ["not json"] * 3) + "\n")
    with pytest.raises(Exception, match="max_bad_fraction"):  # 4 of 5 rows unreadable: nothing is committed
        run_correction(cfg.model_copy(update={"output": str(tmp_path / "out2")}))
    assert not (tmp_path / "out2" / "_SUCCESS").exists()

LONG_ANSWER = "word " * 200
LONG_QUESTION = "Why " * 300 + "?"


def _too_long_rows() -> pa.Table:
    rows = [{"id": "ok0", "question": "How do I bake bread?", "answer": "Mix flour and water."},
            {"id": "ok1", "question": "How do I boil an egg?", "answer": "Boil it."},
            {"id": "ok2", "question": "What is rain?", "answer": "Water falling."},
            {"id": "long-answer", "question": "Tell me about words.", "answer": LONG_ANSWER},
            {"id": "long-question", "question": LONG_QUESTION, "answer": "Short."}]
    return pa.Table.from_pylist(rows)


@pytest.mark.parametrize("mode", ["original", "truncate", "error"])
def test_on_too_long_modes_never_fail_the_batch(tiny_model_dir, mode):
    """The actor itself on a batch (no Ray scheduling needed): a prompt over max_input_tokens follows on_too_long,
    is flagged too_long, and every other row is corrected."""
    from metaaligner.serving.batch import KEPT_ORIGINAL, CorrectorActor
    from metaaligner.serving.config import CorrectConfig
    from metaaligner.storage import Storage

    limit = 200
    cfg = CorrectConfig(input="x", output="y", model=str(tiny_model_dir), objectives="hh_rlhf", template="hh_rlhf",
                        max_input_tokens=limit, on_too_long=mode, generation={"max_new_tokens": 4})
    out = {r["id"]: r for r in CorrectorActor(cfg, Storage())(_too_long_rows()).to_pylist()}
    assert len(out) == 5 and out["long-answer"]["answer"] == LONG_ANSWER  # input columns are kept
    for rid in ("ok0", "ok1", "ok2"):
        assert out[rid]["too_long"] is False and out[rid]["error"] is None
        assert out[rid]["finish_reason"] in ("stop", "length") and out[rid]["prompt_tokens"] <= limit
    long_answer, long_question = out["long-answer"], out["long-question"]
    assert long_answer["too_long"] is True and long_question["too_long"] is True
    if mode == "original":  # the correction is the untouched answer
        for row in (long_answer, long_question):
            assert (row["correction"], row["finish_reason"], row["error"]) == (row["answer"], KEPT_ORIGINAL, None)
            assert row["completion_tokens"] == 0
    elif mode == "truncate":  # the answer's tail is cut to fit; a question alone over the limit is an error
        assert long_answer["error"] is None and long_answer["finish_reason"] in ("stop", "length")
        assert limit - 8 <= long_answer["prompt_tokens"] <= limit
        assert long_question["correction"] is None and "even with the whole answer cut" in long_question["error"]
    else:
        for row in (long_answer, long_question):
            assert row["correction"] is None and row["error"].startswith("InputTooLong: prompt is")


def test_truncate_answer_cuts_only_the_answer_tail(tiny_model_dir):
    from transformers import AutoTokenizer

    from metaaligner.prompts import truncate_weak_answer as truncate_answer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = f"Objectives: be kind | Context: Why? | Answer: {LONG_ANSWER}| Edit: "
    ids = truncate_answer(tok, prompt, LONG_ANSWER, 60)
    assert len(ids) <= 60
    text = tok.decode(ids, skip_special_tokens=True)
    assert text.startswith("Objectives: be kind | Context: Why? | Answer: word") and text.rstrip().endswith("| Edit:")
    assert text.count("word") < LONG_ANSWER.count("word")
    assert truncate_answer(tok, prompt, LONG_ANSWER, 10) is None  # even an empty answer does not fit


def test_output_containing_or_inside_the_input_is_refused_and_the_input_survives(tiny_model_dir, tmp_path):
    from metaaligner.config import StorageConfig
    from metaaligner.serving.batch import run_correction
    from metaaligner.serving.config import CorrectConfig

    (tmp_path / "data" / "in").mkdir(parents=True)
    (tmp_path / "data" / "in" / "a.jsonl").write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n")
    for output in (tmp_path / "data", tmp_path / "data" / "in", tmp_path / "data" / "in" / "out"):
        cfg = CorrectConfig(input=str(tmp_path / "data" / "in"), output=str(output), model=str(tiny_model_dir))
        with pytest.raises(ValueError, match="write the output somewhere else"):
            run_correction(cfg, StorageConfig())
    assert (tmp_path / "data" / "in" / "a.jsonl").is_file()
    assert sorted(p.name for p in (tmp_path / "data").rglob("*")) == ["a.jsonl", "in"]


def test_an_incomplete_earlier_output_is_refused_as_input(tiny_model_dir, tmp_path):
    from metaaligner.config import StorageConfig
    from metaaligner.serving.batch import run_correction
    from metaaligner.serving.config import CorrectConfig

    staged = tmp_path / "answers" / "_staging" / "20260101T000000-deadbeef"
    staged.mkdir(parents=True)
    (staged / "part-0.jsonl").write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n")
    cfg = CorrectConfig(input=str(tmp_path / "answers"), output=str(tmp_path / "out"), model=str(tiny_model_dir))
    with pytest.raises(RuntimeError, match="incomplete run"):
        run_correction(cfg, StorageConfig())
    assert not (tmp_path / "out").exists()
