"""Evaluation building blocks on inputs with known answers: verdict parsing, rules, statistics, order, config."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pydantic import ValidationError

from metaaligner.evaluation.cache import CANDIDATE_FIRST, GOLDEN_FIRST, order_for, outcome_for
from metaaligner.evaluation.config import EvaluateConfig, JudgeConfig
from metaaligner.evaluation.judges import build_judge, get_rule_set, rule_score
from metaaligner.evaluation.judges.llm import parse_verdict
from metaaligner.evaluation.stats import (
    Counts, copy_rate, count, improvement_ci, levenshtein, normalized_edit_distance, rate_ci, scores, summarize,
)
from metaaligner.objectives import load_objective_set


@pytest.mark.parametrize("reply, expected", [
    ("1", 1), (" 2. ", 2), ("Tie", 0), ("0", 0), ("Verdict: 2", 2), ("**Verdict:** [[1]]", 1),
    ("Answer 1 mentions X. Answer 2 mentions Y.\nOverall Answer 1 is better.\nVerdict: 2", 2),
    ("I compared them.\n\nFinal answer: tie", 0), ("[[2]]", 2), ("Answer 2 is clearly better than Answer 1.", 2),
    ("Both answers are equally good, it's a tie.", 0), ('"1"', 1), ("Verdict: Answer 1", 1),
    ("", None), (None, None), ("I like turtles.", None), ("Verdict: 3", None), ("Verdict: 12", None),
    ("Answer 1 is better. No wait, Answer 2 is better.", None), ("Perhaps answer 3?", None),
])
def test_parse_verdict(reply, expected):
    assert parse_verdict(reply) == expected


def test_synthetic_rules_match_the_objective_set():
    rules = get_rule_set("synthetic")
    assert list(rules) == load_objective_set("synthetic").names
    good = "Sure. Use a timer. Hope this helps."
    assert all(rule_score("synthetic", o, good) == 1.0 for o in rules)
    assert rule_score("synthetic", "Politeness", "Sure. Use a timer.") == 0.0
    assert rule_score("synthetic", "Conciseness", "It is ReAlLy simple. Hope this helps.") == 0.0
    assert rule_score("synthetic", "Conciseness", "Reality is simple. Hope this helps.") == 1.0  # word boundary
    assert rule_score("synthetic", "Calmness", "Wow! Hope this helps.") == 0.0
    assert rule_score("synthetic", "Capitalization", "Fine. then go. Hope this helps.") == 0.0
    assert rule_score("synthetic", "Capitalization", '"Quoted" start. Next one? Yes! Hope this helps.') == 1.0
    judge = build_judge(JudgeConfig(kind="rules"))
    politeness = load_objective_set("synthetic")["Politeness"]
    assert judge.judge("q", good, "Sure.", politeness).choice == 1
    assert judge.judge("q", "Sure.", good, politeness).choice == 2
    assert judge.judge("q", good, good, politeness).choice == 0
    with pytest.raises(ValueError, match="no rule"):
        judge.judge("q", good, good, load_objective_set("hh_rlhf")["Humour"])
    with pytest.raises(ValueError, match="unknown rule set"):
        get_rule_set("nope")


def test_order_is_seeded_balanced_and_mapped_back():
    orders = [order_for(0, f"i{k}", "Politeness", "corrected") for k in range(400)]
    assert orders == [order_for(0, f"i{k}", "Politeness", "corrected") for k in range(400)]
    assert 150 < orders.count(CANDIDATE_FIRST) < 250
    assert orders != [order_for(1, f"i{k}", "Politeness", "corrected") for k in range(400)]
    assert outcome_for(CANDIDATE_FIRST, 1) == "win" and outcome_for(GOLDEN_FIRST, 1) == "loss"
    assert outcome_for(CANDIDATE_FIRST, 2) == "loss" and outcome_for(GOLDEN_FIRST, 2) == "win"
    assert outcome_for(GOLDEN_FIRST, 0) == "tie" and outcome_for(CANDIDATE_FIRST, None) == "invalid"


def test_counts_and_both_win_rates():
    c = count(["win"] * 5 + ["tie"] * 3 + ["loss"] * 2 + ["invalid"] * 4)
    assert c == Counts(5, 3, 2, 4) and c.total == 10
    assert c.win_rate == pytest.approx(0.8) and c.net_win_rate == pytest.approx(0.3)
    assert Counts(invalid=3).win_rate is None  # invalid verdicts never count as ties
    with pytest.raises(ValueError):
        count(["draw"])


def test_bootstrap_ci_brackets_the_rate_and_is_reproducible():
    values = scores(["win"] * 30 + ["tie"] * 10 + ["loss"] * 60)  # paper win rate 0.4, net -0.3
    lo, hi = rate_ci(values, "win_rate", 2000, seed=3)
    assert lo < 0.4 < hi and hi - lo < 0.25 and lo > 0.25
    assert rate_ci(values, "win_rate", 2000, seed=3) == [lo, hi]
    nlo, nhi = rate_ci(values, "net_win_rate", 2000, seed=3)
    assert nlo < -0.3 < nhi
    assert rate_ci(scores(["tie"] * 20), "win_rate", 500, 0) == [1.0, 1.0]
    assert rate_ci(values, "win_rate", 0, 0) is None and rate_ci(scores([]), "win_rate", 100, 0) is None
    base, treat = scores(["loss"] * 50 + ["win"] * 50), scores(["win"] * 100)
    ilo, ihi = improvement_ci(base, treat, "win_rate", 1000, 0)
    assert 0.3 < ilo < 0.5 < ihi < 0.7


def test_summarize_gives_table2_improvement():
    ids = [f"i{k}" for k in range(10)]
    outcomes = {"Calmness": {"original": dict(zip(ids, ["loss"] * 6 + ["tie"] * 4)),
                             "corrected": dict(zip(ids, ["win"] * 2 + ["tie"] * 6 + ["loss", "invalid"]))}}
    result = summarize(outcomes, ["Calmness"], ["original", "corrected"], "original", "corrected", 200, 0)
    orig, corr = result["per_objective"]["Calmness"]["original"], result["per_objective"]["Calmness"]["corrected"]
    assert (orig["wins"], orig["ties"], orig["losses"], orig["win_rate"]) == (0, 4, 6, 0.4)
    assert (corr["total"], corr["invalid"], corr["win_rate"]) == (9, 1, pytest.approx(8 / 9))
    assert corr["net_win_rate"] == pytest.approx(1 / 9)
    imp = result["improvement"]["per_objective"]["Calmness"]
    assert imp["win_rate"] == pytest.approx(8 / 9 - 0.4) and imp["paired_items"] == 9
    assert result["improvement"]["average"]["win_rate"] == pytest.approx(8 / 9 - 0.4)
    assert result["average"]["corrected"]["win_rate"] == pytest.approx(8 / 9)


def _dp(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_edit_distance_and_copy_rate():
    rng = random.Random(0)
    for _ in range(500):
        a = "".join(rng.choice("ab c") for _ in range(rng.randint(0, 70)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 70)))
        assert levenshtein(a, b) == _dp(a, b)
    assert normalized_edit_distance("Hello  world", "Hello world") == 0.0
    assert normalized_edit_distance("abcd", "abce") == 0.25
    assert normalized_edit_distance("", "") == 0.0 and normalized_edit_distance("", "xy") == 1.0
    result = copy_rate([0.0, 0.05, 0.1, 0.5], threshold=0.1)
    assert (result["copies"], result["n"], result["rate"]) == (3, 4, 0.75)
    assert result["mean_distance"] == pytest.approx(np.mean([0.0, 0.05, 0.1, 0.5]))


def test_config_validation():
    with pytest.raises(ValidationError, match="judge.url"):
        JudgeConfig(kind="llm", model="m")
    with pytest.raises(ValidationError, match="http"):
        JudgeConfig(kind="llm", model="m", url="file:///etc/passwd")
    with pytest.raises(ValidationError, match="model_path"):
        JudgeConfig(kind="reward_model")
    with pytest.raises(ValidationError, match="not in evaluate.candidates"):
        EvaluateConfig(input="x", output="y", candidates=["a"], baseline="a", treatment="b")
    with pytest.raises(ValidationError, match="reserved"):
        EvaluateConfig(input="x", output="y", candidates=["error", "b"], baseline=None, treatment=None)
    with pytest.raises(ValidationError):
        EvaluateConfig(input="x", output="y", bootstrap_samples=10**9)
    assert "api_key" not in str(JudgeConfig(kind="llm", url="http://h/v1", model="m").identity())


def test_committed_sample_set_matches_its_generator():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parent / "data" / "make_eval_sample.py"
    spec = importlib.util.spec_from_file_location("make_eval_sample", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.OUT.read_text(encoding="utf-8") == module.render(module.make_rows())
