"""Input discovery and Ray Data readers for local paths, s3:// prefixes and Hugging Face datasets."""

from __future__ import annotations

import logging
from pathlib import Path

import ray

from metaaligner import storage as st
from metaaligner.storage import Storage
from metaaligner.outputs import committed_files

log = logging.getLogger(__name__)

SUFFIXES = {"parquet": (".parquet",), "jsonl": (".jsonl", ".json", ".jsonl.gz"), "csv": (".csv", ".csv.gz")}
HF_PREFIX = "hf://"


def is_hf_dataset(uri: str) -> bool:
    if uri.startswith(HF_PREFIX):
        return True
    folder = Path(uri)
    return not st.is_s3(uri) and any((folder / f).is_file() for f in ("dataset_info.json", "dataset_dict.json"))


def _is_test_file(relative: str) -> bool:
    """A held-out split by its name: a file `test.*`, `test_*.*` or `test-*.*` (Hugging Face shards such as
    `test-00000-of-00001.parquet`), or anything inside a folder named `test`."""
    *folders, name = relative.split("/")
    return "test" in folders or name.startswith("test.") or (name.startswith(("test_", "test-")) and "." in name)


def _parent(uri: str) -> str | None:
    """The folder holding `uri`, or None at a bucket or filesystem root."""
    head, _, _ = uri.rstrip("/").rpartition("/")
    if st.is_s3(uri):
        return head if head.count("/") >= 2 else None
    return head or None


def _listed(uri: str, storage: Storage, suffixes: tuple[str, ...]) -> list[str]:
    """Files under `uri` with one of the suffixes: the committed files when `uri` (or its parent) is an output of
    ours — an incomplete run is refused — else everything found (hidden and `_`-prefixed entries excluded)."""
    for root in filter(None, (uri, _parent(uri))):
        committed = committed_files(root, storage)
        if committed is not None:
            _, path = storage.filesystem(uri)
            inside = [f for f in committed if f == path or f.startswith(path.rstrip("/") + "/")]
            return sorted(f for f in inside if f.endswith(suffixes) and not any(
                part.startswith(("_", ".")) for part in f[len(path):].split("/")))
    return storage.list_files(uri, suffixes)


def discover(uri: str, storage: Storage, kinds: tuple[str, ...] = tuple(SUFFIXES),
             skip_test_files: bool = False) -> tuple[str, list[str]]:
    """(kind, files) of the input: files of one of `kinds` (parquet | jsonl | csv) under a file or prefix;
    fails when nothing readable is there or kinds are mixed.

    Reads only what an output's `_SUCCESS` manifest lists (see metaaligner.outputs). With `skip_test_files`
    (reformulate and train), files named `test.*` / `test_*.*` / `test-*.*` and folders named `test` found inside a
    folder are left out and logged, so a test split is never mixed into training.
    """
    suffixes = tuple(s for k in kinds for s in SUFFIXES[k])
    files = _listed(uri, storage, suffixes)
    if skip_test_files:
        _, root = storage.filesystem(uri)
        skipped = [f for f in files if f != root and _is_test_file(f[len(root):].lstrip("/"))]
        if skipped:
            log.warning("skipping %d test-split file(s) under %s (set include_test_files to read them): %s",
                        len(skipped), uri, ", ".join(skipped[:10]))
            files = [f for f in files if f not in skipped]
    found = {k for f in files for k in kinds if f.endswith(SUFFIXES[k])}
    if not files:
        raise ValueError(f"no input files ({', '.join(suffixes)}) under {uri}")
    if len(found) > 1:
        raise ValueError(f"mixed input formats under {uri}: {sorted(found)}; give one kind per run")
    return found.pop(), files


def read_files(kind: str, files: list[str], filesystem) -> ray.data.Dataset:
    """Streamed reads; JSON rows (lines, or the elements of one array per file) come in as raw text so one bad row
    is quarantined instead of failing the read."""
    if kind == "parquet":
        return ray.data.read_parquet(files, filesystem=filesystem, include_paths=True)
    if kind == "jsonl":
        from metaaligner.data.io.sources import json_rows_dataset

        return json_rows_dataset(files, filesystem)
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
