"""Reward-model judge on a tiny locally built sequence-classification folder (safetensors only)."""

from __future__ import annotations

import shutil

import pytest

from metaaligner.evaluation.config import JudgeConfig
from metaaligner.evaluation.judges import build_judge, judgeable_objectives
from metaaligner.objectives import load_objective_set

SYNTH = load_objective_set("synthetic")
ANSWERS = ["Sure. Use a timer. Hope this helps.", "sure! It is really easy.", "Thank you for asking."]


@pytest.fixture(scope="module")
def reward_dir(tiny_model_dir, tmp_path_factory):
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_labels = len(SYNTH.names)
    config.id2label = dict(enumerate(SYNTH.names))
    config.label2id = {n: i for i, n in enumerate(SYNTH.names)}
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("reward")
    LlamaForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def test_scores_decide_with_a_tie_margin_and_order_symmetry(reward_dir):
    cfg = JudgeConfig(kind="reward_model", model_path=str(reward_dir))
    assert judgeable_objectives(cfg) == set(SYNTH.names)
    judge = build_judge(cfg)
    for objective in SYNTH.objectives:
        scores = judge.scores("How?", ANSWERS, objective)
        assert len(set(scores)) == 3  # a random head still separates different answers
        for i, j in ((0, 1), (1, 2), (0, 2)):
            v = judge.judge("How?", ANSWERS[i], ANSWERS[j], objective).choice
            assert v == (1 if scores[i] > scores[j] else 2)
            assert judge.judge("How?", ANSWERS[j], ANSWERS[i], objective).choice == 3 - v
        assert judge.judge("How?", ANSWERS[0], ANSWERS[0], objective).choice == 0
    wide = build_judge(cfg.model_copy(update={"tie_margin": 1e6}))
    assert {wide.judge("How?", a, b, SYNTH["Calmness"]).choice for a in ANSWERS for b in ANSWERS} == {0}
    remapped = build_judge(cfg.model_copy(update={"heads": {"Calmness": 0}}))
    assert remapped.scores("How?", ANSWERS, SYNTH["Calmness"]) == pytest.approx(
        judge.scores("How?", ANSWERS, SYNTH["Politeness"]), abs=1e-5)
    with pytest.raises(ValueError, match="none for objective 'Humour'"):
        judge.judge("How?", "a", "b", load_objective_set("hh_rlhf")["Humour"])
    with pytest.raises(ValueError, match="out of range"):
        build_judge(cfg.model_copy(update={"heads": {"Calmness": 9}}))


def test_only_safetensors_folders_load(reward_dir, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(reward_dir, pickled)
    for f in pickled.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ValueError, match="safetensors"):
        build_judge(JudgeConfig(kind="reward_model", model_path=str(pickled)))
