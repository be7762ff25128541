"""The Corrector: prompts from objectives + templates, and batched left-padded generation of corrections."""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Iterator, Mapping, Sequence

from metaaligner.config import StorageConfig
from metaaligner.objectives import Objective, load_objective_set, render_objectives
from metaaligner.prompts import PROFILES, get_template
from metaaligner.serving.config import CorrectorConfig, GenerationConfig


class CorrectionInputError(ValueError):
    """A request the corrector cannot serve as given (a 4xx, never a 500)."""

    status_code = 422


class InputTooLong(CorrectionInputError):
    status_code = 413


class UnknownObjectives(CorrectionInputError):
    """Objective names not in the configured set; the message lists the valid ones."""


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float
    top_p: float

    @classmethod
    def resolve(cls, overrides: Mapping | None, defaults: GenerationConfig) -> "GenerationParams":
        """Request overrides on top of the configured defaults, checked against the configured bounds."""
        o = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = set(o) - {"max_new_tokens", "temperature", "top_p"}
        if unknown:
            raise CorrectionInputError(f"unknown generation parameters: {sorted(unknown)}")
        p = cls(int(o.get("max_new_tokens", defaults.max_new_tokens)), float(o.get("temperature", defaults.temperature)),
                float(o.get("top_p", defaults.top_p)))
        if not 1 <= p.max_new_tokens <= defaults.max_new_tokens_limit:
            raise CorrectionInputError(f"max_new_tokens must be in [1, {defaults.max_new_tokens_limit}], got {p.max_new_tokens}")
        if not 0.0 <= p.temperature <= 2.0:
            raise CorrectionInputError(f"temperature must be in [0, 2], got {p.temperature}")
        if not 0.0 < p.top_p <= 1.0:
            raise CorrectionInputError(f"top_p must be in (0, 1], got {p.top_p}")
        return p


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS) or "length"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CorrectionPrompt:
    prompt: str
    objectives: list[str]
    template: str
    condition: str


class Prompter:
    """Model-free half of the corrector: objectives by name or free text, template profiles, prompt text."""

    def __init__(self, config: CorrectorConfig):
        self.config = config
        self.objective_set = load_objective_set(config.objectives)
        self._by_lower = {n.lower(): n for n in self.objective_set.names}

    def objectives(self, specs: Sequence[str | Mapping | Objective]) -> list[Objective]:
        """Names from the configured set (case-insensitive) or free-text {name, description} (unseen objectives)."""
        if not specs:
            raise CorrectionInputError("objectives must not be empty")
        out, unknown = [], []
        for spec in specs:
            if isinstance(spec, Objective):
                out.append(spec)
            elif isinstance(spec, str):
                name = self._by_lower.get(spec.strip().lower())
                if name is None:
                    unknown.append(spec)
                else:
                    out.append(self.objective_set[name])
            elif isinstance(spec, Mapping) and str(spec.get("name", "")).strip() and str(spec.get("description", "")).strip():
                out.append(Objective(str(spec["name"]).strip(), str(spec["description"]).strip()))
            else:
                raise CorrectionInputError(f"an objective is a name or {{name, description}}, got {spec!r}")
        if unknown:
            raise UnknownObjectives(
                f"unknown objectives {unknown} for set {self.objective_set.name!r}; valid names: {self.objective_set.names} "
                "(or give {name, description} for a new objective)")
        names = [o.name.lower() for o in out]
        if len(set(names)) != len(names):
            raise CorrectionInputError(f"duplicate objectives: {[o.name for o in out]}")
        return out

    def build(self, question: str, answer: str, objectives: Sequence, template: str | None = None,
              condition: str | None = None) -> CorrectionPrompt:
        profile = template or self.config.template
        if profile not in PROFILES:
            raise CorrectionInputError(f"unknown template {profile!r}; valid: {list(PROFILES)}")
        cond = condition or self.config.condition
        objs = self.objectives(objectives)
        text = get_template(profile).render(cond, render_objectives(objs), question, answer)
        return CorrectionPrompt(text, [o.name for o in objs], profile, cond)


