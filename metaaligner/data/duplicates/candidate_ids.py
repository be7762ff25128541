"""The pair ids each raw row can give, as (id, source, row) rows for the find pass."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from metaaligner.data.contract import decode_record, is_utf8
from metaaligner.data.duplicates.rule import ID_SCHEMA
from metaaligner.data.formats.registry import FORMATS
from metaaligner.data.io.columns import as_text, python_rows


class RowIds:
    """The pair ids each row of a batch can give: a superset of its valid pairs' ids (invalid rows may add
    ids; they are only deferred, then decided by the per-row path)."""

    def __init__(self, fmt: str, objectives):
        self.format, self.objectives = fmt, objectives
        self.adapt = FORMATS[fmt].adapt

    @property
    def columns(self) -> list[str] | None:
        """Columns the find step needs to read (None: whole rows)."""
        return ["id"] if self.format == "canonical" else None

    def __call__(self, batch, source: int, first_row: int) -> pa.Table:
        if isinstance(batch, pa.Table) and self.format == "canonical":
            ids = as_text(batch.column("id")) if "id" in batch.column_names else pa.nulls(batch.num_rows, pa.string())
            if ids is not None:  # a valid canonical pair's id is a string: other types never make a pair
                rows = np.nonzero(pc.is_valid(ids).to_numpy(zero_copy_only=False))[0]
                return _id_table(ids.take(pa.array(rows, pa.int64())), source, rows + first_row)
        raw = python_rows(batch) if isinstance(batch, pa.Table) else batch
        ids, rows = [], []
        for k, row in enumerate(raw):
            for pair_id in self.row_ids(row):
                ids.append(pair_id)
                rows.append(first_row + k)
        return _id_table(pa.array(ids, pa.string()), source, np.array(rows, dtype=np.int64))

    def row_ids(self, raw) -> list[str]:
        """Candidate ids of one raw row; none when the row is rejected before it has any."""
        try:
            candidates = self.adapt(decode_record(raw), self.objectives, Counter())
            ids = [c.get("id") for c in candidates if isinstance(c, dict)]
            return [i for i in ids if isinstance(i, str) and is_utf8(i)]
        except Exception:  # noqa: BLE001 — the main pass quarantines this row with its reason
            return []


def _id_table(ids: pa.Array, source: int, rows: np.ndarray) -> pa.Table:
    return pa.Table.from_arrays([ids.cast(pa.string()), pa.array(np.full(len(ids), source, dtype=np.int32)),
                                 pa.array(rows.astype(np.int64))], schema=ID_SCHEMA)
