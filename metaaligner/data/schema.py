"""The data contract: canonical preference pairs in, correction items and quarantine records out."""

from __future__ import annotations

import pyarrow as pa

PREFERENCE_SYMBOLS = {">": 1, "<": 2, "=": 0}  # response_1 better / response_2 better / tie
SUBSETS = ("contrastive", "equal")

ITEM_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("pair_id", pa.string()),
    ("subset", pa.string()),
    ("condition", pa.string()),
    ("objectives", pa.list_(pa.string())),
    ("prompt", pa.string()),
    ("weak_answer", pa.string()),
    ("target", pa.string()),
    ("template", pa.string()),
])

TEST_SCHEMA = pa.schema([  # held-out evaluation rows (reformulate --holdout-fraction)
    ("id", pa.string()),
    ("question", pa.string()),
    ("golden", pa.string()),
    ("candidates", pa.list_(pa.string())),  # the other answers to the question, in input order
])
TEST_SUBSET = "test"

QUARANTINE_SCHEMA = pa.schema([
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("record", pa.string()),  # the original row as JSON (or the raw line)
    ("source", pa.string()),  # input file, when known
])


class Rejected(Exception):
    """A row that cannot be used; it goes to quarantine with a reason code and a human detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
