"""A Hugging Face causal LM and its tokenizer on one device: the model the `hf` and `hf_static` engines run."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence

from metaaligner.storage import Storage, StorageConfig
from metaaligner.serving.config import CorrectorConfig
from metaaligner.serving.engines.contract import EngineError, Generation, GenerationParams, PromptEncoder


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

    def __init__(self, config: CorrectorConfig, storage: Storage | StorageConfig | None = None,
                 adapters: Sequence[str] = ()):
        """`adapters`: LoRA adapter folders served on this one copy of the model besides `config.adapter`."""
        import torch

        from metaaligner.modeling import check_model_folder, load_model, load_tokenizer, local_model_dir

        self.config = config
        storage = Storage.of(storage)
        self.folder = check_model_folder(local_model_dir(config.model, storage, cache_dir=config.cache_dir))
        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32, "float32": torch.float32,
                 "bfloat16": torch.bfloat16, "float16": torch.float16}[config.dtype]
        self.device = device
        self.tokenizer = load_tokenizer(self.folder, trust_remote_code=config.trust_remote_code, padding_side="left")
        self.model = load_model(self.folder, trust_remote_code=config.trust_remote_code, dtype=dtype, device=device).eval()
        self.adapters = _load_adapters(self.model, [*([config.adapter] if config.adapter else []), *adapters],
                                       storage, config.cache_dir)
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
            with self._lock, torch.inference_mode(), self._selecting([params[i].adapter for i in idx]):
                seqs = self.model.generate(**inputs, **self._kwargs(params[idx[0]], longest), **stop)
            for row, i in enumerate(idx):
                out[i] = self._decode(seqs[row, width:].tolist()[: params[i].max_new_tokens], len(batch_ids[i]))
        return out  # type: ignore[return-value]

    def adapter_index(self, key: str | None) -> int:
        """0 for the base model, else the loaded adapter's index; an adapter not loaded here is an EngineError."""
        if key is None:
            return 0
        if self.adapters is None or key not in self.adapters.index:
            raise EngineError(f"adapter {key} is not loaded on model {self.config.model}")
        return self.adapters.index[key]

    def _selecting(self, keys: list[str | None]):
        """Each row's adapter for the next generate (nothing to select without adapters)."""
        for key in keys:
            self.adapter_index(key)
        return self.adapters.rows(keys) if self.adapters is not None else contextlib.nullcontext()

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
                with self._lock, torch.inference_mode(), self._selecting([params.adapter]):
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


def _load_adapters(model, keys: list[str], storage: Storage, cache_dir: str):
    """The AdapterSet of these adapter folders on `model` (None without any)."""
    keys = list(dict.fromkeys(keys))
    if not keys:
        return None
    from metaaligner.modeling import local_adapter_dir
    from metaaligner.serving.engines.lora import AdapterSet

    return AdapterSet(model, {key: local_adapter_dir(key, storage, cache_dir) for key in keys})
