"""LoRA training (`train.lora`, PEFT): the adapter a stage trains, where it starts from, how it is exported.

- Each stage trains one adapter on the frozen base model (`train.base_model`). The first enabled stage starts a
  new adapter (B = 0: the stage starts exactly at the base model); every later stage loads the previous enabled
  stage's exported adapter and continues it (new optimizer state, as full fine-tuning starts each stage anew).
- The adapter is attached before `deepspeed.initialize`, so DeepSpeed sees (and ZeRO shards, checkpoints and
  updates) the adapter parameters only; the frozen base weights are bf16/fp32 copies (ZeRO-3: partitioned).
- Exports per stage: `<stage>/adapter/` (a PEFT folder: adapter_config.json + adapter_model.safetensors) and, with
  `lora.merge`, `<stage>/model/`: W + B @ A * alpha / r as a plain Hugging Face model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from metaaligner import storage as st
from metaaligner.modeling import list_adapter_files
from metaaligner.outputs import read_manifest
from metaaligner.storage import Storage
from metaaligner.training.config import STAGES, LoraSettings, TrainConfig

ADAPTER = "adapter"  # a stage's adapter export, next to model/ and logs/
PEFT_PREFIX = "base_model.model."  # PeftModel's parameter names wrap the HF model's


def stage_adapter_input(cfg: TrainConfig, stage: str) -> str | None:
    """The adapter export of the nearest earlier enabled stage (None: the stage starts a new adapter)."""
    earlier = [s for s in STAGES[:STAGES.index(stage)] if cfg.stage(s).enabled]
    return st.join(cfg.output, earlier[-1], ADAPTER) if earlier else None


def adapter_digest(uri: str | None, storage: Storage) -> str | None:
    """A stage export: the committed stage's run id; any other adapter folder: its files' sizes and times."""
    if uri is None:
        return None
    files = list_adapter_files(uri, storage)
    manifest = read_manifest(uri.rstrip("/").rpartition("/")[0], storage)
    if manifest and str(manifest.get("job", "")).startswith("train-"):
        payload: object = {"run_id": manifest["run_id"]}
    else:
        payload = sorted((n, size, mtime) for n, (size, mtime) in files.items())
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def peft_config(settings: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), bias="none")


def attach(model, settings: LoraSettings, adapter_dir: Path | None):
    """The PeftModel this stage trains: a new adapter, or the previous stage's adapter loaded into it (its shapes
    and target modules must match `settings`). Only adapter parameters require gradients."""
    from peft import get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    unmatched = f"train.lora.target_modules {settings.target_modules} matched no layer of the model"
    try:
        peft_model = get_peft_model(model, peft_config(settings))
    except ValueError as e:  # PEFT refuses target modules it cannot find
        raise ValueError(f"{unmatched}: {e}") from e
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise ValueError(unmatched)
    if adapter_dir is not None:
        saved = json.loads((adapter_dir / "adapter_config.json").read_text())
        expected = {"r": settings.r, "lora_alpha": settings.alpha, "target_modules": sorted(settings.target_modules)}
        found = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"),
                 "target_modules": sorted(saved.get("target_modules") or [])}
        if found != expected:
            raise ValueError(f"the adapter to continue ({adapter_dir}) was trained with {found}, but train.lora "
                             f"asks for {expected}: keep the LoRA settings across stages")
        weights = load_peft_weights(str(adapter_dir))
        result = set_peft_model_state_dict(peft_model, weights)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise ValueError(f"the adapter {adapter_dir} does not fit the model: unexpected "
                             f"{result.unexpected_keys[:3]}, missing {missing[:3]}")
    return peft_model


def adapter_only_checkpoints(module) -> None:
    """`module.state_dict()` (what DeepSpeed checkpoints as the module state) keeps the trainable tensors only.
    DeepSpeed's exclude_frozen_parameters misses a frozen weight tied to another (lm_head = embed_tokens: the
    state dict names both, named_parameters only one), which would put a full embedding into every checkpoint."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}

    def keep_trainable(_module, state, prefix, _metadata):
        for key in [k for k in state if k.startswith(prefix) and k[len(prefix):] not in trainable]:
            del state[key]

    module.register_state_dict_post_hook(keep_trainable)


def trainable_state(module, dtype, rank: int) -> dict:
    """The adapter parameters gathered (ZeRO-3: one at a time) to CPU on rank 0, named as PeftModel names them."""
    import deepspeed

    state = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if rank == 0:
                    state[name] = param.detach().to(dtype=dtype, device="cpu").clone()
    return state


def save_adapter(peft_model, state: dict, folder: str | Path, base_model: str) -> Path:
    """A PEFT folder from rank 0's gathered adapter state: adapter_config.json + adapter_model.safetensors."""
    folder = Path(folder)
    peft_model.peft_config["default"].base_model_name_or_path = base_model
    peft_model.save_pretrained(str(folder), state_dict=state, safe_serialization=True)
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub
    return folder


def scalings(peft_model) -> dict[str, float]:
    """LoRA layer name (as in the gathered full state, without `.base_layer`) -> its alpha / r."""
    from peft.tuners.lora import LoraLayer

    return {name: float(module.scaling["default"]) for name, module in peft_model.named_modules()
            if isinstance(module, LoraLayer)}


def merged_state(state: dict, scale: dict[str, float], dtype) -> dict:
    """A full PeftModel state (base weights + adapters) -> the plain HF state dict with W + B @ A * scale folded in
    (computed in fp32, then cast)."""
    merged = {}
    for name, tensor in state.items():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        layer = name.removesuffix(".base_layer.weight")
        if layer != name:
            a = state[f"{layer}.lora_A.default.weight"].float()
            b = state[f"{layer}.lora_B.default.weight"].float()
            tensor = (tensor.float() + (b @ a) * scale[layer]).to(dtype)
            name = f"{layer}.weight"
        merged[name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")] = tensor
    return merged


def export_stage(peft_model, cfg: dict, model_dir: Path, dtype, rank: int, storage: Storage) -> None:
    """Every rank takes part in the gathers; rank 0 writes `<stage>/adapter/` and, with `merge`, `<stage>/model/`."""
    import torch

    from metaaligner.training.export import gather_state_dict, save_hf_folder, write_folder

    adapter = trainable_state(peft_model, torch.float32, rank)
    if rank == 0:
        write_folder(cfg["adapter_export_uri"], storage, lambda local: save_adapter(
            peft_model, {k: v.to(dtype) for k, v in adapter.items()}, local, cfg["base_model_uri"]))
    if not cfg["lora"]["merge"]:
        return
    state = gather_state_dict(peft_model, dtype, rank)
    if rank == 0:
        merged = merged_state({**state, **adapter}, scalings(peft_model), dtype)
        write_folder(cfg["export_uri"], storage, lambda local: save_hf_folder(
            local, merged, peft_model.get_base_model().config, model_dir, dtype))
