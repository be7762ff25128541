"""Resume cache next to the outputs: verdicts keyed by (item id, objective, candidate, order), one JSONL shard
per judged batch, local or S3. A re-run judges only the keys that are missing (or whose texts changed)."""

from __future__ import annotations

import hashlib
import json
import uuid

from metaaligner import storage as st
from metaaligner.storage import Storage

CANDIDATE_FIRST, GOLDEN_FIRST = "cg", "gc"
FIELDS = ("id", "objective", "candidate", "order", "hash", "outcome", "choice", "attempts", "raw")


def digest(*parts: str, size: int = 16) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:size]


def order_for(seed: int, item_id: str, objective: str, candidate: str) -> str:
    """The seeded, per-comparison random answer order: 'cg' (candidate shown first) or 'gc' (golden first)."""
    return CANDIDATE_FIRST if int(digest(str(seed), item_id, objective, candidate), 16) & 1 else GOLDEN_FIRST


def outcome_for(order: str, choice: int | None) -> str:
    """The candidate's outcome against the golden answer from the judge's positional choice."""
    if choice is None:
        return "invalid"
    if choice == 0:
        return "tie"
    candidate_position = 1 if order == CANDIDATE_FIRST else 2
    return "win" if choice == candidate_position else "loss"


def key_of(record: dict) -> tuple[str, str, str, str]:
    return record["id"], record["objective"], record["candidate"], record["order"]


class ResultCache:
    """Folder of JSONL shards under `<output>/_cache/<judge fingerprint>/`."""

    def __init__(self, output: str, judge_identity: dict, storage: Storage):
        self.fingerprint = digest(json.dumps(judge_identity, sort_keys=True))
        self.uri = st.join(output, "_cache", self.fingerprint)
        self.storage = storage

    def load(self) -> dict[tuple, dict]:
        if not self.storage.exists(self.uri):
            return {}
        records: dict[tuple, dict] = {}
        fs, _ = self.storage.filesystem(self.uri)
        for path in self.storage.list_files(self.uri, (".jsonl",)):
            with fs.open_input_stream(path) as f:
                for line in f.read().decode("utf-8").splitlines():
                    try:
                        rec = json.loads(line)
                        records[key_of(rec)] = rec
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by an interrupted write: that item is judged again
        return records

    def write_shard(self, records: list[dict]) -> None:
        """One new shard per judged batch (unique name; shards are never rewritten)."""
        lines = "".join(json.dumps({k: r[k] for k in FIELDS}, sort_keys=True) + "\n" for r in records)
        self.storage.write_text(st.join(self.uri, f"{uuid.uuid4().hex}.jsonl"), lines)
