"""Content ids: one digest for every id derived from a row's content.

Reformulation names pairs without an id by `content_digest` of their texts (`uf-…`, `hh-…`, `fc-…`); batch
correction and evaluation name id-less rows by `content_id` (the same hash over the row as canonical JSON, 64
bits), and number identical rows `#2`, `#3`, ... in input order (identical rows are interchangeable, so which copy
carries which suffix cannot change any result).

`columns`: the same digests over Arrow columns, one batch at a time, and a 64-bit key for finding duplicates.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc

from metaaligner.data.contract import record_json


def _digest(data: bytes, size: int) -> str:
    """The one content hash of the project: BLAKE2b, `size` bytes, as hex."""
    return hashlib.blake2b(data, digest_size=size).hexdigest()


def content_digest(*parts) -> str:
    """128 bits over texts (non-strings by their JSON), each followed by a NUL: the ids of pairs without an id."""
    return _digest(b"".join((part if isinstance(part, str) else record_json(part)).encode("utf-8", "surrogatepass")
                            + b"\x00" for part in parts), 16)


def content_id(row: Mapping) -> str:
    """64 bits over the row as canonical JSON (every column, sorted by name; ASCII, so lone surrogates are safe):
    the ids of correct/evaluate rows without an id column (docs/evaluation.md, `id_column`)."""
    return _digest(json.dumps(dict(row), sort_keys=True, separators=(",", ":"), default=str).encode("ascii"), 8)


def number_duplicates(ids: Iterable[str]) -> list[str]:
    """The first occurrence keeps its id, later ones get `#2`, `#3`, ... in order."""
    seen: Counter = Counter()
    out = []
    for i in ids:
        seen[i] += 1
        out.append(i if seen[i] == 1 else f"{i}#{seen[i]}")
    return out


def add_content_ids(batch: pa.Table, column: str) -> pa.Table:
    """Ray Data batch function: append `column` = content_id(row) (computed before the column exists)."""
    ids = [content_id(row) for row in batch.to_pylist()]
    return batch.append_column(column, pa.array(ids, type=pa.string()))


def _keep(batch: pa.Table, column: str, values: pa.Array, duplicated: bool) -> pa.Table:
    mask = pc.is_in(batch.column(column), value_set=values)
    return batch.filter(mask if duplicated else pc.invert(mask))


def unique_content_ids(ds, column: str):
    """(dataset, duplicate rows): rows whose content id repeats are renumbered `#2`, `#3`, ... on the driver
    (only those rows travel there); every other row stays where it is."""
    import ray

    counts: Counter = Counter()
    for batch in ds.select_columns([column]).iter_batches(batch_format="pyarrow", batch_size=65536):
        for item in pc.value_counts(batch.column(column)).to_pylist():
            counts[item["values"]] += item["counts"]
    repeated = pa.array(sorted(k for k, n in counts.items() if n > 1), type=pa.string())
    if len(repeated) == 0:
        return ds, 0
    kwargs = {"column": column, "values": repeated}
    rest = ds.map_batches(_keep, batch_format="pyarrow", fn_kwargs={**kwargs, "duplicated": False})
    refs = ds.map_batches(_keep, batch_format="pyarrow", fn_kwargs={**kwargs, "duplicated": True}).to_arrow_refs()
    copies = pa.concat_tables([t for t in ray.get(refs) if t.num_rows], promote_options="default")
    index = copies.schema.get_field_index(column)
    numbered = pa.array(number_duplicates(copies.column(column).to_pylist()), type=pa.string())
    copies = copies.set_column(index, copies.schema.field(index), numbered)
    return rest.union(ray.data.from_arrow(copies)), copies.num_rows - len(repeated)
