"""What a stage's result depends on, as digests: its settings, its input data files and its input model.

`--stage all` keeps a committed stage only when all three match its last summary; otherwise that stage and
every later one train again. Operational settings (paths of outputs and checkpoints, logging, failure
handling, per-worker resources) are not part of the digest.
"""

from __future__ import annotations

import hashlib
import json

from metaaligner.storage import Storage
from metaaligner.modeling import list_model_files
from metaaligner.outputs import read_manifest
from metaaligner.training.config import STAGES, TrainConfig
from metaaligner.training.lora import adapter_digest

OPERATIONAL = {"output", "checkpoints", "run_name", "base_model", "cpus_per_worker", "resources_per_worker",
               "max_failures", "checkpoint_every", "checkpoint_upload_attempts", "keep_checkpoints", "log_every",
               "log_sample_ids", "peak_tflops", *STAGES}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_digest(cfg: TrainConfig, stage: str) -> str:
    settings = cfg.model_dump(mode="json", exclude=OPERATIONAL)
    return _hash({"stage": stage, "train": settings, "stage_settings": cfg.stage(stage).model_dump(mode="json")})


def data_digest(files: list[str], data_uri: str, storage: Storage) -> str:
    """The committed run of a reformulation output (its manifest's run id) plus the files read and their sizes;
    for raw folders the modification times too."""
    fs, _ = storage.filesystem(data_uri)
    manifest = read_manifest(data_uri, storage)
    infos = fs.get_file_info(files)
    entries = [(i.path, i.size) if manifest else (i.path, i.size, i.mtime_ns) for i in infos]
    return _hash({"run_id": manifest and manifest.get("run_id"), "files": entries})


def model_digest(model_uri: str, storage: Storage) -> str:
    """A stage export: the run id of the committed stage folder; any other model folder: its files' sizes and
    modification times."""
    files = list_model_files(model_uri, storage)
    parent = model_uri.rstrip("/").rpartition("/")[0]
    manifest = read_manifest(parent, storage) if model_uri.rstrip("/").endswith("/model") else None
    if manifest and str(manifest.get("job", "")).startswith("train-"):
        return _hash({"run_id": manifest["run_id"]})
    return _hash(sorted((name, size, mtime) for name, (size, mtime) in files.items()))


def stage_digest(cfg: TrainConfig, stage: str, files: list[str], model_uri: str, storage: Storage,
                 adapter_uri: str | None = None) -> dict:
    """With LoRA, a later stage also depends on the adapter it continues (`adapter`)."""
    parts = {"config": config_digest(cfg, stage), "data": data_digest(files, cfg.data, storage),
             "model": model_digest(model_uri, storage)}
    if adapter_uri is not None:
        parts["adapter"] = adapter_digest(adapter_uri, storage)
    return {**parts, "stage": _hash(parts)}
