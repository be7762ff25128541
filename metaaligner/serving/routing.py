"""Several correctors behind one API: which corrector a request chose, and which model deployment serves it.

`serve.correctors` names correctors, each a base model plus an optional LoRA adapter, its template and objective
set (ServeConfig.named_correctors; without it the one `serve.corrector` is named `served_model_name`). Correctors
on the same base model share one deployment, which loads the base weights once and every adapter of its
correctors; a request's adapter travels in GenerationParams.adapter, so one engine batch may mix them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from metaaligner.serving.config import CorrectorConfig, ServeConfig
from metaaligner.serving.corrector import Prompter
from metaaligner.serving.engines.contract import CorrectionInputError, GenerationParams


class UnknownCorrector(CorrectionInputError):
    """A request named a corrector this server does not serve (404; the message lists the served ones)."""

    status_code = 404


@dataclass(frozen=True)
class Route:
    name: str
    config: CorrectorConfig  # the corrector's full settings: base model, adapter, template, objectives, generation
    prompter: Prompter
    deployment: int  # index into Routes.deployments

    def params(self, params: GenerationParams) -> GenerationParams:
        """The request's generation parameters on this corrector's adapter."""
        return dataclasses.replace(params, adapter=self.config.adapter)


@dataclass(frozen=True)
class Deployment:
    """One model deployment: a base model (engine settings from serve.corrector) and the adapters it serves."""

    config: CorrectorConfig
    adapters: tuple[str, ...]


class Routes:
    """The served correctors by name (the first is the default) and the deployments behind them."""

    def __init__(self, serve: ServeConfig):
        self.routes: dict[str, Route] = {}
        bases: dict[str, list[str]] = {}
        for name, cfg in serve.named_correctors().items():
            adapters = bases.setdefault(cfg.model, [])
            if cfg.adapter and cfg.adapter not in adapters:
                adapters.append(cfg.adapter)
            self.routes[name] = Route(name, cfg, Prompter(cfg), list(bases).index(cfg.model))
        self.deployments = [Deployment(serve.corrector.model_copy(update={"model": model, "adapter": None}),
                                       tuple(adapters)) for model, adapters in bases.items()]
        self.default = next(iter(self.routes.values()))

    @property
    def names(self) -> list[str]:
        return list(self.routes)

    def get(self, name: str | None) -> Route:
        """The named corrector; None: the default one."""
        if name is None:
            return self.default
        route = self.routes.get(name)
        if route is None:
            raise UnknownCorrector(f"unknown corrector {name!r}; this server serves {self.names}")
        return route

    @staticmethod
    def deployment_name(index: int) -> str:
        """`Corrector` for the first base model (the single-corrector name), then `Corrector-2`, ..."""
        return "Corrector" if index == 0 else f"Corrector-{index + 1}"
