"""LoRA adapters served on one copy of a base model, chosen per request inside a mixed batch.

PEFT's own mixed-batch inference (`adapter_names=`) splits a batch by rows; the `hf` engine's continuous
batching flattens every request of a step into one (1, T) row, so rows cannot carry the choice. This is the
equivalent at token granularity: each adapter's A and B (from a PEFT folder: adapter_config.json +
adapter_model.safetensors) sit next to the base model, and a forward hook on every adapted Linear layer adds
`(x @ A.T) @ B.T * scale` to exactly the tokens (or rows) whose request chose that adapter. Index 0 is the
base model (no adapter). The selection is thread-local and set right before a forward:

- `rows(indices)`: one index per batch row (padded `generate`: hf_static, streams);
- `route_tokens([(index, tokens), ...])`: one index per request in the order its tokens sit in the flattened
  step (continuous batching; `route_continuous_batching` installs this on the batch preparation).
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

PEFT_PREFIX = "base_model.model."
UNSUPPORTED = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform", "lora_bias",
               "trainable_token_indices")


class AdapterError(ValueError):
    """An adapter folder this server cannot apply (the message says what and why)."""


def _read_adapter(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{folder}: peft_type {config.get('peft_type')!r}; only LoRA adapters are served")
    used = [k for k in UNSUPPORTED if config.get(k)]
    if used or config.get("bias", "none") != "none" or config.get("fan_in_fan_out"):
        raise AdapterError(f"{folder}: adapter options {used or ['bias/fan_in_fan_out']} are not supported here "
                           "(plain LoRA: r, lora_alpha, target_modules, use_rslora)")
    return config, load_file(str(folder / "adapter_model.safetensors"))


class _Selection:
    """Which adapter each token of the next forward uses, with the flat positions per adapter cached per shape."""

    def __init__(self, per_row=None, per_token=None):
        self.per_row, self.per_token = per_row, per_token
        values = (per_row if per_row is not None else per_token).unique().tolist()
        self.active = [v for v in values if v > 0]
        self._shape: tuple | None = None
        self._positions: dict[int, object] = {}

    def positions(self, x) -> dict[int, object]:
        import torch

        shape = tuple(x.shape[:-1])
        if shape != self._shape:
            if self.per_row is not None:
                ids = self.per_row.to(x.device)[:, None].expand(shape[0], shape[1]).reshape(-1)
            else:
                total = int(torch.tensor(shape).prod())
                ids = torch.zeros(total, dtype=torch.long, device=x.device)  # padded positions: base model
                n = min(total, self.per_token.numel())
                ids[:n] = self.per_token[:n].to(x.device)
            self._positions = {k: (ids == k).nonzero().squeeze(1) for k in self.active}
            self._shape = shape
        return self._positions


class AdapterSet:
    """Adapters (key -> local PEFT folder) applied on `model` per row or per token; one copy of the base weights."""

    def __init__(self, model, folders: dict[str, Path]):
        import torch

        self.keys = list(folders)
        self.index = {key: i + 1 for i, key in enumerate(self.keys)}
        self._local = threading.local()
        self._weights: dict[str, dict[int, tuple]] = {}  # module name -> adapter index -> (A, B, scale)
        modules = dict(model.named_modules())
        param = next(model.parameters())
        for key, folder in folders.items():
            config, state = _read_adapter(Path(folder))
            r = int(config["r"])
            scale = float(config["lora_alpha"]) / (r ** 0.5 if config.get("use_rslora") else r)
            pairs: dict[str, dict[str, torch.Tensor]] = {}
            for name, tensor in state.items():
                stem, _, part = name.removeprefix(PEFT_PREFIX).rpartition(".lora_")
                if part not in ("A.weight", "B.weight"):
                    raise AdapterError(f"{folder}: unexpected tensor {name!r} (plain LoRA A/B weights only)")
                pairs.setdefault(stem, {})[part[0]] = tensor
            for stem, ab in pairs.items():
                layer = modules.get(stem)
                if not isinstance(layer, torch.nn.Linear) or set(ab) != {"A", "B"}:
                    raise AdapterError(f"{folder}: {stem!r} is not a Linear layer of the base model with both A and B "
                                       "(is this adapter for another base model?)")
                a, b = ab["A"], ab["B"]
                if a.shape != (r, layer.in_features) or b.shape != (layer.out_features, r):
                    raise AdapterError(f"{folder}: {stem}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                                       f"{layer.in_features} -> {layer.out_features} with r={r}")
                self._weights.setdefault(stem, {})[self.index[key]] = (
                    a.to(device=param.device, dtype=param.dtype), b.to(device=param.device, dtype=param.dtype), scale)
        self._hooks = [modules[stem].register_forward_hook(self._hook(stem)) for stem in self._weights]

    def index_of(self, key: str | None) -> int:
        """0 for the base model, else the adapter's index (a KeyError names the adapters this model serves)."""
        if key is None:
            return 0
        if key not in self.index:
            raise KeyError(f"adapter {key!r} is not loaded on this model (loaded: {self.keys})")
        return self.index[key]

    @contextmanager
    def rows(self, keys: Sequence[str | None]) -> Iterator[None]:
        """Within the block, batch row i uses adapter keys[i] (None: the base model)."""
        import torch

        self._local.selection = _Selection(per_row=torch.tensor([self.index_of(k) for k in keys]))
        try:
            yield
        finally:
            self._local.selection = None

    def route_tokens(self, requests: Sequence[tuple[int, int]]) -> None:
        """The next forward's flattened tokens: (adapter index, token count) per request, in order."""
        import torch

        ids = torch.repeat_interleave(torch.tensor([i for i, _ in requests], dtype=torch.long),
                                      torch.tensor([n for _, n in requests], dtype=torch.long))
        self._local.selection = _Selection(per_token=ids)

    def _hook(self, stem: str):
        weights = self._weights[stem]

        def hook(module, args, output):
            selection = getattr(self._local, "selection", None)
            if selection is None or not selection.active:
                return None
            x = args[0]
            flat_x, flat_out = x.reshape(-1, x.shape[-1]), output.view(-1, output.shape[-1])
            for index, positions in selection.positions(x).items():
                adapter = weights.get(index)
                if adapter is None or positions.numel() == 0:
                    continue
                a, b, scale = adapter
                flat_out.index_add_(0, positions, (flat_x.index_select(0, positions) @ a.T) @ b.T, alpha=scale)
            return output

        return hook

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []


def route_continuous_batching(manager, adapters: AdapterSet) -> None:
    """Make transformers' continuous batching tell `adapters` which request's tokens sit where in each step.

    A request carries its adapter index as the per-request kwarg `adapter` (declared here); the batch preparation
    hands every scheduled request, in token order, to the logits-processor list right before the forward, and we
    read (adapter, query_length) there. Prefix sharing must stay off (a cached prefix is adapter-specific)."""
    processors = manager.logit_processor
    processors.supported_keys["adapter"] = int
    prepare = processors.prepare_tensor_args

    def prepare_with_routing(requests_in_batch, arg_storage):
        adapters.route_tokens([(int(r.state.logit_processor_kwargs.get("adapter", 0)), int(r.query_length))
                               for r in requests_in_batch])
        return prepare(requests_in_batch, arg_storage)

    processors.prepare_tensor_args = prepare_with_routing
