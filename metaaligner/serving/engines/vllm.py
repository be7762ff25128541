"""Engine `vllm` (experimental): vLLM's AsyncLLM, imported lazily.

Install with the `ray[llm]==2.60.0` extra (which pins vLLM 0.29 for torch 2.13) on a GPU machine. Not yet run by
this project: vLLM cannot be installed on the development machine nor carried to the GPU machine, so its contract
tests run only where `import vllm` works and a GPU is present.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Sequence

from metaaligner.serving.config import CorrectorConfig
from metaaligner.serving.engines.contract import (
    Engine,
    EngineError,
    Generation,
    GenerationParams,
    IncrementalDetokenizer,
    PromptEncoder,
    failure,
)


def vllm_available() -> bool:
    """vLLM imports and a CUDA GPU is visible (where the vllm contract tests run)."""
    try:
        import torch
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not here"
        return False
    return torch.cuda.is_available()


@dataclass
class _Request:
    queue: asyncio.Queue
    task: asyncio.Task
    prompt_tokens: int
    detok: IncrementalDetokenizer
    consumed: bool = False
    done: bool = False


class VLLMEngine(Engine):
    name = "vllm"

    def __init__(self, config: CorrectorConfig, storage=None, adapters: Sequence[str] = ()):
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise EngineError("engine `vllm` needs vLLM (pip install 'ray[llm]==2.60.0' on a GPU machine); "
                              "use engine: hf") from e
        from metaaligner.storage import Storage
        from metaaligner.modeling import check_model_folder, load_tokenizer, local_adapter_dir, local_model_dir

        storage = Storage.of(storage)
        folder = check_model_folder(local_model_dir(config.model, storage, cache_dir=config.cache_dir))
        keys = list(dict.fromkeys([*([config.adapter] if config.adapter else []), *adapters]))
        # LoRA adapters as vLLM LoRA requests (experimental, like this engine): one id per adapter folder
        self._loras = {key: (i + 1, local_adapter_dir(key, storage, config.cache_dir)) for i, key in enumerate(keys)}
        ranks = [json.loads((path / "adapter_config.json").read_text())["r"] for _, path in self._loras.values()]
        lora_args = {"enable_lora": True, "max_loras": len(ranks), "max_lora_rank": max(ranks)} if ranks else {}
        tokenizer = load_tokenizer(folder, trust_remote_code=config.trust_remote_code, padding_side="left")
        v = config.vllm
        args = AsyncEngineArgs(model=str(folder), tokenizer=str(folder), trust_remote_code=config.trust_remote_code,
                               dtype="auto" if config.dtype == "auto" else config.dtype,
                               gpu_memory_utilization=v.gpu_memory_utilization, max_num_seqs=v.max_num_seqs,
                               max_model_len=v.max_model_len, tensor_parallel_size=v.tensor_parallel_size,
                               enforce_eager=v.enforce_eager, load_format="safetensors", **lora_args)
        self.llm = AsyncLLM.from_engine_args(args)
        context = v.max_model_len or int(self.llm.model_config.max_model_len)
        super().__init__(PromptEncoder(tokenizer, context, config.max_input_tokens))
        self._requests: dict[str, _Request] = {}

    def submit(self, ids: list[int], params: GenerationParams, stream: bool = False) -> str:
        from vllm import SamplingParams, TokensPrompt

        rid = uuid.uuid4().hex
        lora = None
        if params.adapter is not None:
            from vllm.lora.request import LoRARequest

            if params.adapter not in self._loras:
                raise EngineError(f"adapter {params.adapter} is not loaded on this engine")
            lora_id, path = self._loras[params.adapter]
            lora = LoRARequest(f"adapter-{lora_id}", lora_id, str(path))
        sampling = SamplingParams(max_tokens=params.max_new_tokens, temperature=params.temperature,
                                  top_p=params.top_p if params.temperature > 0 else 1.0)
        queue: asyncio.Queue = asyncio.Queue()

        async def pump():
            try:
                async for out in self.llm.generate(TokensPrompt(prompt_token_ids=list(ids)), sampling, rid,
                                                   lora_request=lora):
                    queue.put_nowait(out)
            except Exception as e:  # noqa: BLE001 - delivered to the consumer
                queue.put_nowait(e)

        self._requests[rid] = _Request(queue, asyncio.get_running_loop().create_task(pump()), len(ids),
                                       IncrementalDetokenizer(self.tokenizer))
        self.counters.submitted += 1
        return rid

    async def _outputs(self, request_id: str):
        req = self._requests.get(request_id)
        if req is None or req.consumed:
            raise KeyError(f"unknown or already consumed request id {request_id!r}")
        req.consumed = True
        try:
            while True:
                out = await req.queue.get()
                if isinstance(out, Exception):
                    self.counters.failed += 1
                    raise failure(out)
                yield req, out
                if out.finished:
                    req.done = True
                    return
        finally:
            self._requests.pop(request_id, None)
            if not req.done:
                self.cancel_task(req, request_id)

    def _generation(self, req: _Request, out) -> Generation:
        c = out.outputs[0]
        self.counters.finished += 1
        self.counters.generated_tokens += len(c.token_ids)
        return Generation(c.text.strip(), req.prompt_tokens, len(c.token_ids),
                          "stop" if c.finish_reason == "stop" else "length")

    async def result(self, request_id: str) -> Generation:
        async for req, out in self._outputs(request_id):
            if out.finished:
                return self._generation(req, out)
        raise EngineError("vLLM ended the request without a final output")

    async def stream(self, request_id: str) -> AsyncIterator[str | Generation]:
        async for req, out in self._outputs(request_id):
            piece = req.detok.delta(list(out.outputs[0].token_ids))
            if piece:
                yield piece
            if out.finished:
                yield self._generation(req, out)

    def cancel_task(self, req: _Request, request_id: str) -> None:
        req.done = True
        req.task.cancel()
        asyncio.get_running_loop().create_task(self.llm.abort(request_id))
        self.counters.cancelled += 1

    def cancel(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        if req is not None and not req.done:
            self.cancel_task(req, request_id)

    def queue_stats(self) -> dict:
        return {"requests_waiting": 0, "requests_running": len(self._requests), "requests_open": len(self._requests)}

    def close(self) -> None:
        self.llm.shutdown()
