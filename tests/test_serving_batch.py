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


def test_correct_cli_on_s3(ray_cluster, s3_server, s3_bucket, storage_config, tiny_model_dir, tmp_path):
    from metaaligner import storage as st
    from metaaligner.cli import main

    s3 = st.s3_client(storage_config)
    rows = _rows(10)
    for part, chunk in enumerate((rows[:6], rows[6:])):
        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(chunk, schema=pa.schema([
            ("id", pa.string()), ("question", pa.string()), ("answer", pa.string()),
            ("objectives", pa.list_(pa.string()))])), buf)
        s3.put_object(Bucket=s3_bucket, Key=f"in/part-{part}.parquet", Body=buf.getvalue().to_pybytes())
    st.copy_dir(str(tiny_model_dir), f"s3://{s3_bucket}/models/tiny", storage_config)

    out = f"s3://{s3_bucket}/out"
    rc = main(["correct", "--input", f"s3://{s3_bucket}/in", "--output", out, "--model", f"s3://{s3_bucket}/models/tiny",
               "--endpoint-url", storage_config.endpoint_url, "--default-objectives", "Truthfulness",
               "--concurrency", "2", "--batch-size", "4"])
    assert rc == 0
    summary = st.read_json(f"{out}/_summary.json", storage_config)
    assert summary["rows"] == 10 and summary["corrected"] == 9 and summary["errors"] == 1
    assert summary["completion_tokens"] > 0 and summary["input_files"] == 2

    fs, path = st.filesystem(out, storage_config)
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
