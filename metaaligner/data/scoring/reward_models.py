"""Sequence-classification reward models: resolve settings from a folder, encode (prompt, response), score in
length-sorted micro-batches. Safetensors only; trust_remote_code off unless the config opts in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from metaaligner.data.scoring.config import RewardModelConfig
from metaaligner.storage import Storage
from metaaligner.modeling import local_model_dir

UNBOUNDED = 10 ** 9  # tokenizers without a limit report model_max_length ~1e30


@dataclass(frozen=True)
class ModelPlan:
    """A reward model's resolved settings (read from its config and tokenizer, no weights)."""

    name: str
    path: str
    head: int
    sign: int
    input: str  # text | pair | response
    max_length: int
    num_labels: int

    def describe(self) -> dict:
        return dict(self.__dict__)


def _load_tokenizer(folder: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    tok.padding_side = "right"  # absolute-position models (GPT-2) score the same padded or alone
    if tok.pad_token_id is None:
        if tok.eos_token_id is None and tok.unk_token_id is None:
            raise ValueError(f"{folder}: tokenizer has no pad, eos or unk token to pad with")
        tok.pad_token = tok.eos_token if tok.eos_token_id is not None else tok.unk_token
    return tok


def _resolve(spec: RewardModelConfig, config, tokenizer) -> ModelPlan:
    num_labels = int(config.num_labels)
    if isinstance(spec.head, str):
        labels = {str(v): int(k) for k, v in (config.id2label or {}).items()}
        if spec.head not in labels:
            raise ValueError(f"reward model {spec.name}: head {spec.head!r} is not a label of {spec.path} "
                             f"(labels: {sorted(labels)})")
        head = labels[spec.head]
    else:
        head = spec.head
    if not 0 <= head < num_labels:
        raise ValueError(f"reward model {spec.name}: head {head} out of range for {num_labels} labels ({spec.path})")
    positions = getattr(config, "max_position_embeddings", None)
    limits = [n for n in (positions, tokenizer.model_max_length) if isinstance(n, int) and 0 < n < UNBOUNDED]
    if spec.max_length is not None:
        if limits and spec.max_length > min(limits):
            raise ValueError(f"reward model {spec.name}: max_length {spec.max_length} exceeds the model's limit "
                             f"{min(limits)}")
        limits = [spec.max_length]
    if not limits:
        raise ValueError(f"reward model {spec.name}: {spec.path} states no length limit; set max_length")
    mode = spec.input
    if mode == "auto":
        mode = "pair" if tokenizer.sep_token is not None else "text"
    return ModelPlan(spec.name, spec.path, head, spec.sign, mode, min(limits), num_labels)


def inspect_model(spec: RewardModelConfig, storage: Storage) -> ModelPlan:
    """Check a reward model folder (config, tokenizer, safetensors) and resolve its settings, without weights."""
    from transformers import AutoConfig

    folder = local_model_dir(spec.path, storage, weights=False)
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=spec.trust_remote_code)
    return _resolve(spec, config, _load_tokenizer(folder, spec.trust_remote_code))


class RewardModel:
    """One loaded reward model: `encode` (prompt, response) pairs, then `score` the encodings."""

    def __init__(self, spec: RewardModelConfig, storage: Storage, device: str = "cpu", dtype: str = "float32",
                 micro_batch_size: int = 32):
        import torch
        from transformers import AutoModelForSequenceClassification

        folder = local_model_dir(spec.path, storage)
        self.tokenizer = _load_tokenizer(folder, spec.trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            str(folder), use_safetensors=True, trust_remote_code=spec.trust_remote_code, dtype=getattr(torch, dtype),
        ).to(device).eval()
        if self.model.config.pad_token_id is None:  # batched GPT-2 scoring finds the last token by the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.plan = _resolve(spec, self.model.config, self.tokenizer)
        self.device, self.micro_batch_size = device, micro_batch_size
        self._torch = torch

    def _texts(self, prompts: list[str], responses: list[str]) -> tuple[list[str], list[str] | None]:
        if self.plan.input == "pair":
            return prompts, responses
        if self.plan.input == "response":
            return responses, None
        return [p + r for p, r in zip(prompts, responses)], None

    def encode(self, prompts: list[str], responses: list[str], truncate: bool = False) -> list[dict]:
        """One encoding per (prompt, response); untruncated (check `len(e["input_ids"])` against plan.max_length), or
        truncated to plan.max_length as the reference does (`truncation=True`: longest sequence of a pair first)."""
        first, second = self._texts(prompts, responses)
        if not first:
            return []
        limit = {"truncation": True, "max_length": self.plan.max_length} if truncate else {"truncation": False}
        enc = self.tokenizer(first, second, padding=False, verbose=False, **limit)
        return [{k: enc[k][i] for k in enc.keys()} for i in range(len(first))]

    def count(self, texts: list[str]) -> list[int]:
        """Tokens of each text as `tokenizer.encode` gives them (special tokens included): the reference's length
        filter runs on the whole transcripts."""
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]]

    def score(self, encodings: Iterable[dict]) -> np.ndarray:
        """sign * logit[head] per encoding (float64 of the float32 logit), in the given order."""
        encodings = list(encodings)
        out = np.empty(len(encodings), dtype=np.float64)
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i]["input_ids"]))
        for start in range(0, len(order), self.micro_batch_size):
            chunk = order[start:start + self.micro_batch_size]
            batch = self.tokenizer.pad([encodings[i] for i in chunk], padding=True, return_tensors="pt")
            with self._torch.inference_mode():
                logits = self.model(**batch.to(self.device)).logits.float()
            out[chunk] = logits[:, self.plan.head].cpu().numpy().astype(np.float64) * self.plan.sign
        return out


def create_tiny_reward_model(folder: str | Path, texts: Iterable[str], arch: str = "gpt2", num_labels: int = 1,
                             max_positions: int = 256, hidden_size: int = 32, num_layers: int = 2,
                             vocab_size: int = 384, seed: int = 0) -> Path:
    """A randomly initialised tiny GPT-2 or Llama sequence classifier + locally trained tokenizer (tests, benches)."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    from metaaligner.modeling import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if arch == "gpt2":
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=hidden_size, n_layer=num_layers, n_head=2,
                            n_positions=max_positions, num_labels=num_labels, **ids)
        cls = GPT2ForSequenceClassification
    elif arch == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                             num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=2,
                             max_position_embeddings=max_positions, num_labels=num_labels, **ids)
        cls = LlamaForSequenceClassification
    else:
        raise ValueError(f"arch must be gpt2 or llama, got {arch!r}")
    torch.manual_seed(seed)
    model = cls(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # spread the rewards over several units, like real ones
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
