"""Evaluation building blocks on inputs with known answers: verdict parsing, rules, statistics, order, config."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from metaaligner.evaluation.cache import CANDIDATE_FIRST, GOLDEN_FIRST, order_for, outcome_for
from metaaligner.evaluation.config import EvaluateConfig, JudgeConfig
from metaaligner.evaluation.judges import build_judge, get_rule_set, rule_score
from metaaligner.evaluation.judges.llm import parse_verdict
from metaaligner.evaluation.stats import (
    Counts, codes, copy_rate, count, improvement_ci, normalized_edit_distance, rate, rate_ci, summarize,
)
from metaaligner.objectives import load_objective_set


@pytest.mark.parametrize("reply, expected", [
    ("1", 1), (" 2. ", 2), ("Tie", 0), ("0", 0), ("Verdict: 2", 2), ("**Verdict:** [[1]]", 1),
    ("Answer 1 mentions X. Answer 2 mentions Y.\nOverall Answer 1 is better.\nVerdict: 2", 2),
    ("I compared them.\n\nFinal answer: tie", 0), ("[[2]]", 2), ("Answer 2 is clearly better than Answer 1.", 2),
    ("Both answers are equally good, it's a tie.", 0), ('"1"', 1), ("Verdict: Answer 1", 1),
    ("2\n\nResponse 2 addresses the query directly.", 2), ("**0**", 0), (" 1 ", 1),
    ("", None), (None, None), ("I like turtles.", None), ("Verdict: 3", None), ("Verdict: 12", None),
    ("12\nmore", None), ("3\nno", None),
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


@pytest.mark.parametrize("sequence, expected", [
    # wins, ties, losses, invalid -> win_rate, win_tie_rate, net_win_rate, all over judged (invalid included)
    ("W" * 5 + "T" * 3 + "L" * 2 + "I" * 4, (5 / 14, 8 / 14, 3 / 14)),
    ("WTLI", (1 / 4, 2 / 4, 0.0)),
    ("TTTT", (0.0, 1.0, 0.0)),
    ("LLLW", (1 / 4, 1 / 4, -2 / 4)),
    ("IIII", (0.0, 0.0, 0.0)),
])
def test_the_three_rates_on_known_verdict_sequences(sequence, expected):
    outcomes = [{"W": "win", "T": "tie", "L": "loss", "I": "invalid"}[x] for x in sequence]
    c = count(outcomes, missing=2)
    assert c.judged == len(sequence) and c.invalid == sequence.count("I") and c.missing == 2
    assert (c.win_rate, c.win_tie_rate, c.net_win_rate) == pytest.approx(expected)
    values = codes(outcomes)  # the vectorised rates behind the bootstrap agree with the counts
    assert [float(rate(values, n)) for n in ("win_rate", "win_tie_rate", "net_win_rate")] == pytest.approx(expected)
    assert c.as_dict()["judged"] == len(sequence)


def test_rates_need_a_judged_comparison():
    assert Counts(missing=3).win_rate is None and Counts(missing=3).win_tie_rate is None
    with pytest.raises(ValueError):
        count(["draw"])
    with pytest.raises(ValueError, match="unknown rate"):
        rate(codes(["win"]), "paper_rate")


def test_bootstrap_ci_brackets_the_rate_and_is_reproducible():
    values = codes(["win"] * 30 + ["tie"] * 10 + ["loss"] * 60)  # win 0.3, win+tie 0.4, net -0.3
    lo, hi = rate_ci(values, "win_tie_rate", 2000, seed=3)
    assert lo < 0.4 < hi and hi - lo < 0.25 and lo > 0.25
    assert rate_ci(values, "win_tie_rate", 2000, seed=3) == [lo, hi]
    wlo, whi = rate_ci(values, "win_rate", 2000, seed=3)
    assert wlo < 0.3 < whi
    nlo, nhi = rate_ci(values, "net_win_rate", 2000, seed=3)
    assert nlo < -0.3 < nhi
    assert rate_ci(codes(["tie"] * 20), "win_tie_rate", 500, 0) == [1.0, 1.0]
    assert rate_ci(codes(["invalid"] * 20), "win_tie_rate", 500, 0) == [0.0, 0.0]  # invalid is never a tie
    assert rate_ci(values, "win_rate", 0, 0) is None and rate_ci(codes([]), "win_rate", 100, 0) is None
    base, treat = codes(["loss"] * 50 + ["win"] * 50), codes(["win"] * 100)
    ilo, ihi = improvement_ci(base, treat, "win_rate", 1000, 0)
    assert 0.3 < ilo < 0.5 < ihi < 0.7


def test_summarize_gives_table2_improvement_on_paired_items():
    ids = [f"i{k}" for k in range(10)]
    outcomes = {"Calmness": {"original": dict(zip(ids, ["loss"] * 6 + ["tie"] * 4)),
                             "corrected": dict(zip(ids[:9], ["win"] * 2 + ["tie"] * 5 + ["loss", "invalid"]))}}
    result = summarize(outcomes, ["Calmness"], ["original", "corrected"], "original", "corrected", 200, 0,
                       missing={"Calmness": {"corrected": 1}})
    orig, corr = result["per_objective"]["Calmness"]["original"], result["per_objective"]["Calmness"]["corrected"]
    assert (orig["wins"], orig["ties"], orig["losses"], orig["judged"]) == (0, 4, 6, 10)
    assert (orig["win_rate"], orig["win_tie_rate"], orig["net_win_rate"]) == (0.0, 0.4, -0.6)
    assert (corr["judged"], corr["invalid"], corr["missing"]) == (9, 1, 1)
    assert (corr["win_rate"], corr["win_tie_rate"], corr["net_win_rate"]) == pytest.approx((2 / 9, 7 / 9, 1 / 9))
    imp = result["improvement"]["per_objective"]["Calmness"]
    assert imp["paired_items"] == 9  # i9 has no corrected answer: left out of the paired "+"
    base9 = ["loss"] * 6 + ["tie"] * 3  # the baseline on the 9 paired items
    assert imp["win_rate"] == pytest.approx(2 / 9 - 0)
    assert imp["win_tie_rate"] == pytest.approx(7 / 9 - base9.count("tie") / 9)
    assert imp["net_win_rate"] == pytest.approx(1 / 9 - (-6 / 9))
    for name in ("win_rate", "win_tie_rate", "net_win_rate"):
        assert imp[f"{name}_ci"][0] <= imp[name] <= imp[f"{name}_ci"][1]
        assert result["improvement"]["average"][name] == pytest.approx(imp[name])
    assert result["average"]["corrected"]["win_tie_rate"] == pytest.approx(7 / 9)
    assert set(result["rates"]) == {"win_rate", "win_tie_rate", "net_win_rate"}


def test_summarize_does_not_depend_on_the_order_verdicts_arrived_in():
    """A resumed run holds cached verdicts first and fresh ones after; its CIs must equal a fresh run's."""
    rng = np.random.default_rng(3)
    ids = [f"i{k:02d}" for k in range(30)]
    verdicts = {c: dict(zip(ids, rng.choice(["win", "tie", "loss", "invalid"], size=30))) for c in ("base", "treat")}
    shuffled = {c: {i: v[i] for i in rng.permutation(ids)} for c, v in verdicts.items()}
    a, b = ({"Calmness": o} for o in (verdicts, shuffled))
    assert summarize(a, ["Calmness"], ["base", "treat"], "base", "treat", 200, 0) == \
        summarize(b, ["Calmness"], ["base", "treat"], "base", "treat", 200, 0)


