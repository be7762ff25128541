"""Engine `hf`: transformers continuous batching over a paged KV cache.

One background scheduler thread (transformers' ContinuousBatchingManager) runs every request, batch and stream
alike: a step decodes one token for every running request and admits waiting ones as cache pages free up, so a
short request never waits for a long one to finish, and there is no lock. Greedy (temperature 0) and sampled
requests share the scheduler: sampling is on for the manager, and a per-request processor keeps only the arg-max
token of greedy rows, which makes them exactly greedy.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from metaaligner.serving.config import HFEngineConfig
from metaaligner.serving.engines.contract import (
    Engine,
    EngineError,
    EngineOverloaded,
    Generation,
    GenerationParams,
    IncrementalDetokenizer,
    claim,
    failure,
)
from metaaligner.serving.engines.hf_model import TextGenerator

log = logging.getLogger(__name__)

CPU_MAX_BATCH_TOKENS = 512  # the sdpa mask is max_batch_tokens x (cache + max_batch_tokens): keep it small on CPU
CPU_KV_MEMORY_SHARE = 0.25  # on CPU the default KV cache takes at most this share of the memory available at start


def _greedy_rows_processor(on_step):
    """A per-request logits processor: rows with greedy=1 keep only their arg-max token (sampling then picks it)."""
    import torch
    from transformers.generation.continuous_batching.cb_logits_processors import ContinuousBatchingLogitsProcessor

    class GreedyRows(ContinuousBatchingLogitsProcessor):
        supported_kwargs = {"greedy": int}
        ignored_kwargs = ()

        def fill_defaults(self, int32_tensor):
            int32_tensor.fill_(1)

        def prepare_tensor_args(self, requests_with_new_token):
            on_step(len(requests_with_new_token))  # host side, once per step: the occupancy histogram
            return torch.tensor([r.state.logit_processor_kwargs.get("greedy", 1) for r in requests_with_new_token],
                                dtype=torch.int32)

        def __call__(self, scores, tensor_arg):
            greedy = tensor_arg[: scores.size(0)].bool().unsqueeze(-1)
            best = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.argmax(-1, keepdim=True), True)
            return scores.masked_fill(greedy & ~best, float("-inf"))

    return GreedyRows()


@dataclass
class _Request:
    queue: asyncio.Queue
    prompt_tokens: int
    stream: bool
    consumed: bool = False
    done: bool = False
    detok: IncrementalDetokenizer | None = field(default=None, repr=False)


def _cpu_page_budget(model, page_size: int) -> int:
    """KV-cache pages that fit in CPU_KV_MEMORY_SHARE of the memory available now (a real model's 8k context times
    64 running requests would ask for tens of GB; requests beyond the pages wait for them)."""
    import psutil

    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    page_bytes = 2 * text.num_hidden_layers * kv_heads * head_dim * page_size * model.dtype.itemsize
    return int(CPU_KV_MEMORY_SHARE * psutil.virtual_memory().available) // page_bytes


class ContinuousHFEngine(Engine):
    name = "hf"

    def __init__(self, generator: TextGenerator, config: HFEngineConfig, max_running_requests: int | None = None):
        super().__init__(generator.encoder)
        try:
            from transformers import GenerationConfig
            from transformers.generation.configuration_utils import ContinuousBatchingConfig
        except ImportError as e:  # pragma: no cover - depends on the installed transformers
            raise EngineError("engine `hf` needs transformers >= 5.24 (continuous batching); "
                              "set corrector.engine: hf_static") from e
        import torch

        self.generator = generator
        model, tok = generator.model, generator.tokenizer
        on_cpu = generator.device == "cpu"
        running = min(config.max_running_requests, max_running_requests or config.max_running_requests)
        blocks = config.kv_cache_blocks
        if blocks is None and on_cpu:  # on CPU the default would take 60 % of RAM: size for the running requests
            # a request holds at most its prompt limit + the new-token limit (not a real model's whole 8k context),
            # and all of them together at most CPU_KV_MEMORY_SHARE of the available memory
            longest = min(generator.context_length, (generator.encoder.max_input_tokens or generator.context_length)
                          + generator.config.generation.max_new_tokens_limit)
            per_request = math.ceil(longest / config.page_size)
            blocks = min(running * per_request, max(per_request, _cpu_page_budget(model, config.page_size))) + 1
        self.cache_pages = blocks  # None: transformers sizes the cache from free GPU memory
        cb = ContinuousBatchingConfig(
            page_size=config.page_size, num_blocks=blocks, max_memory_percent=config.kv_cache_memory_fraction,
            max_batch_tokens=config.max_batch_tokens or (CPU_MAX_BATCH_TOKENS if on_cpu else None),
            max_requests_per_batch=running, per_request_processors=True,
            # a cached prefix is only valid for the adapter that computed it: no sharing when adapters are loaded
            allow_block_sharing=config.prefix_caching and generator.adapters is None,
            seed=config.seed, **({"use_cuda_graph": False} if generator.adapters is not None else {}))
        # Sampling stays on and the warpers exist (sentinel defaults != 1); every request passes its own values.
        gen = GenerationConfig(do_sample=True, temperature=0.5, top_p=0.5, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, max_new_tokens=generator.config.generation.max_new_tokens)
        self.manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        processors = self.manager.logit_processor
        processors.logits_processor.append(_greedy_rows_processor(self._on_step))
        processors.tensors_required += 1
        processors.supported_keys["greedy"] = int
        processors.do_processing = True
        if generator.adapters is not None:  # LoRA adapters chosen per request, mixed within a step (engines/lora.py)
            from metaaligner.serving.engines.lora import route_continuous_batching

            route_continuous_batching(self.manager, generator.adapters)
        self._requests: dict[str, _Request] = {}
        self._closed = False
        self._last_step, self._busy_s, self._busy_steps = None, 0.0, 0  # time between back-to-back steps

        def start():  # started from a daemon thread, the generation thread is a daemon too: exit never hangs on it
            with torch.inference_mode():
                self.manager.start()

        starter = threading.Thread(target=start, daemon=True, name="hf-engine-start")
        starter.start()
        starter.join()

    def _on_step(self, rows: int) -> None:
        now = time.perf_counter()
        if self._last_step is not None and now - self._last_step < 1.0:  # the previous step, not an idle gap
            self._busy_s += now - self._last_step
            self._busy_steps += 1
        self._last_step = now
        if rows:
            self.counters.occupancy[rows] += 1

    def _alive(self) -> None:
        status = self.manager.background_thread_status
        if self._closed or not self.manager.is_running() or status.fatal_error is not None:
            raise EngineOverloaded(f"engine hf is not running (fatal error: {status.fatal_error!r})")

    # -- the seam ---------------------------------------------------------------------------------------------------
    def submit(self, ids: list[int], params: GenerationParams, stream: bool = False) -> str:
        self._alive()
        index = self.generator.adapter_index(params.adapter)  # EngineError for an adapter not loaded here
        adapter = {"adapter": index} if self.generator.adapters is not None else {}
        rid = uuid.uuid4().hex
        req = _Request(asyncio.Queue(), len(ids), stream, detok=IncrementalDetokenizer(self.tokenizer) if stream else None)
        self._requests[rid] = req
        self.manager.register_result_handler(rid, req.queue.put_nowait)  # before add_request: no output is missed
        greedy = params.temperature == 0
        added = self.manager.add_request(
            list(ids), request_id=rid, max_new_tokens=params.max_new_tokens, streaming=stream,
            temperature=1.0 if greedy else float(params.temperature), top_p=1.0 if greedy else float(params.top_p),
            greedy=int(greedy), **adapter)
        if added is None:
            self._forget(rid)
            raise EngineOverloaded("engine hf refused the request (stopping)")
        self.counters.submitted += 1
        return rid

    async def result(self, request_id: str) -> Generation:
        req = claim(self._requests, request_id)
        try:
            while True:
                out = await req.queue.get()
                if out.is_finished():
                    return self._finish(request_id, req, out)
        finally:
            if not req.done:
                self.cancel(request_id)

    async def stream(self, request_id: str) -> AsyncIterator[str | Generation]:
        req = claim(self._requests, request_id)
        if not req.stream:
            raise ValueError("stream() needs a request submitted with stream=True")
        try:
            while True:
                out = await req.queue.get()
                if out.error is None:
                    piece = req.detok.delta(out.generated_tokens)
                    if piece:
                        yield piece
                if out.is_finished():
                    yield self._finish(request_id, req, out)
                    return
        finally:
            if not req.done:
                self.cancel(request_id)

    def cancel(self, request_id: str) -> None:
        req = self._requests.get(request_id)
        if req is None or req.done:
            return
        req.done = True
        self.manager.cancel_request(request_id)
        self._forget(request_id)
        self.counters.cancelled += 1

    def queue_stats(self) -> dict:
        bp = self.manager.batch_processor
        waiting = self.manager.input_queue.qsize()
        running = 0
        if bp is not None:
            waiting += len(bp.scheduler.waiting_requests)
            running = len(bp.scheduler.active_requests)
        return {"requests_waiting": waiting, "requests_running": running, "requests_open": len(self._requests)}

    def stats(self) -> dict:
        """The common stats, the attention path, and the time of back-to-back steps (busy_step_s over busy_steps)."""
        return {**super().stats(), "attention": self.attention_path(), "busy_steps": self._busy_steps,
                "busy_step_s": round(self._busy_s, 4)}

    def attention_path(self) -> dict:
        """What the paged cache's attention runs: the implementation and, for eager/sdpa, the dense mask over the
        whole cache that every step fills (flash kernels read the pages without one); the decode fast path."""
        from transformers.generation.continuous_batching.utils import attn_mask_is_needed

        config = self.generator.model.config
        path = {"implementation": config._attn_implementation, "dense_mask": attn_mask_is_needed(config)}
        processor = self.manager.batch_processor
        if processor is not None:  # sized once the scheduler started
            cache = processor.cache
            rows, cols = cache.max_batch_tokens, cache.max_tokens_read + cache.max_batch_tokens
            path.update(max_batch_tokens=rows, cache_tokens=cache.max_tokens_read,
                        decode_fast_path=bool(cache.max_blocks_per_request))
            if path["dense_mask"]:
                path.update(mask_shape=[rows, cols],
                            mask_mib=round(rows * cols * self.generator.model.dtype.itemsize / 2**20, 1))
        return path

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.manager.stop(block=True, timeout=10)
        except Exception:  # noqa: BLE001 - shutting down; nothing to report to a caller
            log.exception("engine hf: stopping the continuous batching manager failed")

    # -- helpers ----------------------------------------------------------------------------------------------------
    def _finish(self, request_id: str, req: _Request, out) -> Generation:
        req.done = True
        self._forget(request_id)
        if out.error is not None:
            self.counters.failed += 1
            log.error("engine hf: request %s failed: %s", request_id, out.error)
            raise failure(out.error)
        self.counters.finished += 1
        gen = self.encoder.generation(list(out.generated_tokens), req.prompt_tokens)
        self.counters.generated_tokens += gen.completion_tokens
        return gen

    def _forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        router = self.manager.output_router
        with router._lock:  # a cancelled request never finishes, so its handler is not removed by transformers
            router.result_handlers.pop(request_id, None)
