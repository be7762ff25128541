"""Held-out test questions (issue 17 item 1): the hash split, the last N distinct questions in input order, and the
questions of a file (the released policy CSVs); none of them ever reaches contrastive/ or equal/."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metaaligner.cli import main as cli_main
from metaaligner.config import ReformulateConfig, load_config
from metaaligner.data.io.sources import Sources
from metaaligner.data.reformulate.batch import VectorReformulator
from metaaligner.data.reformulate.holdout import HoldoutSplit, QuestionOverlap, question_key, question_keys
from metaaligner.data.reformulate.holdout_questions import column_values, last_distinct, last_n_split
from metaaligner.data.reformulate.job import run_reformulation
from metaaligner.objectives import load_objective_set
from metaaligner.prompts import get_template
from metaaligner.storage import Storage

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
UF_KEYS = ("instruction_following", "honesty", "truthfulness", "helpfulness")


def uf_row(instruction: str, rng: random.Random) -> dict:
    def completion(j):
        ratings = [rng.choice("12345") for _ in UF_KEYS]
        return {"model": f"m{j}", "response": f"answer {j} to {instruction[:20]} {rng.random():.6f}",
                "annotations": {k: {"Rating": r} for k, r in zip(UF_KEYS, ratings)}}
    return {"instruction": instruction, "completions": [completion(j) for j in range(4)]}


def canonical_rows(questions: list[str]) -> list[dict]:
    return [{"id": f"p{k}", "question": q, "response_1": f"one {k}", "response_2": f"two {k}",
             "preferences": json.dumps({"Calmness": ">", "Politeness": "="})} for k, q in enumerate(questions)]


# -- the split object ------------------------------------------------------------------------------------------

def test_question_sets_match_across_whitespace_and_answer_a_batch_at_once():
    split = HoldoutSplit.of_keys(question_keys(["Why is the sky blue?", "\n\nHuman: hi\n\nAssistant:"]), "questions_from")
    asked = ["Why is the sky  blue?\r\n", "\n\nHuman: hi \n\nAssistant:", "Why is the sea blue?", None]
    assert split.held_out_many(asked).tolist() == [True, True, False, False]
    assert split.held_out_many(pa.array(asked)).tolist() == [True, True, False, False]  # an Arrow column too
    assert [split.held_out(q) for q in asked[:3]] == [True, True, False] and split.active
    hashed = HoldoutSplit(0.4, 3)
    questions = [f"question {k}" for k in range(200)]
    assert hashed.held_out_many(questions).tolist() == [hashed.held_out(q) for q in questions]
    assert 40 < hashed.held_out_many(questions).sum() < 120 and not HoldoutSplit(0.0, 3).active
    assert question_key("a  b") == question_key(" a\nb ") != question_key("ab")


def test_last_distinct_keeps_the_last_n_distinct_questions_in_input_order():
    keys = np.array([1, 2, 3, 2, 4, 5, 4], dtype=np.uint64)
    assert last_distinct(keys, 2).tolist() == [4, 5]
    assert sorted(last_distinct(keys, 4).tolist()) == [2, 3, 4, 5]  # 2 counts at its last occurrence
    assert sorted(last_distinct(keys, 10).tolist()) == [1, 2, 3, 4, 5]


def test_overlap_check_is_independent_of_the_split_decision():
    """A hash split decides on the exact text; the summary's check compares whitespace-collapsed questions, so a
    near-duplicate that the hash sent to training is counted (the check can say something other than 0)."""
    syn = load_objective_set("synthetic")
    seed = next(s for s in range(1000) if HoldoutSplit(0.5, s).held_out("Is it calm?")
                and not HoldoutSplit(0.5, s).held_out("Is it  calm?"))
    reformulator = VectorReformulator("canonical", syn, get_template("paper"), 1, None, HoldoutSplit(0.5, seed))
    out = reformulator(pa.Table.from_pylist(canonical_rows(["Is it calm?", "Is it  calm?"])))
    assert out.counts["holdout_pairs"] == 1 and out.counts["items.contrastive"] + out.counts["items.equal"] == 2
    assert out.overlap.shared_items() == 2
    clean = QuestionOverlap()
    clean.add_training(["other question"], [3])
    clean.add_held(["Is it calm?"])
    assert clean.shared_items() == 0 and clean.shared_items(question_keys(["other  question"])) == 3


def test_questions_are_read_from_csv_json_and_parquet_columns(tmp_path):
    fs = Storage().filesystem(str(tmp_path))[0]
    (tmp_path / "q.csv").write_text('query,goldens\n"line one\nline two ",g\nsecond,\n', encoding="utf-8")
    (tmp_path / "q.json").write_text(json.dumps([{"query": "from an array"}, {"query": 5}, {"other": "x"}]))
    pq.write_table(pa.table({"query": ["from parquet", None]}), tmp_path / "q.parquet")
    assert column_values(Sources("csv", [str(tmp_path / "q.csv")], fs), 0, "query") == ["line one\nline two ",
                                                                                            "second"]
    assert column_values(Sources("jsonl", [str(tmp_path / "q.json")], fs), 0, "query") == ["from an array", None,
                                                                                            None]
    assert column_values(Sources("parquet", [str(tmp_path / "q.parquet")], fs), 0, "query") == ["from parquet", None]
    with pytest.raises(ValueError, match="no column 'question'"):
        column_values(Sources("parquet", [str(tmp_path / "q.parquet")], fs), 0, "question", required=True)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="needs n"):
        ReformulateConfig(input="i", output="o", holdout={"kind": "last_n"})
    with pytest.raises(ValueError, match="not both"):
        ReformulateConfig(input="i", output="o", holdout={"kind": "last_n", "n": 3}, holdout_fraction=0.1)
    with pytest.raises(ValueError, match="fastchat"):
        ReformulateConfig(input="i", output="o", format="fastchat", holdout={"kind": "questions_from", "path": "p"})
    legacy = ReformulateConfig(input="i", output="o", holdout_fraction=0.2, split_seed=4)
    assert (legacy.held_out.kind, legacy.held_out.fraction, legacy.held_out.seed) == ("hash", 0.2, 4)


# -- on Ray ----------------------------------------------------------------------------------------------------

def test_last_n_is_the_input_order_whatever_the_file_split(ray_cluster, storage, tmp_path):
    """Files in sorted order, then rows: the same held-out questions for one file or three (the pre-pass reads each
    file in its own task), and a held-out question's earlier rows are held out too."""
    questions = [f"question {k}" for k in range(30)] + ["question 3"]  # question 3 also among the last
    rows = canonical_rows(questions)
    one, three = tmp_path / "one", tmp_path / "three"
    one.mkdir(), three.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), one / "all.parquet")
    for k, part in enumerate((rows[:11], rows[11:20], rows[20:])):
        pq.write_table(pa.Table.from_pylist(part), three / f"part-{k:02d}.parquet")
    fs = Storage().filesystem(str(tmp_path))[0]
    expected = sorted(question_keys(["question 3", *[f"question {k}" for k in range(25, 30)]]).tolist())
    for folder in (one, three):
        files = sorted(str(p) for p in folder.iterdir())
        assert sorted(last_n_split(Sources("parquet", files, fs), "canonical", 6).keys.tolist()) == expected

    out = tmp_path / "out"
    assert cli_main(["reformulate", "--input", str(three), "--output", str(out), "--objectives", "synthetic",
                     "--holdout-last-n", "6"]) == 0
    s = json.loads((out / "_summary.json").read_text())
    assert s["holdout"] == {"kind": "last_n", "n": 6, "questions": 6}
    assert s["holdout_pairs"] == 7 and s["training_pairs"] == 24  # both rows of question 3
    assert s["training_items_sharing_heldout_question"] == 0
    test = pq.read_table(out / "test").column("question").to_pylist()
    assert sorted(question_keys(test).tolist()) == sorted(question_keys(["question 3"] * 2 + [
        f"question {k}" for k in range(25, 30)]).tolist())


