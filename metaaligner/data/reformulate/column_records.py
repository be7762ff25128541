"""The quarantine record of a row the column checks passed, column-wise: its format adapter's candidate as
`contract.record_json` writes it. The resolve step quarantines losing duplicates with it, where the per-row path
would adapt and dump each row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from metaaligner.data.io.json_text import json_objects, json_values
from metaaligner.data.reformulate.column_algorithm import PairColumns
from metaaligner.objectives import ObjectiveSet


def candidate_records(fmt: str, objectives: ObjectiveSet, table: pa.Table,
                      pairs: PairColumns) -> tuple[pa.Array, np.ndarray] | None:
    """(record JSON per row, ok) for rows of `table` whose pairs (`pairs`, one per row) passed the column checks;
    `ok` is False where Python must write the record; None when the table has no column form."""
    if fmt == "canonical":  # the candidate is the row itself
        members = _members([(name, table.column(name)) for name in table.column_names], table.num_rows)
    elif fmt == "hh_rlhf_scores":
        members = _hh_rlhf_scores(objectives, table, pairs)
    else:
        return None
    if members is None:
        return None
    fields, ok = members
    return json_objects(fields, table.num_rows), ok


def _members(columns: list[tuple[str, object]], n: int) -> tuple[list[tuple[str, pa.Array]], np.ndarray] | None:
    """(key, json text) per column and ok; None when a column has no column form."""
    fields, ok = [], np.ones(n, dtype=bool)
    for key, column in columns:
        values = json_values(column)
        if values is None:
            return None
        fields.append((key, values[0]))
        ok &= values[1]
    return fields, ok


def _hh_rlhf_scores(objectives: ObjectiveSet, table: pa.Table,
                    pairs: PairColumns) -> tuple[list[tuple[str, pa.Array]], np.ndarray] | None:
    """{id, question, response_1, response_2, scores_1, scores_2} as `formats.hh_rlhf.hh_rlhf_scores` builds it; a
    row where both scores of an objective are missing (the adapter leaves the name out) is left to Python."""
    n = table.num_rows
    members = _members([("id", pairs.ids), ("question", pairs.question), ("response_1", pairs.response_1),
                        ("response_2", pairs.response_2)], n)
    if members is None:
        return None
    fields, ok = members
    sides: tuple[list, list] = ([], [])
    for k, name in enumerate(objectives.names, start=1):
        columns = [table.column(f"{side}_score{k}") if f"{side}_score{k}" in table.column_names else None
                   for side in ("chosen", "rejected")]
        if columns[0] is None and columns[1] is None:
            continue
        columns = [pa.nulls(n, pa.float64()) if c is None else c for c in columns]
        present = [pc.fill_null(pc.is_valid(c), False).to_numpy(zero_copy_only=False) for c in columns]
        ok &= present[0] | present[1]
        for side, column in zip(sides, columns):
            side.append((name, column))
    for key, side in zip(("scores_1", "scores_2"), sides):
        scores = _members(side, n)
        if scores is None:
            return None
        fields.append((key, json_objects(scores[0], n)))
        ok &= scores[1]
    return fields, ok
