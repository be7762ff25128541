"""Model folders on local disk or s3://: checked remotely, copied once per node into a cache."""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from metaaligner import storage as st
from metaaligner.config import StorageConfig

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def cache_root() -> Path:
    return Path(os.environ.get("METAALIGNER_CACHE", Path(tempfile.gettempdir()) / "metaaligner-cache"))


def list_model_files(uri: str, storage: StorageConfig) -> dict[str, tuple[int, int]]:
    """name -> (size, mtime) of a model folder's files, or a clear error (missing, no config.json, no safetensors)."""
    fs, path = st.filesystem(uri, storage)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"model folder not found: {uri}")
    files = {i.path[len(path):].lstrip("/"): (i.size or 0, i.mtime_ns or 0)
             for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.File}
    if "config.json" not in files:
        raise FileNotFoundError(f"{uri}: not a model folder (no config.json)")
    if not any(n.endswith(".safetensors") for n in files):
        raise ValueError(f"{uri}: no *.safetensors weights; only safetensors are loaded (convert .bin/.pt first)")
    return files


def local_model_dir(uri: str, storage: StorageConfig, weights: bool = True) -> Path:
    """The folder itself when local; else a per-node cached copy (weights=False: config + tokenizer only)."""
    if not st.is_s3(uri):
        list_model_files(uri, storage)
        return Path(uri).expanduser().resolve()
    files = list_model_files(uri, storage)
    names = sorted(n for n in files if weights or not n.endswith(WEIGHT_SUFFIXES))
    digest = hashlib.sha256(repr((uri, [(n, files[n]) for n in names])).encode()).hexdigest()[:16]
    folder = cache_root() / "models" / digest
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one copy per node even with 8 workers starting together
        if not (folder / ".complete").exists():
            fs, path = st.filesystem(uri, storage)
            local = pafs.LocalFileSystem()
            for name in names:
                pafs.copy_files(f"{path}/{name}", str(folder / name), source_filesystem=fs, destination_filesystem=local)
            (folder / ".complete").write_text(uri)
    return folder