class PromptEncoder:
    """A tokenizer and the context limits: prompt -> token ids (413 over the limit), new token ids -> Generation."""

    def __init__(self, tokenizer, context_length: int, max_input_tokens: int | None = None):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_input_tokens = max_input_tokens

    def encode(self, prompt: str, max_new_tokens: int) -> list[int]:
        """Token ids of the prompt, or InputTooLong stating the limit."""
        ids = self.tokenizer(prompt)["input_ids"]
        limit = self.context_length - max_new_tokens
        if self.max_input_tokens is not None:
            limit = min(limit, self.max_input_tokens)
        if len(ids) > limit:
            raise InputTooLong(f"prompt is {len(ids)} tokens; the limit is {limit} "
                               f"(context {self.context_length}, max_new_tokens {max_new_tokens})")
        return ids

    def generation(self, new: list[int], prompt_tokens: int) -> Generation:
        """New tokens up to and including EOS (the rest is padding) -> text and usage."""
        eos = self.tokenizer.eos_token_id
        stop = eos in new
        if stop:
            new = new[: new.index(eos) + 1]
        text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        return Generation(text, prompt_tokens, len(new), "stop" if stop else "length")


class IncrementalDetokenizer:
    """Text deltas of a growing token list, never splitting a multi-byte character (a window, not a full re-decode)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix = self.read = 0

    def delta(self, tokens: Sequence[int]) -> str:
        before = self.tokenizer.decode(tokens[self.prefix:self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(tokens[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(tokens)
            return after[len(before):]
        return ""


def _stop_when(events: Sequence[threading.Event]):
    """Stopping criteria for `generate`: row i is done once events[i] is set (checked once per token)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.tensor([e.is_set() for e in events], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Cancelled()])


