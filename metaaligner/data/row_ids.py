"""Row ids for inputs without an id column (`metaaligner correct` / `evaluate`): a digest of the row's content,
stable across reruns and however the rows are split into files; identical rows get `#2`, `#3`, ... in input
order (identical rows are interchangeable, so which copy carries which suffix cannot change any result)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc


def content_id(row: Mapping) -> str:
    """16 hex digits of BLAKE2b over the row as canonical JSON (every column, sorted by name)."""
    text = json.dumps(dict(row), sort_keys=True, separators=(",", ":"), default=str)  # ASCII: surrogates are safe
    return hashlib.blake2b(text.encode("ascii"), digest_size=8).hexdigest()


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
