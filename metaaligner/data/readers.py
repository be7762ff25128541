"""Input discovery and Ray Data readers for local paths, s3:// prefixes and Hugging Face datasets."""

from __future__ import annotations

from pathlib import Path

import ray

from metaaligner import storage
from metaaligner.config import StorageConfig

SUFFIXES = {"parquet": (".parquet",), "jsonl": (".jsonl", ".json", ".jsonl.gz"), "csv": (".csv", ".csv.gz")}
HF_PREFIX = "hf://"


def is_hf_dataset(uri: str) -> bool:
    if uri.startswith(HF_PREFIX):
        return True
    folder = Path(uri)
    return not storage.is_s3(uri) and any((folder / f).is_file() for f in ("dataset_info.json", "dataset_dict.json"))


def discover(uri: str, storage_config: StorageConfig, kinds: tuple[str, ...] = tuple(SUFFIXES)) -> tuple[str, list[str]]:
    """(kind, files) of the input: files of one of `kinds` (parquet | jsonl | csv) under a file or prefix;
    fails when nothing readable is there or kinds are mixed."""
    suffixes = tuple(s for k in kinds for s in SUFFIXES[k])
    files = storage.list_files(uri, storage_config, suffixes)
    found = {k for f in files for k in kinds if f.endswith(SUFFIXES[k])}
    if not files:
        raise ValueError(f"no input files ({', '.join(suffixes)}) under {uri}")
    if len(found) > 1:
        raise ValueError(f"mixed input formats under {uri}: {sorted(found)}; give one kind per run")
    return found.pop(), files


def read_files(kind: str, files: list[str], filesystem) -> ray.data.Dataset:
    """Streamed reads; JSON lines come in as text so one bad line is quarantined instead of failing the read."""
    if kind == "parquet":
        return ray.data.read_parquet(files, filesystem=filesystem, include_paths=True)
    if kind == "jsonl":
        return ray.data.read_text(files, filesystem=filesystem, include_paths=True, drop_empty_lines=True)
    import pyarrow.csv as pacsv

    return ray.data.read_csv(files, filesystem=filesystem, include_paths=True,
                             parse_options=pacsv.ParseOptions(newlines_in_values=True))


def read_hf_dataset(uri: str, split: str = "train") -> ray.data.Dataset:
    """A hub dataset (`hf://name`, needs network) or a local `save_to_disk` folder, through `datasets`."""
    import datasets

    if uri.startswith(HF_PREFIX):
        ds = datasets.load_dataset(uri[len(HF_PREFIX):], split=split)
    else:
        ds = datasets.load_from_disk(uri)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    if len(ds) == 0:
        raise ValueError(f"dataset {uri} is empty")
    return ray.data.from_huggingface(ds)
