"""The evaluation job on Ray Data: rule and LLM judges, S3 and local outputs, quarantine, resume, reports, CLI."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from evaluation_server import ChatJudgeServer
from PIL import Image

from metaaligner.cli import main
from metaaligner.evaluation.cache import ResultCache
from metaaligner.evaluation.config import EvaluateConfig, JudgeConfig
from metaaligner.evaluation.job import run_evaluation
from metaaligner.evaluation.judges import rule_score
from metaaligner.storage import Storage, StorageConfig

REPO = Path(__file__).resolve().parents[1]
GOLDEN = "Sure. Use a timer. Hope this helps."
LOCAL = Storage(StorageConfig(endpoint_url=None))


def _answer(polite: bool, calm: bool) -> str:
    return ("Sure! Use a timer." if not calm else "Sure. Use a timer.") + (" Hope this helps." if polite else "")


def _rows() -> list[dict]:
    """10 good rows with known outcomes plus 2 bad ones. Original: impolite in rows 0-5, agitated in even rows;
    corrected: impolite only in row 0. So Politeness 40 % -> 90 %, Calmness 50 % -> 100 %, others 100 %."""
    rows = [{"id": i, "question": f"How do I time thing {i}?", "golden": GOLDEN,
             "original": _answer(polite=i >= 6, calm=i % 2 == 1), "corrected": _answer(polite=i >= 1, calm=True),
             "objectives": None, "too_long": i == 0} for i in range(10)]  # as `correct` flags it
    rows.append({"id": "no-golden", "question": "q", "golden": None, "original": "a", "corrected": "b",
                 "objectives": None})
    rows.append({"id": "bad-objective", "question": "q", "golden": "g", "original": "a", "corrected": "b",
                 "objectives": ["Humour"]})
    return rows


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def _png_ok(data: bytes) -> None:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG" and image.size == (800, 450)
    assert len(set(image.convert("L").getdata())) > 10  # something was drawn


def _check_known_rates(results: dict) -> None:
    """The golden answer meets every rule, so a candidate can at best tie it: win rate 0, win+tie rate = share of
    rows meeting the rule, net win rate = that share - 1."""
    per = results["per_objective"]
    expected = {"Politeness": (0.4, 0.9), "Calmness": (0.5, 1.0), "Conciseness": (1.0, 1.0),
                "Capitalization": (1.0, 1.0)}
    for objective, (orig, corr) in expected.items():
        for cand, share in (("original", orig), ("corrected", corr)):
            r = per[objective][cand]
            assert (r["judged"], r["invalid"], r["missing"], r["win_rate"]) == (10, 0, 0, 0.0), (objective, cand)
            assert r["win_tie_rate"] == pytest.approx(share) and r["net_win_rate"] == pytest.approx(share - 1)
    assert per["Politeness"]["original"]["losses"] == 6 and per["Politeness"]["original"]["ties"] == 4
    politeness = results["improvement"]["per_objective"]["Politeness"]
    assert (politeness["win_rate"], politeness["paired_items"]) == (0.0, 10)
    assert politeness["win_tie_rate"] == pytest.approx(0.5) and politeness["net_win_rate"] == pytest.approx(0.5)
    assert results["improvement"]["average"]["win_tie_rate"] == pytest.approx((0.5 + 0.5) / 4)


def test_rule_judge_on_s3_with_quarantine_reports_and_resume(ray_cluster, s3_bucket, storage):
    base = f"s3://{s3_bucket}/eval"
    storage.write_text(f"{base}/input/items.jsonl", _jsonl(_rows()))
    cfg = EvaluateConfig(input=f"{base}/input", output=f"{base}/out", bootstrap_samples=200, batch_size=16,
                         copy_threshold=0.0)
    printed = []
    summary = run_evaluation(cfg, storage, log=printed.append)
    assert (summary["items"], summary["quarantined"], summary["judged"], summary["invalid"]) == (12, 2, 80, 0)

    results = storage.read_json(f"{base}/out/results.json")
    _check_known_rates(results)
    assert {q["id"]: (q["reason"], q["error"]) for q in results["quarantine"]} == {
        "no-golden": ("missing_golden", "missing golden answer ('golden')"),
        "bad-objective": ("unknown_objective", "unknown objective(s) ['Humour']")}
    assert results["copy_rate"]["copies"] == 2 and results["copy_rate"]["n"] == 10  # rows 7 and 9 are unchanged
    quarantine = storage.read_text(f"{base}/out/_quarantine.jsonl").splitlines()
    assert len(quarantine) == 2
    md = storage.read_text(f"{base}/out/results.md")
    assert "| Politeness | 40.0 [" in md and "+50.0" in md and "wins / judged (the paper's Algorithm 2" in md
    # one item in ten kept its original answer as too long: its share stands next to every "+"
    assert results["too_long"]["per_objective"]["Politeness"] == {"items": 10, "too_long": 1, "share": 0.1}
    plus_rows = [ln for ln in md.splitlines() if re.search(r"\| [+-]\d+\.\d[^|]* \|$", ln)]  # rows ending in a "+"
    assert len(plus_rows) == 3 * (len(results["objectives"]) + 1)  # three rates: each objective and the average
    assert all(ln.endswith("(too_long 10.0 %) |") for ln in plus_rows) and md.count("(too_long 10.0 %)") == len(plus_rows)
    assert "Politeness +0.0 (too_long 10.0 %)" in printed[-2] and "pulls the \"+\" toward 0" in printed[-1]
    assert storage.read_json(f"{base}/out/_SUCCESS")["job"] == "evaluate"
    fs, path = storage.filesystem(f"{base}/out/win_rates.png")
    with fs.open_input_stream(path) as f:
        _png_ok(f.read())
    assert not storage.exists(f"{base}/out/zero_shot.png")

    again = run_evaluation(cfg, storage)  # everything comes from the resume cache on S3
    assert (again["judged"], again["reused_from_cache"]) == (0, 80)
    assert storage.read_json(f"{base}/out/results.json")["per_objective"] == results["per_objective"]


def test_llm_judge_through_ray_data_resumes_after_an_interrupted_run(ray_cluster, tmp_path):
    rows = _rows()[:10] + [
        {"id": "garbage", "question": "GARBAGE?", "golden": GOLDEN, "original": GOLDEN, "corrected": GOLDEN,
         "objectives": None},
        {"id": "busy", "question": "BUSY?", "golden": GOLDEN, "original": _answer(False, True),
         "corrected": GOLDEN, "objectives": ["Politeness"]},
    ]
    (tmp_path / "in.jsonl").write_text(_jsonl(rows))
    with ChatJudgeServer() as server:
        judge = JudgeConfig(kind="llm", url=server.url, model="judge-test", api_key_env=None, concurrency=1,
                            max_retries=1, backoff_s=0.01, max_backoff_s=0.02, timeout_s=5, invalid_retries=1)
        cfg = EvaluateConfig(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out"), judge=judge,
                             bootstrap_samples=100, batch_size=8, workers=1, worker_cpus=0.5)
        total = 10 * 8 + 8 + 2
        server.fail_after = 30
        with pytest.raises(RuntimeError, match="unreachable after 2 attempts.*verdicts are kept.*resume"):
            run_evaluation(cfg, LOCAL)
        cached = ResultCache(cfg.output, judge.identity(), LOCAL).load()
        assert server.judgments == 30 and 30 <= len(cached) < total
        cached_invalid = sum(r["outcome"] == "invalid" for r in cached.values())
        assert len(cached) - cached_invalid == 30  # every successful judgment of the failed run was kept

        server.fail_after = None
        before = server.judgments
        summary = run_evaluation(cfg, LOCAL)
    assert summary["reused_from_cache"] == len(cached) and summary["judged"] == total - len(cached)
    assert server.judgments - before == (total - len(cached)) - (8 - cached_invalid)  # only the missing items
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["invalid"]["count"] == 8 and summary["invalid"] == 8 and results["invalid"]["rejected"] == 0
    assert {e["id"] for e in results["invalid"]["examples"]} == {"garbage"}
    per = results["per_objective"]
    assert per["Politeness"]["original"]["invalid"] == 1 and per["Politeness"]["original"]["judged"] == 12
    assert per["Politeness"]["original"]["win_tie_rate"] == pytest.approx(4 / 12)  # 'busy' loses, 'garbage' invalid
    assert per["Calmness"]["original"]["win_tie_rate"] == pytest.approx(5 / 11)
    assert per["Calmness"]["original"]["judged"] == 11
    _png_ok((tmp_path / "out" / "win_rates.png").read_bytes())


def test_cli_on_the_sample_set(ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "sample"
    assert main(["evaluate", "--config", "jobs/configs/evaluate-sample.yaml", "--output", str(out)]) == 0
    assert "results.json" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    rows = [json.loads(line) for line in (REPO / "metaaligner/resources/eval_sample.jsonl").read_text().splitlines()]
    good = [r for r in rows if r["golden"]]
    assert results["items"] == {"total": len(rows), "evaluated": len(good), "quarantined": len(rows) - len(good),
                                "duplicate_rows_renumbered": 0}
    for objective in results["objectives"]:  # independent check: golden meets every rule, so ties are passes
        for cand in results["candidates"]:
            expected = sum(rule_score("synthetic", objective, r[cand]) for r in good) / len(good)
            assert results["per_objective"][objective][cand]["win_tie_rate"] == pytest.approx(expected)
            assert results["per_objective"][objective][cand]["win_rate"] == 0.0
    assert results["zero_shot"]["win_tie_rate"]["Politeness"][1] == 1.0
    assert "| Politeness |" in (out / "results.md").read_text()
    for name in ("win_rates.png", "zero_shot.png"):
        _png_ok((out / name).read_bytes())
    assert json.loads((out / "_summary.json").read_text())["comparisons"] == len(good) * 4 * 6


def test_bad_input_fails_before_judging(ray_cluster, tmp_path):
    (tmp_path / "a.jsonl").write_text(_jsonl([{"id": 1, "question": "q", "golden": "g", "original": "a"}]))
    cfg = EvaluateConfig(input=str(tmp_path / "a.jsonl"), output=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['corrected'\]"):
        run_evaluation(cfg, LOCAL)
    row = {"id": 1, "question": "q", "golden": "g", "original": "a", "corrected": "b"}
    (tmp_path / "b.jsonl").write_text(_jsonl([row, row]))
    with pytest.raises(ValueError, match="duplicate id"):
        run_evaluation(cfg.model_copy(update={"input": str(tmp_path / "b.jsonl")}), LOCAL)
    with pytest.raises(ValueError, match="Humour"):
        run_evaluation(cfg.model_copy(update={"evaluate_objectives": ["Humour"]}), LOCAL)
    assert not (tmp_path / "o" / "_cache").exists()


def test_rejected_comparisons_are_invalid_uncached_asked_again_and_gate_the_exit_code(ray_cluster, tmp_path):
    """A per-item 400 from the judge (e.g. context length) makes that comparison invalid, the run goes on, the
    verdict is not cached (a rerun asks again), and a run over max_invalid_fraction commits its results but exits
    non-zero."""
    rows = _rows()[:10] + [{"id": f"long{k}", "question": f"HTTP400 too long {k}", "golden": GOLDEN,
                            "original": "a", "corrected": "b", "objectives": ["Politeness"]} for k in range(2)]
    (tmp_path / "in.jsonl").write_text(_jsonl(rows))
    with ChatJudgeServer() as server:
        config = {"evaluate": {"input": str(tmp_path / "in.jsonl"), "output": str(tmp_path / "out"),
                               "bootstrap_samples": 50, "batch_size": 16, "worker_cpus": 0.5,
                               "judge": {"kind": "llm", "url": server.url, "model": "judge-test",
                                         "api_key_env": None, "concurrency": 4, "max_retries": 1,
                                         "backoff_s": 0.01, "timeout_s": 5}}}
        (tmp_path / "eval.yaml").write_text(json.dumps(config))
        assert main(["evaluate", "--config", str(tmp_path / "eval.yaml")]) == 0
        results = json.loads((tmp_path / "out" / "results.json").read_text())
        invalid = results["invalid"]
        assert (invalid["count"], invalid["rejected"], invalid["unparseable"]) == (4, 4, 0)
        assert results["invalid"]["fraction"] == pytest.approx(4 / 84)
        assert {e["reason"] for e in results["invalid"]["examples"]} == {"rejected"}
        assert results["per_objective"]["Politeness"]["corrected"]["judged"] == 12  # invalid counts as judged
        cache = ResultCache(str(tmp_path / "out"), JudgeConfig.model_validate(config["evaluate"]["judge"]).identity(),
                            LOCAL).load()
        assert len(cache) == 80 and not any(k[0].startswith("long") for k in cache)
        first_run = json.loads((tmp_path / "out" / "_SUCCESS").read_text())["run_id"]

        before = server.requests
        assert main(["evaluate", "--config", str(tmp_path / "eval.yaml"), "--max-invalid-fraction", "0.01"]) == 2
        assert server.requests - before == 4  # only the rejected comparisons are asked again
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert again["invalid"]["rejected"] == 4 and again["per_objective"] == results["per_objective"]
    assert json.loads((tmp_path / "out" / "_SUCCESS").read_text())["run_id"] != first_run  # committed anyway


def test_too_many_bad_rows_stop_before_judging_and_keep_the_previous_output(ray_cluster, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "items.jsonl").write_text(_jsonl(_rows()[:10]))
    cfg = EvaluateConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), bootstrap_samples=0)
    run_evaluation(cfg, LOCAL)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}

    bad = [{**r, "golden": ""} for r in _rows()[:7]] + _rows()[7:10]  # 7 of 10 rows have no golden answer
    (tmp_path / "in" / "items.jsonl").write_text(_jsonl(bad))
    with pytest.raises(RuntimeError) as err:
        run_evaluation(cfg, LOCAL)
    message = str(err.value)
    assert "7 of 10 input rows" in message and "max_bad_fraction=0.5" in message
    assert re.search(r"missing_golden: 7 rows \(e\.g\. id \d: missing golden answer \('golden'\)\)", message)
    assert "Hint: check that evaluate.question_column" in message and "_staging" in message
    after = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    assert after == before  # nothing committed: the previous results are untouched
    staged = list((tmp_path / "out" / "_staging").glob("*/_quarantine.jsonl"))
    assert len(staged) == 1 and len(staged[0].read_text().splitlines()) == 7  # the sample stays readable

    ok = run_evaluation(cfg.model_copy(update={"max_bad_fraction": 0.8}), LOCAL)
    assert ok["quarantined"] == 7 and not (tmp_path / "out" / "_staging").exists()


def test_output_equal_to_inside_or_containing_the_input_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "items.jsonl").write_text(_jsonl(_rows()[:2]))
    for output in (tmp_path / "in", tmp_path / "in" / "results", tmp_path):
        with pytest.raises(ValueError, match="output .* (is the input|inside the input|contains the input)"):
            run_evaluation(EvaluateConfig(input=str(tmp_path / "in"), output=str(output)), LOCAL)
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["items.jsonl"]


def test_an_incomplete_earlier_output_is_refused_as_input(tmp_path):
    """A folder with `_staging/` but no `_SUCCESS` is a run of ours that never committed: not an input."""
    staged = tmp_path / "corrected" / "_staging" / "20260101T000000-deadbeef"
    staged.mkdir(parents=True)
    (staged / "part-0.jsonl").write_text(_jsonl(_rows()[:2]))
    with pytest.raises(RuntimeError, match="incomplete run"):
        run_evaluation(EvaluateConfig(input=str(tmp_path / "corrected"), output=str(tmp_path / "out")), LOCAL)
