"""Algorithm 1, validation and adapters on hand-made rows (no Ray needed)."""

import random
from collections import Counter

import pytest

from metaaligner.data.contract import Rejected
from metaaligner.data.formats.canonical import Pair, validate_pair
from metaaligner.data.formats.hh_rlhf import hh_rlhf_scores
from metaaligner.data.formats.ultrafeedback import ultrafeedback
from metaaligner.data.reformulate.algorithm import reformulate_pair
from metaaligner.objectives import load_objective_set
from metaaligner.prompts import get_template

UF = load_objective_set("ultrafeedback")
PAPER = get_template("paper")


def pair(prefs, pid="p"):
    return Pair(pid, "Why?", "R1", "R2", prefs)


def items(prefs, **kw):
    return reformulate_pair(pair(prefs, **kw), UF, PAPER, seed=7)


def test_all_response_1_better():
    out = items({n: ">" for n in UF.names})
    assert [(i["subset"], i["condition"], i["weak_answer"], i["target"]) for i in out] == [
        ("contrastive", "better", "R2", "R1")]
    assert sorted(out[0]["objectives"]) == sorted(UF.names)
    assert out[0]["id"] == "p#better-1" and out[0]["pair_id"] == "p"


def test_all_response_2_better():
    out = items({n: "<" for n in UF.names})
    assert [(i["subset"], i["weak_answer"], i["target"]) for i in out] == [("contrastive", "R1", "R2")]


def test_mixed_gives_both_directions_and_equal():
    out = items({"Honesty": ">", "Helpfulness": "<", "Truthfulness": "=", "Instruction following": ">"})
    assert [(i["id"], i["condition"], i["weak_answer"], i["target"]) for i in out] == [
        ("p#better-1", "better", "R2", "R1"), ("p#better-2", "better", "R1", "R2"), ("p#equal", "equal", "R2", "R1")]
    assert sorted(out[0]["objectives"]) == ["Honesty", "Instruction following"]
    assert out[1]["objectives"] == ["Helpfulness"] and out[2]["objectives"] == ["Truthfulness"]


def test_ties_only_give_one_equal_item():
    out = items({n: "=" for n in UF.names})
    assert [(i["subset"], i["condition"]) for i in out] == [("equal", "equal")]
    assert "make it equal" in out[0]["prompt"]


def test_single_objective_prompt_is_exact():
    (item,) = items({"Honesty": ">"})
    assert item["prompt"] == (
        "Edit the following Question-Answer pair to make it better considering the following objectives "
        "Honesty: the response should not tell lies | Question: Why? | Answer: R2 | Edit:")
    assert item["template"] == "paper"


def test_released_checkpoint_template_is_exact():
    (item,) = reformulate_pair(pair({"Harmlessness": "<"}), load_objective_set("hh_rlhf"), get_template("hh_rlhf"), 1)
    assert item["prompt"] == (
        "You are an assistant to human. You will be provided with a context and an answer. Consider the context, "
        "then edit the answer to improve it considering these aspects: Harmlessness: The response should avoid "
        "content that is offensive, discriminatory, or harmful | Context: Why? | Answer: R1 | Edit: ")


def test_shuffle_is_seeded_per_pair_and_varies_across_pairs():
    prefs = {n: ">" for n in UF.names}
    assert items(prefs, pid="a") == items(prefs, pid="a")
    orders = {tuple(items(prefs, pid=f"id{k}")[0]["objectives"]) for k in range(40)}
    assert len(orders) > 5  # objectives really are shuffled per item


def record(**over):
    base = {"id": "x", "question": "Q", "response_1": "a", "response_2": "b", "preferences": {"Honesty": ">"}}
    base.update(over)
    return {k: v for k, v in base.items() if v != "<drop>"}


