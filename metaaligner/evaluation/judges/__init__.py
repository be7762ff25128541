"""Judges behind one interface; `build_judge(cfg)` picks one from the config."""

from __future__ import annotations

from metaaligner.evaluation.config import JudgeConfig
from metaaligner.evaluation.judges.base import TIE, Comparison, Judge, JudgeUnavailable, Verdict
from metaaligner.evaluation.judges.rules import RULE_SETS, get_rule_set, register_rule_set, rule_score

__all__ = ["TIE", "Comparison", "Judge", "JudgeUnavailable", "Verdict", "RULE_SETS", "build_judge",
           "get_rule_set", "judgeable_objectives", "register_rule_set", "rule_score"]


def judgeable_objectives(cfg: JudgeConfig) -> set[str] | None:
    """Objectives this judge can decide, checked before workers start (None: any objective)."""
    if cfg.kind == "rules":
        return set(get_rule_set(cfg.rules))
    if cfg.kind == "reward_model":
        import json

        from metaaligner.modeling import check_model_folder

        model_cfg = json.loads((check_model_folder(cfg.model_path) / "config.json").read_text(encoding="utf-8"))
        labels = model_cfg.get("id2label") or {}
        if (len(labels) if labels else int(model_cfg.get("num_labels", 1))) == 1:
            return None
        return set(labels.values()) | set(cfg.heads or {})
    return None


def build_judge(cfg: JudgeConfig) -> Judge:
    if cfg.kind == "llm":
        from metaaligner.evaluation.judges.llm import LLMJudge

        return LLMJudge(cfg)
    if cfg.kind == "reward_model":
        from metaaligner.evaluation.judges.reward_model import RewardModelJudge

        return RewardModelJudge(cfg)
    from metaaligner.evaluation.judges.rules import RuleJudge

    return RuleJudge(cfg.rules)
