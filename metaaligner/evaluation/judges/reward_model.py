"""Reward-model judge: a Hugging Face sequence-classification folder scores (question, answer) per objective."""

from __future__ import annotations

from metaaligner.evaluation.config import JudgeConfig
from metaaligner.evaluation.judges.base import TIE, Judge, Verdict
from metaaligner.modeling import check_model_folder
from metaaligner.objectives import Objective


class RewardModelJudge(Judge):
    """Higher score wins; |score_a - score_b| <= tie_margin is a tie.

    The head per objective is `heads[objective]`, else the model's id2label entry named like the objective,
    else logit 0 of a single-head model (an unknown objective on a multi-head model is an error).
    """

    def __init__(self, cfg: JudgeConfig):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = check_model_folder(cfg.model_path)
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=cfg.trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(folder), use_safetensors=True, trust_remote_code=cfg.trust_remote_code
        ).to(cfg.device).eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.num_labels = int(self.model.config.num_labels)
        labels = {str(v): int(k) for k, v in (self.model.config.id2label or {}).items()}
        self.heads = {**labels, **(cfg.heads or {})}
        bad = {k: v for k, v in (cfg.heads or {}).items() if not 0 <= v < self.num_labels}
        if bad:
            raise ValueError(f"judge.heads {bad} out of range for a model with {self.num_labels} labels")
        self._torch = torch

    def head(self, objective: str) -> int:
        if objective in self.heads:
            return self.heads[objective]
        if self.num_labels == 1:
            return 0
        raise ValueError(f"reward model has {self.num_labels} heads and none for objective {objective!r}; "
                         "set judge.heads")

    def scores(self, question: str, answers: list[str], objective: Objective) -> list[float]:
        idx = self.head(objective.name)
        enc = self.tokenizer([question] * len(answers), answers, truncation=True, max_length=self.cfg.max_length,
                             padding=True, return_tensors="pt").to(self.cfg.device)
        with self._torch.inference_mode():
            logits = self.model(**enc).logits.float()
        return logits[:, idx].tolist()

    def judge(self, question: str, answer_a: str, answer_b: str, objective: Objective) -> Verdict:
        a, b = self.scores(question, [answer_a, answer_b], objective)
        if abs(a - b) <= self.cfg.tie_margin:
            return Verdict(TIE)
        return Verdict(1 if a > b else 2)

    def close(self) -> None:
        del self.model