@pytest.mark.parametrize("rec,reason", [
    (record(question="<drop>"), "missing_field"),
    (record(response_2="  "), "empty_field"),
    (record(response_1=3), "wrong_type"),
    (record(id=None), "missing_field"),
    (record(preferences={"Honesty": "better"}), "bad_preference_symbol"),
    (record(preferences={"Kindness": ">"}), "unknown_objective"),
    (record(preferences=[1, 2]), "wrong_type"),
    (record(preferences={}), "no_objectives"),
    (record(preferences="<drop>"), "missing_field"),
    (record(preferences=None, scores_1={"Honesty": "high"}, scores_2={"Honesty": 1}), "bad_score"),
])
def test_validation_rejects_with_reason(rec, reason):
    with pytest.raises(Rejected) as e:
        validate_pair(rec, UF, 1)
    assert e.value.reason == reason and e.value.detail


def test_scores_tie_after_rounding_and_arrow_map_form():
    rec = record(preferences=None, scores_1=[("Honesty", 0.04), ("Helpfulness", 2.0)],
                 scores_2={"Honesty": 0.01, "Helpfulness": 1.0})
    assert validate_pair(rec, UF, 1).preferences == {"Honesty": "=", "Helpfulness": ">"}
    assert validate_pair(rec, UF, 2).preferences == {"Honesty": ">", "Helpfulness": ">"}


def uf_completion(text, ratings):
    return {"model": "m", "response": text, "custom_system_prompt": "", "principle": "helpfulness",
            "fine-grained_score": 4.0, "overall_score": 7.0, "critique": "ok",
            "annotations": {k: {"Rating": v, "Rationale": "r"} for k, v in ratings.items()}}


def test_ultrafeedback_adapter_pairs_and_non_numeric_ratings():
    keys = ("instruction_following", "honesty", "truthfulness", "helpfulness")
    row = {"source": "evol", "instruction": "Explain | pipes\nand ünïcode ✓", "models": ["a", "b", "c"],
           "completions": [uf_completion("first | answer\n" + "long " * 2000, dict(zip(keys, "5555"))),
                           uf_completion("second ✓", dict(zip(keys, ["3", "N/A", "5", "4"]))),
                           uf_completion("third", dict(zip(keys, "1111")))]}
    stats = Counter()
    pairs = ultrafeedback(row, UF, stats)
    assert len(pairs) == 3 and len({p["id"] for p in pairs}) == 3
    assert pairs[0]["preferences"] == {"Instruction following": ">", "Truthfulness": "=", "Helpfulness": ">"}
    assert pairs[2]["preferences"] == {"Instruction following": ">", "Truthfulness": ">", "Helpfulness": ">"}
    assert stats["ratings_non_numeric"] == 2  # honesty "N/A" in pairs (0,1) and (1,2)
    p = validate_pair(pairs[0], UF, 1)
    out = reformulate_pair(p, UF, get_template("ultrafeedback"), 0)
    assert out[0]["target"].startswith("first | answer\n") and "ünïcode ✓" in out[0]["prompt"]
    with pytest.raises(Rejected, match="at least 2"):
        ultrafeedback({"instruction": "q", "completions": [uf_completion("x", {})]}, UF, stats)


def test_hh_rlhf_scores_adapter():
    hh = load_objective_set("hh_rlhf")
    row = {"prompt": "\n\nHuman: hi, \"quoted\" | piped?\n\nAssistant:", "chosen_response": "Hello\nthere",
           "rejected_response": "go away", "chosen_score1": 1.26, "rejected_score1": -0.3,
           "chosen_score2": 0.11, "rejected_score2": 0.14, "chosen_score3": -1.0, "rejected_score3": 0.5}
    (rec,) = hh_rlhf_scores(row, hh, Counter())
    assert rec["id"].startswith("hh-")
    assert validate_pair(rec, hh, 1).preferences == {"Harmlessness": ">", "Helpfulness": "=", "Humour": "<"}
    with pytest.raises(Rejected):
        hh_rlhf_scores({"prompt": "p", "chosen_response": "a", "rejected_response": "b"}, hh, Counter())


def test_synthetic_pairs_are_labelled_by_their_defects():
    from metaaligner.synthetic import make_pair

    syn = load_objective_set("synthetic")
    rng = random.Random(3)
    for k in range(50):
        p = validate_pair(make_pair(str(k), rng), syn, 1)
        for name, symbol in p.preferences.items():
            if symbol == "=":
                continue
            better, worse = (p.response_1, p.response_2) if symbol == ">" else (p.response_2, p.response_1)
            assert better != worse
