"""Per-row semantics of the input formats (no Ray): exact HH ties, UltraFeedback ids and NaN ratings, the
held-out split and its evaluation rows, and the released FastChat sets."""

import json
import random
from collections import Counter

import pytest

from metaaligner.config import ReformulateConfig
from metaaligner.data.contract import Rejected
from metaaligner.data.formats.canonical import validate_pair
from metaaligner.data.formats.fastchat import fastchat, parse_prompt
from metaaligner.data.formats.hh_rlhf import hh_rlhf_scores
from metaaligner.data.formats.ultrafeedback import ultrafeedback
from metaaligner.data.reformulate.algorithm import reformulate_pair
from metaaligner.data.reformulate.holdout import HoldoutSplit
from metaaligner.data.reformulate.oracle import Reformulator
from metaaligner.data.reformulate.owners import LocalIdRegistry
from metaaligner.objectives import load_objective_set
from metaaligner.prompts import CONDITIONS, PROFILES, get_template
from metaaligner.synthetic import make_pair

HH = load_objective_set("hh_rlhf")
UF = load_objective_set("ultrafeedback")
SYN = load_objective_set("synthetic")
UF_KEYS = ("instruction_following", "honesty", "truthfulness", "helpfulness")


def reformulator(fmt, objectives, fraction=0.0, decimals=None, template="paper"):
    return Reformulator(fmt, objectives, get_template(template), 42, decimals, HoldoutSplit(fraction, 3),
                        LocalIdRegistry())


# -- item 2: HH-RLHF score ties are exact ----------------------------------------------------------------------

