"""The Corrector: prompts from objectives + templates, and batched left-padded generation of corrections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Sequence

from metaaligner.chat_wrapper import wrap
from metaaligner.storage import Storage, StorageConfig
from metaaligner.objectives import Objective, load_objective_set, render_objectives
from metaaligner.prompts import PROFILES, get_template
from metaaligner.serving.config import CorrectorConfig
from metaaligner.serving.engines import create_engine
from metaaligner.serving.engines.contract import CorrectionInputError, Generation, GenerationParams
from metaaligner.serving.engines.hf_model import TextGenerator


class UnknownObjectives(CorrectionInputError):
    """Objective names not in the configured set; the message lists the valid ones."""


@dataclass(frozen=True)
class CorrectionPrompt:
    prompt: str
    objectives: list[str]
    template: str
    condition: str


class Prompter:
    """Model-free half of the corrector: objectives by name or free text, template profiles, prompt text (wrapped in
    the model's chat wrapper)."""

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
        return CorrectionPrompt(wrap(text, self.config.chat_wrapper), [o.name for o in objs], profile, cond)


class Corrector:
    """Library entry point: correct (question, answer) pairs for objectives with a MetaAligner model.

    Generation goes through the engine named by `config.engine` (created on first use; `close()` stops it)."""

    def __init__(self, config: CorrectorConfig, storage: Storage | StorageConfig | None = None):
        storage = Storage.of(storage)
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
            self._engine = create_engine(self.config, self._storage, generator=self.generator)
        return self._engine

    def encode(self, prompt: str, max_new_tokens: int) -> list[int]:
        """Prompt -> token ids, InputTooLong (413) over the limit."""
        return self.engine.encode(prompt, max_new_tokens)

    def generate(self, batch_ids: Sequence[list[int]], params: Sequence[GenerationParams]) -> list[Generation]:
        """Synchronous batch through the engine: submit every item, gather the results in order (with this
        corrector's adapter, `config.adapter`, where the params name none)."""
        params = [p if p.adapter else dataclasses.replace(p, adapter=self.config.adapter) for p in params]
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