def _policy_csv(path: Path, queries: list[str]) -> None:
    """A stand-in for a released policy CSV (query, goldens, generated_text; pandas' quoting, multi-line cells)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["query", "goldens", "generated_text"])
        for k, q in enumerate(queries):
            writer.writerow([q, "" if k == 0 else f"golden {k}", f"policy answer {k},\nwith a second line"])


def test_paper_ultrafeedback_config_trains_on_no_held_out_query(ray_cluster, storage, tmp_path):
    """Done-when: under the paper UltraFeedback config (its `holdout` as shipped, paths pointed at a small synthetic
    stand-in with the released files' columns), no training item shares a question with the held-out CSVs, and none
    of the planted test queries reaches contrastive/ or equal/."""
    cfg = load_config(CONFIGS / "pipeline-ultrafeedback-13b.yaml").reformulate
    assert cfg.holdout.kind == "questions_from" and cfg.holdout.column == "query"
    assert cfg.holdout.path == load_config(CONFIGS / "pipeline-ultrafeedback-13b.yaml").correct.input  # what Table 2 asks
    rng = random.Random(5)
    planted = [f"Held-out query {k}: explain\nthe {rng.choice(['tides', 'moon', 'rain'])} in detail. " for k in range(6)]
    others = [f"Training instruction {k}?" for k in range(40)]
    (tmp_path / "policy").mkdir()
    _policy_csv(tmp_path / "policy" / "llama2-chat-7b.csv", planted[:4])
    _policy_csv(tmp_path / "policy" / "gpt-3.5-turbo.csv", planted[2:])  # the policy files share their queries
    rows = [uf_row(q, rng) for q in others + planted + planted[:2]]  # two planted queries appear twice
    rng.shuffle(rows)
    (tmp_path / "raw").mkdir()
    for k in range(2):
        part = rows[k::2]
        (tmp_path / "raw" / f"train-{k:05d}-of-00002.json").write_text(json.dumps(part))  # arrays, as HF exports
    cfg = cfg.model_copy(update={"input": str(tmp_path / "raw"), "output": str(tmp_path / "out"),
                                 "holdout": cfg.holdout.model_copy(update={"path": str(tmp_path / "policy")})})
    s = run_reformulation(cfg, storage)

    assert s["training_items_sharing_heldout_question"] == 0
    assert s["holdout"]["kind"] == "questions_from" and s["holdout"]["questions"] == 6
    assert s["rows_read"] == 48 and s["quarantined"] == 0
    assert s["holdout_pairs"] == 8 * 6 and s["training_pairs"] == 40 * 6 and s["test_rows"] == 8
    items = pa.concat_tables([pq.read_table(tmp_path / "out" / sub) for sub in ("contrastive", "equal")])
    prompts = items.column("prompt").to_pylist()
    assert len(prompts) == s["items_total"] > 0
    collapsed = [" ".join(p.split()) for p in prompts]
    assert not [q for q in planted for p in collapsed if " ".join(q.split()) in p]
    assert sum(any(o in p for p in prompts) for o in others) == 40  # the other questions all train
    held = pq.read_table(tmp_path / "out" / "test").column("question").to_pylist()
    assert sorted(held) == sorted(planted + planted[:2])
