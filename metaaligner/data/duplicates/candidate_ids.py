"""The pair ids each raw row can give, as (key, source, row) rows for the find pass (key: data.ids.columns.hash64 of
the id)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from metaaligner.data.ids.columns import hash64
from metaaligner.data.contract import decode_record, is_utf8
from metaaligner.data.duplicates.rule import ID_SCHEMA
from metaaligner.data.formats.registry import FORMATS
from metaaligner.data.io.columns import as_text, python_rows
from metaaligner.data.reformulate.column_checks import hh_rlhf_ids

HH_TEXTS = ("prompt", "chosen_response", "rejected_response")


class RowIds:
    """The pair ids each row of a batch can give: a superset of its valid pairs' ids (invalid rows may add
    ids; they are only deferred, then decided by the per-row path). Canonical and hh_rlhf_scores tables are read
    column-wise (ids hashed in batches); a row the column form cannot decide, and every other format, runs the
    format's adapter."""

    def __init__(self, fmt: str, objectives):
        self.format, self.objectives = fmt, objectives
        self.adapt = FORMATS[fmt].adapt

    @property
    def columns(self) -> list[str] | None:
        """Columns the find step needs to read (None: whole rows)."""
        if self.format == "canonical":
            return ["id"]
        if self.format == "hh_rlhf_scores":
            return ["id", *HH_TEXTS]
        return None

    def __call__(self, batch, source: int, positions: np.ndarray) -> pa.Table:
        """(key, source, row) of every candidate id of the batch's rows; `positions` are the rows' positions."""
        if isinstance(batch, pa.Table):
            found = self._columns(batch)
            if found is not None:
                ids, ok, undecided = found
                rows = np.nonzero(ok)[0]
                table = _id_table(ids.filter(pa.array(ok)), source, positions[rows])
                if not len(undecided):
                    return table
                rest = self._per_row(python_rows(batch.take(pa.array(undecided, pa.int64()))), source,
                                     positions[undecided])
                return pa.concat_tables([table, rest])
        raw = python_rows(batch) if isinstance(batch, pa.Table) else batch
        return self._per_row(raw, source, positions)

    def _columns(self, table: pa.Table) -> tuple[pa.Array, np.ndarray, np.ndarray] | None:
        """(ids, rows with an id, rows for the adapter) of a table, or None when the table has no column form."""
        n = table.num_rows
        if self.format == "canonical":
            ids = as_text(table.column("id")) if "id" in table.column_names else pa.nulls(n, pa.string())
            if ids is None:  # a valid canonical pair's id is a string: other types never make a pair
                return None
            return ids, _valid(ids), np.zeros(0, dtype=np.int64)
        if self.format == "hh_rlhf_scores":
            if not all(name in table.column_names for name in HH_TEXTS):
                return None
            texts = [as_text(table.column(name)) for name in HH_TEXTS]
            if any(t is None for t in texts):
                return None
            ids, ok = hh_rlhf_ids(table, *texts)
            has_id = _valid(ids)
            with_texts = np.logical_and.reduce([_valid(t) for t in texts])
            # the adapter gives no id without the three texts; blank or odd ids are left to it
            return ids, has_id & ok & with_texts, np.nonzero(with_texts & ~ok)[0]
        return None

    def _per_row(self, raw: list, source: int, positions: np.ndarray) -> pa.Table:
        ids, rows = [], []
        for k, row in enumerate(raw):
            for pair_id in self.row_ids(row):
                ids.append(pair_id)
                rows.append(positions[k])
        return _id_table(pa.array(ids, pa.string()), source, np.array(rows, dtype=np.int64))

    def row_ids(self, raw) -> list[str]:
        """Candidate ids of one raw row; none when the row is rejected before it has any."""
        try:
            candidates = self.adapt(decode_record(raw), self.objectives, Counter())
            ids = [c.get("id") for c in candidates if isinstance(c, dict)]
            return [i for i in ids if isinstance(i, str) and is_utf8(i)]
        except Exception:  # noqa: BLE001 — the main pass quarantines this row with its reason
            return []


def _valid(array: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.is_valid(array), False).to_numpy(zero_copy_only=False).astype(bool)


def _id_table(ids: pa.Array, source: int, rows: np.ndarray) -> pa.Table:
    return pa.Table.from_arrays([pa.array(hash64(ids.cast(pa.string())), pa.uint64()),
                                 pa.array(np.full(len(ids), source, dtype=np.int32)),
                                 pa.array(rows.astype(np.int64))], schema=ID_SCHEMA)