def hh_row(chosen, rejected):
    row = {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen_response": "a", "rejected_response": "b"}
    for k, (c, r) in enumerate(zip(chosen, rejected), start=1):
        row[f"chosen_score{k}"], row[f"rejected_score{k}"] = c, r
    return row


def test_hh_rlhf_scores_compare_exactly_by_default():
    raw_mean, raw_std = 0.0, 2.0  # raw rewards 1.3 vs 1.4 -> z 0.65 vs 0.70: not a tie in the reference
    z = [(1.3 - raw_mean) / raw_std, (1.4 - raw_mean) / raw_std]
    decimals = ReformulateConfig(input="i", output="o", format="hh_rlhf_scores").tie_decimals
    assert decimals is None
    (record,) = hh_rlhf_scores(hh_row([z[0], 1.0, 0.5], [z[1], 1.0, "0.25"]), HH, Counter())
    assert validate_pair(record, HH, decimals).preferences == {"Harmlessness": "<", "Helpfulness": "=", "Humour": ">"}
    assert validate_pair(record, HH, 1).preferences["Harmlessness"] == "="  # rounding is what made the false tie


def test_score_rounding_stays_the_users_choice_for_canonical_scores():
    assert ReformulateConfig(input="i", output="o").tie_decimals == 1
    assert ReformulateConfig(input="i", output="o", score_decimals=None).tie_decimals is None
    assert ReformulateConfig(input="i", output="o", format="hh_rlhf_scores", score_decimals=2).tie_decimals == 2
    record = {"id": "x", "question": "q", "response_1": "a", "response_2": "b",
              "scores_1": {"Honesty": 0.04}, "scores_2": {"Honesty": 0.01}}
    assert validate_pair(record, UF, 1).preferences == {"Honesty": "="}
    assert validate_pair(record, UF, None).preferences == {"Honesty": ">"}
    with pytest.raises(Rejected, match="finite"):
        validate_pair({**record, "scores_2": {"Honesty": float("nan")}}, UF, None)


# -- item 3: UltraFeedback NaN ratings and content ids ---------------------------------------------------------

def completion(text, ratings):
    return {"model": "m", "response": text, "annotations": {k: {"Rating": v} for k, v in zip(UF_KEYS, ratings)}}


def test_ultrafeedback_nan_rating_is_non_numeric_not_a_tie():
    stats = Counter()
    row = {"instruction": "q", "completions": [completion("a", [float("nan"), "NaN", "inf", "4"]),
                                               completion("b", [float("nan"), "NaN", "5", "4"])]}
    (pair,) = ultrafeedback(row, UF, stats)
    assert pair["preferences"] == {"Helpfulness": "="}
    assert stats["ratings_non_numeric"] == 3


def test_ultrafeedback_ids_are_content_digests():
    shared = "Explain pipes."
    a = {"instruction": shared, "completions": [completion(t, "5432") for t in ("one", "two", "three")]}
    b = {"instruction": shared, "completions": [completion(t, "5432") for t in ("one", "two", "four")]}
    ids_a = [p["id"] for p in ultrafeedback(a, UF, Counter())]
    ids_b = [p["id"] for p in ultrafeedback(b, UF, Counter())]
    assert ids_a[0] == ids_b[0]  # the pair (one, two) is the same content in both records
    assert len(set(ids_a) | set(ids_b)) == 5  # (one,three), (two,three) vs (one,four), (two,four)
    eleven = {"instruction": shared, "completions": [completion(f"answer {k}", "3333") for k in range(11)]}
    ids = [p["id"] for p in ultrafeedback(eleven, UF, Counter())]
    assert len(ids) == len(set(ids)) == 55  # f"{i}{j}" would give (1, 11) and (11, 1) one id


def test_exact_duplicate_ultrafeedback_records_are_caught_as_duplicates():
    row = json.dumps({"instruction": "q", "completions": [completion("x", "5555"), completion("y", "1111")]})
    out = reformulator("ultrafeedback", UF)([row, row], "f.jsonl", "0")
    assert out.counts["valid_pairs"] == 1 and out.counts["quarantined.duplicate_id"] == 1
    assert out.counts["rows_bad"] == 0  # duplicates do not count against max_bad_fraction


# -- item 4: held-out split and evaluation rows ----------------------------------------------------------------

def test_holdout_split_is_a_stable_hash_of_the_question():
    split = HoldoutSplit(0.25, seed=7)
    questions = [f"question {k}" for k in range(4000)]
    held = [q for q in questions if split.held_out(q)]
    assert 0.22 < len(held) / len(questions) < 0.28
    assert held == [q for q in reversed(questions) if HoldoutSplit(0.25, 7).held_out(q)][::-1]
    assert held != [q for q in questions if HoldoutSplit(0.25, 8).held_out(q)]
    assert not any(HoldoutSplit(0.0, 7).held_out(q) for q in questions)
    with pytest.raises(ValueError):
        HoldoutSplit(1.0, 0)


def test_held_out_pairs_become_evaluation_rows_not_items():
    rng = random.Random(1)
    rows = [make_pair(f"s{k}", rng) for k in range(300)]
    out = reformulator("canonical", SYN, fraction=0.3, decimals=1)(rows, "f", "0")
    split = HoldoutSplit(0.3, 3)
    held = {r["id"] for r in rows if split.held_out(r["question"])}
    trained = {i for s in ("contrastive", "equal") for i in out.items[s]["pair_id"]}
    assert held and not held & trained
    c = out.counts
    assert c["holdout_pairs"] == len(held) and c["training_pairs"] == 300 - len(held) == len(trained)
    assert c["test_rows"] + c["holdout_no_golden"] == len(held)  # canonical: golden = the response preferred more often
    test = out.items["test"]
    by_id = {r["id"]: r for r in rows}
    for row_id, golden, (other,) in zip(test["id"], test["golden"], test["candidates"]):
        wins = sum({">": 1, "<": -1, "=": 0}[s] for s in by_id[row_id]["preferences"].values())
        assert (golden, other) == ((by_id[row_id]["response_1"], by_id[row_id]["response_2"]) if wins > 0 else
                                   (by_id[row_id]["response_2"], by_id[row_id]["response_1"]))


def test_hh_and_ultrafeedback_goldens():
    out = reformulator("hh_rlhf_scores", HH, fraction=0.999)([hh_row([0.1, 0.2, 0.3], [0.5, 0.6, 0.7])], "f", "0")
    assert out.items["test"]["golden"] == ["a"] and out.items["test"]["candidates"] == [["b"]]  # golden = chosen
    row = {"instruction": "q", "completions": [completion("low", "1111"), completion("steady", "4443"),
                                               completion("spiky", ["5", "N/A", "5", "5"]), completion("mid", "3333")]}
    out = reformulator("ultrafeedback", UF, fraction=0.999)([row], "f", "0")
    assert out.counts["holdout_pairs"] == 6 and out.counts["test_rows"] == 1 and not out.items["contrastive"]["id"]
    test = {k: v[0] for k, v in out.items["test"].items()}
    # steady and spiky both sum to 15 (N/A adds nothing); the first in input order wins the tie
    assert test["question"] == "q" and test["golden"] == "steady"
    assert test["candidates"] == ["low", "spiky", "mid"]


# -- item 9: released FastChat rows ----------------------------------------------------------------------------

def fastchat_row(prompt, target="the target", row_id=7):
    return {"id": row_id, "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": target}]}


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("condition", CONDITIONS)
def test_fastchat_reads_back_every_template(profile, condition):
    names = ["Humour", "Harmlessness"]
    question, weak = "\n\nHuman: a | pipe; semi: colon?\n\nAssistant:", "weak | answer\nline"
    prompt = get_template(profile).render(condition, HH.render(names), question, weak)
    (item,) = fastchat(fastchat_row(prompt), HH, Counter())
    assert item == {"id": "7", "pair_id": "7", "subset": "contrastive" if condition == "better" else "equal",
                    "condition": condition, "objectives": names, "prompt": prompt, "weak_answer": weak,
                    "target": "the target", "template": profile}
    (stripped,) = fastchat(fastchat_row(prompt.rstrip()), HH, Counter())  # exporters may strip "Edit: "
    assert stripped["weak_answer"] == weak


