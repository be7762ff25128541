"""How reformulation writes Parquet: large row groups, dictionary encoding only where values repeat.

Batches are buffered per part file and written as one row group once `row_group_bytes` of Arrow data have
gathered (not one row group per 8,192-row batch); dictionary encoding is asked for only on the
low-cardinality columns (subset, condition, template, objective names, quarantine reasons and sources),
never on prompts and answers, where every value differs and the dictionary attempt only costs time.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from metaaligner.data.contract import ITEM_SCHEMA, QUARANTINE_SCHEMA, TEST_SCHEMA

ROW_GROUP_BYTES = 64 << 20
LOW_CARDINALITY = {  # Parquet column paths per schema (list elements as written by pyarrow's compliant nesting)
    ITEM_SCHEMA: ["subset", "condition", "template", "objectives.list.element"],
    TEST_SCHEMA: [],
    QUARANTINE_SCHEMA: ["reason", "source"],
}


def writer_options(schema: pa.Schema) -> dict:
    dictionary = next((cols for s, cols in LOW_CARDINALITY.items() if s.equals(schema)), [])
    return {"compression": "snappy", "use_dictionary": dictionary or False,
            "write_statistics": [c for c in dictionary if "." not in c] or False}


class RowGroupWriter:
    """A ParquetWriter that writes one row group per `row_group_bytes` of buffered batches."""

    def __init__(self, sink, schema: pa.Schema, row_group_bytes: int = ROW_GROUP_BYTES, filesystem=None):
        self.schema, self.row_group_bytes = schema, row_group_bytes
        self.writer = pq.ParquetWriter(sink, schema, filesystem=filesystem, **writer_options(schema))
        self.pending: list[pa.Table] = []
        self.pending_bytes = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.pending.append(table)
        self.pending_bytes += table.nbytes
        self.rows += table.num_rows
        if self.pending_bytes >= self.row_group_bytes:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            table = pa.concat_tables(self.pending)  # chunks are not copied; one row group spans them
            self.writer.write_table(table, row_group_size=table.num_rows)
            self.pending, self.pending_bytes = [], 0

    def close(self) -> None:
        """Write what is buffered and the footer."""
        self.flush()
        self.writer.close()

    def drop(self) -> None:
        """Forget the buffer and never write a footer (the stream underneath is aborted by its owner)."""
        self.pending, self.pending_bytes = [], 0
        self.writer.is_open = False
