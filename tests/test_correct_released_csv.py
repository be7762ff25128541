"""The paper's evaluation route on a CSV shaped like the authors' released policy outputs (`query, goldens,
generated_text`; multi-line quoted cells, empty goldens, no id column): correct -> evaluate with the paper's judge
prompt -> the Table-2 "+", with the tiny CPU corrector and a loopback judge; then docs/reproduce-paper.md as written."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from evaluation_server import ChatJudgeServer, decide

from metaaligner.config import StorageConfig
from metaaligner.objectives import load_objective_set

REPO = Path(__file__).resolve().parents[1]
LOCAL = StorageConfig(endpoint_url=None)
COLUMNS = ("query", "goldens", "generated_text")
LONG_ANSWER = "word " * 300  # over max_input_tokens=400 of the corrector below
TASKS = ("bake bread", "boil an egg", "fix a flat tyre", "plant tomatoes", "write a cover letter", "tie a tie",
         "clean a cast-iron pan", "learn to juggle", "brew tea")


def released_rows() -> list[dict]:
    """12 rows: HH transcripts as queries, multi-line goldens and answers with commas and quotes, one over-long
    answer (row 5), two empty goldens (rows 9, 10) and an exact duplicate of row 0 (row 11)."""
    rows = []
    for i, task in enumerate(TASKS):
        rows.append({
            "query": f"\n\nHuman: How do I {task}?\nPlease be specific, \"step by step\".\n\nAssistant:",
            "goldens": f"Here is how to {task}:\n1. Prepare.\n2. Do it carefully, then check.",
            "generated_text": LONG_ANSWER if i == 5 else f"You {task}, \"obviously\".\nThat's it" + "!" * i,
        })
    rows += [{"query": "\n\nHuman: Tell me a joke.\n\nAssistant:", "goldens": "", "generated_text": "No."},
             {"query": "\n\nHuman: What is 2+2?\n\nAssistant:", "goldens": "", "generated_text": "4"},
             dict(rows[0])]
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def expected_id(row: dict) -> str:
    """An independent rendering of the content id: BLAKE2b-64 of the row as compact, key-sorted JSON."""
    text = json.dumps(row, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(text.encode("ascii"), digest_size=8).hexdigest()


def _correct_cfg(src: Path, out: Path, model: Path, **kw):
    from metaaligner.serving.config import CorrectConfig

    return CorrectConfig(input=str(src), output=str(out), model=str(model), objectives="hh_rlhf", template="hh_rlhf",
                         question_column="query", answer_column="generated_text", max_input_tokens=400,
                         on_too_long="error", generation={"max_new_tokens": 8}, batch_size=16, num_cpus=0.5, **kw)


def test_released_csv_through_correct_and_evaluate_with_the_paper_prompt(ray_cluster, tiny_model_dir, tmp_path):
    from metaaligner.evaluation.config import EvaluateConfig
    from metaaligner.evaluation.job import run_evaluation
    from metaaligner.serving.batch import run_correction

    rows = released_rows()
    write_csv(tmp_path / "released" / "llama2-chat-7b.csv", rows)
    cfg = _correct_cfg(tmp_path / "released", tmp_path / "corrected", tiny_model_dir)
    summary = run_correction(cfg, LOCAL)
    assert (summary["rows"], summary["errors"], summary["too_long"], summary["input_format"]) == (12, 1, 1, "csv")
    assert summary["duplicate_rows_renumbered"] == 1

    table = pq.read_table(tmp_path / "corrected")
    assert {*COLUMNS, "id", "correction", "objectives_used", "template_used", "prompt_tokens", "completion_tokens",
            "finish_reason", "too_long", "error"} == set(table.column_names)
    got = sorted(table.to_pylist(), key=lambda r: r["id"])
    ids = [expected_id(r) for r in rows[:11]] + [expected_id(rows[0]) + "#2"]
    assert sorted(r["id"] for r in got) == sorted(ids)  # content ids; the duplicate row is numbered
    by_id = {r["id"]: r for r in got}
    for row, rid in zip(rows, ids):  # every input cell survives, multi-line quoted cells and empty goldens alike
        assert {c: by_id[rid][c] for c in COLUMNS} == row
    long_row = by_id[ids[5]]
    assert long_row["too_long"] and long_row["correction"] is None and long_row["error"].startswith("InputTooLong")
    assert all(r["objectives_used"] == ["Harmlessness", "Helpfulness", "Humour"] for r in got)

    with ChatJudgeServer() as server:
        judge = {"kind": "llm", "url": server.url, "model": "gpt-4-turbo-preview", "api_key_env": None,
                 "concurrency": 4, "max_retries": 1, "backoff_s": 0.01, "timeout_s": 5}
        ev = EvaluateConfig(input=str(tmp_path / "corrected"), output=str(tmp_path / "results"), objectives="hh_rlhf",
                            question_column="query", golden="goldens", candidates=["generated_text", "correction"],
                            baseline="generated_text", treatment="correction", judge=judge, bootstrap_samples=100,
                            worker_cpus=0.5)
        evaluated = run_evaluation(ev, LOCAL)
    assert all(len(b["messages"]) == 1 and b["messages"][0]["role"] == "user" and
               b["messages"][0]["content"].startswith("You are a skilled evaluator") for b in server.bodies)
    assert (evaluated["items"], evaluated["quarantined"], evaluated["invalid"]) == (12, 2, 0)
    assert evaluated["quarantined_by_reason"] == {"missing_golden": 2}
    assert evaluated["missing"] == {"generated_text": 0, "correction": 1}  # the failed correction, counted

    results = json.loads((tmp_path / "results" / "results.json").read_text())
    good = [by_id[rid] for rid in ids if by_id[rid]["goldens"]]
    aspects = {o.name: o.render() for o in load_objective_set("hh_rlhf").objectives}
    for objective, aspect in aspects.items():
        per = results["per_objective"][objective]
        assert (per["generated_text"]["judged"], per["generated_text"]["missing"]) == (10, 0)
        assert (per["correction"]["judged"], per["correction"]["missing"]) == (9, 1)
        for cand in ("generated_text", "correction"):  # the stand-in's known verdicts, through the random order
            answered = [r for r in good if r[cand] is not None]
            wins = sum(decide(aspect, r[cand], r["goldens"]) == 1 for r in answered)
            ties = sum(decide(aspect, r[cand], r["goldens"]) == 0 for r in answered)
            assert per[cand]["win_rate"] == pytest.approx(wins / len(answered))
            assert per[cand]["win_tie_rate"] == pytest.approx((wins + ties) / len(answered))
        plus = results["improvement"]["per_objective"][objective]
        assert plus["paired_items"] == 9  # both answers exist on 9 of the 10 judged items
    md = (tmp_path / "results" / "results.md").read_text()
    assert "+ correction − generated_text (pts, paired)" in md and "| Helpfulness |" in md


def test_content_ids_do_not_depend_on_how_the_rows_are_split_into_files(ray_cluster, tmp_path):
    import pyarrow.fs as pafs

    from metaaligner.data.ids import add_content_ids, unique_content_ids
    from metaaligner.data.io.text_csv import read_text_csv

    rows = released_rows()
    write_csv(tmp_path / "one" / "all.csv", rows)
    write_csv(tmp_path / "two" / "a.csv", rows[:4])
    write_csv(tmp_path / "two" / "b.csv", rows[4:])

    def ids(files):
        ds = read_text_csv([str(f) for f in files], pafs.LocalFileSystem())
        ds = ds.map_batches(add_content_ids, batch_format="pyarrow", fn_kwargs={"column": "id"}).materialize()
        ds, renumbered = unique_content_ids(ds, "id")
        return sorted(r["id"] for r in ds.take_all()), renumbered

    whole = ids([tmp_path / "one" / "all.csv"])
    assert whole == ids([tmp_path / "two" / "a.csv", tmp_path / "two" / "b.csv"])
    assert whole == (sorted([expected_id(r) for r in rows[:11]] + [expected_id(rows[0]) + "#2"]), 1)


def test_a_failed_correct_rerun_leaves_the_committed_output_and_explains_itself(ray_cluster, tiny_model_dir,
                                                                                tmp_path):
    from metaaligner.serving.batch import run_correction

    write_csv(tmp_path / "released" / "policy.csv", released_rows()[:9])  # row 5 is the over-long answer
    cfg = _correct_cfg(tmp_path / "released", tmp_path / "corrected", tiny_model_dir)
    run_correction(cfg, LOCAL)
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "corrected").rglob("*") if p.is_file()}

    with pytest.raises(RuntimeError) as err:  # 1 of 9 rows in error is over max_bad_fraction 0.05
        run_correction(cfg.model_copy(update={"max_bad_fraction": 0.05}), LOCAL)
    message = str(err.value)
    assert "1 of 9 input rows (11.1 %) are bad, over max_bad_fraction=0.05; nothing was committed" in message
    assert re.search(r"InputTooLong: 1 rows \(e\.g\. id \w+: InputTooLong: prompt is \d+ tokens", message)
    assert "Hint: check that correct.question_column='query'" in message and "unchanged" in message
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "corrected").rglob("*")
             if p.is_file() and "_staging" not in p.parts}
    assert after == before
    staged = pq.read_table(next((tmp_path / "corrected" / "_staging").iterdir()))  # the errors stay readable
    assert staged.num_rows == 9 and staged.column("error").null_count == 8


def _bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.S | re.M)


def test_reproduce_paper_doc_runs_as_written(ray_cluster, tiny_model_dir, tmp_path):
    """Every bash block of docs/reproduce-paper.md, in order, in one shell: the rehearsal settings (tiny corrector,
    the local judge stand-in) and then the route itself, on a released-format CSV built here. The commands join
    the test session's Ray cluster (RAY_ADDRESS) instead of each starting one."""
    blocks = _bash_blocks((REPO / "docs" / "reproduce-paper.md").read_text(encoding="utf-8"))
    assert len(blocks) >= 3
    write_csv(tmp_path / "released" / "llama2-chat-7b.csv", released_rows())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    corrector = tmp_path / "tiny-corrector"
    shutil.copytree(tiny_model_dir, corrector)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "POLICY_CSV": str(tmp_path / "released" / "llama2-chat-7b.csv"), "OUT": str(tmp_path / "run"),
           "CORRECTOR": str(corrector), "JUDGE_PORT": str(port), "RAY_AUTH_MODE": "disabled",
           "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    env.pop("OPENAI_API_KEY", None)
    script = "set -euo pipefail\n" + "\n".join(blocks)
    proc = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    results = json.loads((tmp_path / "run" / "results" / "results.json").read_text())
    assert results["judge"]["prompt"] == "paper" and results["items"]["quarantined"] == 2
    assert set(results["improvement"]["per_objective"]) == {"Harmlessness", "Helpfulness", "Humour"}
    for name in ("win_rate", "win_tie_rate", "net_win_rate"):  # the doc prints the Table-2 "+" for each rate
        assert re.search(rf"{name}: [+-]\d+\.\d", proc.stdout), proc.stdout[-2000:]
    summary = json.loads((tmp_path / "run" / "corrected" / "_summary.json").read_text())
    assert summary["rows"] == 12 and summary["input_format"] == "csv"