def test_fastchat_items_match_algorithm_1_items():
    pair = validate_pair({"id": "p", "question": "Why?", "response_1": "R1", "response_2": "R2",
                          "preferences": {"Honesty": ">", "Helpfulness": "<", "Truthfulness": "="}}, UF, None)
    for item in reformulate_pair(pair, UF, get_template("ultrafeedback"), 3):
        (back,) = fastchat(fastchat_row(item["prompt"], item["target"], item["id"]), UF, Counter())
        assert {k: back[k] for k in ("subset", "condition", "objectives", "weak_answer", "target", "template")} == \
               {k: item[k] for k in ("subset", "condition", "objectives", "weak_answer", "target", "template")}


@pytest.mark.parametrize("row,reason", [
    (fastchat_row("Please improve this answer: hello"), "unparseable_prompt"),
    (fastchat_row(get_template("hh_rlhf").render("better", "Wit: be witty", "q", "a")), "unknown_objective"),
    (fastchat_row(get_template("hh_rlhf").render("better", HH.render(["Humour"]), "q | Answer: x", "a")),
     "ambiguous_prompt"),
    (fastchat_row(get_template("paper").render("equal", HH.render(["Humour"]), "q", " ")), "empty_field"),
    ({"id": 1, "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}, "bad_conversation"),
    ({"id": 1, "conversations": "[1, 2, 3]"}, "bad_conversation"),
    ({"id": 1}, "bad_conversation"),
    ({**fastchat_row(get_template("paper").render("better", HH.render(["Humour"]), "q", "a")), "id": [1]}, "wrong_type"),
])
def test_fastchat_rows_that_do_not_parse_are_rejected(row, reason):
    with pytest.raises(Rejected) as e:
        fastchat(row, HH, Counter())
    assert e.value.reason == reason and e.value.detail


def test_fastchat_prompt_parser_names_the_profile():
    prompt = get_template("imhi").render("better", "Correctness: c", "q", "a")
    assert parse_prompt(prompt).profile == "imhi" and parse_prompt(prompt).aspects == "Correctness: c"