class TextGenerator:
    """A causal LM and its tokenizer: batched, left-padded generation returning only the new text."""

    def __init__(self, config: CorrectorConfig, storage: StorageConfig | None = None):
        import torch

        from metaaligner.modeling import check_model_folder, load_model, load_tokenizer, local_model_dir

        self.config = config
        self.folder = check_model_folder(local_model_dir(config.model, storage or StorageConfig(), cache_dir=config.cache_dir))
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "float32": torch.float32,
                 "bfloat16": torch.bfloat16, "float16": torch.float16}[config.dtype]
        self.device = device
        self.tokenizer = load_tokenizer(self.folder, trust_remote_code=config.trust_remote_code, padding_side="left")
        self.model = load_model(self.folder, trust_remote_code=config.trust_remote_code, dtype=dtype, device=device).eval()
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 4096)
        self.encoder = PromptEncoder(self.tokenizer, self.context_length, config.max_input_tokens)
        self._lock = threading.Lock()  # one generate at a time per model (batch thread vs stream thread)

    def encode(self, prompt: str, max_new_tokens: int) -> list[int]:
        """Token ids of the prompt, or InputTooLong stating the limit."""
        return self.encoder.encode(prompt, max_new_tokens)

    def _kwargs(self, params: GenerationParams, max_new_tokens: int) -> dict:
        kw = {"max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id,
              "eos_token_id": self.tokenizer.eos_token_id}
        if params.temperature > 0:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self.config.static_cache:
            kw.update(cache_implementation="static", disable_compile=not self.config.compile)
        return kw

    def _inputs(self, batch_ids: list[list[int]]):
        padded = self.tokenizer.pad({"input_ids": batch_ids}, padding=True, return_tensors="pt",
                                    pad_to_multiple_of=self.config.pad_to_multiple_of)
        return {k: v.to(self.device) for k, v in padded.items()}

    def generate(self, batch_ids: Sequence[list[int]], params: Sequence[GenerationParams],
                 cancelled: Sequence[threading.Event] | None = None) -> list[Generation]:
        """One generate call per distinct (temperature, top_p); max_new_tokens is per item (truncated after).
        A row whose `cancelled` event is set stops at its next token (a call whose rows are all done ends)."""
        import torch

        out: list[Generation | None] = [None] * len(batch_ids)
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault((p.temperature, p.top_p), []).append(i)
        for idx in groups.values():
            longest = max(params[i].max_new_tokens for i in idx)
            inputs = self._inputs([list(batch_ids[i]) for i in idx])
            width = inputs["input_ids"].shape[1]
            stop = {"stopping_criteria": _stop_when([cancelled[i] for i in idx])} if cancelled else {}
            with self._lock, torch.inference_mode():
                seqs = self.model.generate(**inputs, **self._kwargs(params[idx[0]], longest), **stop)
            for row, i in enumerate(idx):
                out[i] = self._decode(seqs[row, width:].tolist()[: params[i].max_new_tokens], len(batch_ids[i]))
        return out  # type: ignore[return-value]

    def _decode(self, new: list[int], prompt_tokens: int) -> Generation:
        return self.encoder.generation(new, prompt_tokens)

    def stream(self, ids: list[int], params: GenerationParams,
               cancelled: threading.Event | None = None) -> Iterator[str | Generation]:
        """Text pieces as they are generated, then the final Generation; setting `cancelled` stops the generation."""
        import torch
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        inputs = self._inputs([ids])
        result: list = []

        def run():
            try:
                with self._lock, torch.inference_mode():
                    seqs = self.model.generate(**inputs, streamer=streamer, stopping_criteria=_stop_when(
                        [cancelled or threading.Event()]), **self._kwargs(params, params.max_new_tokens))
                result.append(self._decode(seqs[0, inputs["input_ids"].shape[1]:].tolist(), len(ids)))
            except BaseException as e:  # surfaced in the consumer
                result.append(e)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        for piece in streamer:
            if piece:
                yield piece
        thread.join()
        if isinstance(result[0], BaseException):
            raise result[0]
        yield result[0]


class Corrector:
    """Library entry point: correct (question, answer) pairs for objectives with a MetaAligner model.

    Generation goes through the engine named by `config.engine` (created on first use; `close()` stops it)."""

    def __init__(self, config: CorrectorConfig, storage: StorageConfig | None = None):
        self.config = config
        self.prompter = Prompter(config)
        self.generator = TextGenerator(config, storage) if config.engine != "vllm" else None
        self._storage = storage
        self._engine = None

    @property
    def model_name(self) -> str:
        return self.config.model

    @property
    def engine(self):
        if self._engine is None:
            from metaaligner.serving.engines import create_engine

            self._engine = create_engine(self.config, self._storage, generator=self.generator)
        return self._engine

    def encode(self, prompt: str, max_new_tokens: int) -> list[int]:
        """Prompt -> token ids, InputTooLong (413) over the limit."""
        return self.engine.encode(prompt, max_new_tokens)

    def generate(self, batch_ids: Sequence[list[int]], params: Sequence[GenerationParams]) -> list[Generation]:
        """Synchronous batch through the engine: submit every item, gather the results in order."""
        return self.engine.generate_batch(batch_ids, params)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def correct(self, items: Sequence[Mapping], generation: Mapping | None = None) -> list[dict]:
        """items: {question, answer, objectives, template?}; returns {correction, objectives, template, usage}."""
        params = GenerationParams.resolve(generation, self.config.generation)
        prompts = [self.prompter.build(it["question"], it["answer"], it["objectives"], it.get("template")) for it in items]
        ids = [self.encode(p.prompt, params.max_new_tokens) for p in prompts]
        gens = self.generate(ids, [params] * len(ids))
        return [{"correction": g.text, "objectives": p.objectives, "template": p.template, "finish_reason": g.finish_reason,
                 "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens}}
                for p, g in zip(prompts, gens)]