def test_edit_distance_and_copy_rate():
    assert normalized_edit_distance("kitten", "sitting") == pytest.approx(3 / 7)
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
        EvaluateConfig(input="x", output="y", candidates=["objectives", "b"], baseline=None, treatment=None)
    with pytest.raises(ValidationError, match="different columns"):
        EvaluateConfig(input="x", output="y", question_column="original")
    with pytest.raises(ValidationError, match="prompt"):
        JudgeConfig(kind="llm", url="http://h/v1", model="m", prompt="gpt")
    with pytest.raises(ValidationError):
        EvaluateConfig(input="x", output="y", bootstrap_samples=10**9)
    judge = JudgeConfig(kind="llm", url="http://h/v1", model="m")
    assert "api_key" not in str(judge.identity()) and judge.prompt == "paper"
    # the prompt is part of the judge identity: each prompt has its own resume cache
    assert judge.identity() != judge.model_copy(update={"prompt": "released"}).identity()


def test_committed_sample_set_matches_its_generator():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parent / "data" / "make_eval_sample.py"
    spec = importlib.util.spec_from_file_location("make_eval_sample", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.OUT.read_text(encoding="utf-8") == module.render(module.make_rows())


def test_too_long_share_is_shown_next_to_a_plus_only_above_one_percent():
    from metaaligner.evaluation.too_long import flag, improvement_lines, too_long_note, too_long_shares

    assert [flag(v) for v in (True, False, "true", "False", "1", None)] == [True, False, True, False, True, None]
    outcomes = {"A": {"base": {f"i{k}": "loss" for k in range(200)}, "treat": {f"i{k}": "win" for k in range(200)}},
                "B": {"base": {"i0": "tie", "i1": "tie"}, "treat": {"i0": "win", "i1": "tie"}}}
    valid = [{"id": "i0", "too_long": True}, {"id": "i1", "too_long": False}]
    report = {"too_long": too_long_shares("too_long", "base", "treat", outcomes, ["A", "B"], valid),
              "improvement": {"baseline": "base", "treatment": "treat", "average": {"win_rate": 0.75},
                              "per_objective": {"A": {"win_rate": 1.0}, "B": {"win_rate": 0.5}}}}
    assert report["too_long"]["per_objective"]["A"]["share"] == 0.005 and too_long_note(report, "A") == ""
    assert too_long_note(report, "B") == " (too_long 50.0 %)" and too_long_note(report, None) == ""
    assert improvement_lines(report)[0].endswith("A +100.0; B +50.0 (too_long 50.0 %); average +75.0")
    assert improvement_lines({**report, "too_long": None})[0].endswith("A +100.0; B +50.0; average +75.0")
