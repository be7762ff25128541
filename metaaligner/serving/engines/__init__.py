"""Engines behind the Corrector: `hf` (continuous batching, default), `hf_static` (one generate per batch, kept for
comparison), `vllm` (experimental). The contract they implement is `engines.contract`; this module only builds one.
"""

from __future__ import annotations

from typing import Sequence

from metaaligner.serving.engines.contract import Engine


def create_engine(config, storage=None, generator=None, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.05,
                  max_running_requests: int | None = None, adapters: Sequence[str] = ()) -> Engine:
    """The engine named by `config.engine` (a CorrectorConfig); `generator` reuses an already loaded HF model;
    `adapters`: LoRA adapter folders served on the same base weights besides `config.adapter`
    (GenerationParams.adapter chooses one per request)."""
    if config.engine == "vllm":
        from metaaligner.serving.engines.vllm import VLLMEngine

        return VLLMEngine(config, storage, adapters=adapters)
    if generator is None:
        from metaaligner.serving.engines.hf_model import TextGenerator

        generator = TextGenerator(config, storage, adapters=adapters)
    if config.engine == "hf_static":
        from metaaligner.serving.engines.hf_static import StaticHFEngine

        return StaticHFEngine(generator, max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s)
    from metaaligner.serving.engines.hf import ContinuousHFEngine

    return ContinuousHFEngine(generator, config.hf, max_running_requests=max_running_requests)
