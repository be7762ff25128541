"""The `hh_rlhf_raw` input format: Anthropic/hh-rlhf rows (`chosen`, `rejected` transcripts) -> one prompt and two
responses, with a quarantine reason for every row that cannot be split.

Two splits (`score.split`):
- `reference` (as the MetaAligner reference's `prepare_dataset_with_rewards.py`): the prompt is the chosen
  transcript up to its last "\n\nAssistant:" with a space inserted before that marker, each response is what
  follows its transcript's last marker, stripped. Like the reference it checks nothing else: a transcript without
  an assistant turn gives the prompt " \n\nAssistant:" and the whole transcript (stripped) as the response, the
  rejected transcript's own prompt is not compared, and a human turn after the last assistant turn stays in the
  response; such rows are kept and counted by their `note`.
- `plain`: the prompt runs up to and including the last marker and the response is the rest (prompt + response is
  the transcript again); both prompts must match, and rows that cannot be split that way are quarantined.
"""

from __future__ import annotations

import pyarrow as pa

from metaaligner.data.contract import Rejected, decode_row, decode_text, is_utf8, parse_json, record_json, utf8_safe

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"
PATH_COLUMN = "path"  # added by Ray Data readers with include_paths=True
TEXT_COLUMN = "text"  # JSON lines are read as text and parsed here, so one bad line is quarantined, not fatal

SPLIT_SCHEMA = pa.schema([
    ("prompt", pa.string()),
    ("chosen_response", pa.string()),
    ("rejected_response", pa.string()),
    ("chosen", pa.string()),  # the transcripts as read (token counts, quarantine records)
    ("rejected", pa.string()),
    ("note", pa.string()),  # reference split: what the reference lets through (no_assistant_turn, ...), else null
    ("reason", pa.string()),  # null for a usable row
    ("detail", pa.string()),
    ("record", pa.string()),  # the original row as JSON (quarantined rows only)
    ("source", pa.string()),
])


def split_transcript(text: str, field: str) -> tuple[str, str]:
    """(prompt, response): the prompt runs up to and including the last "\\n\\nAssistant:", the response is the rest."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise Rejected("no_assistant_turn", f"{field} has no '\\n\\nAssistant:' turn")
    end = cut + len(ASSISTANT)
    if HUMAN in text[end:]:
        raise Rejected("no_final_assistant_turn", f"{field} ends with a human turn, not an assistant answer")
    return text[:end], text[end:]


def transcripts(record: dict) -> tuple[str, str]:
    """(chosen, rejected) of one hh-rlhf row as text, or Rejected."""
    texts = []
    for field in ("chosen", "rejected"):
        value = record.get(field)
        if value is None:
            raise Rejected("missing_field", f"{field} is missing")
        if not isinstance(value, str):
            raise Rejected("wrong_type", f"{field} must be a string, got {type(value).__name__}")
        if not is_utf8(value):
            raise Rejected("invalid_utf8", f"{field} holds a lone surrogate (text that is not valid UTF-8)")
        texts.append(value)
    return texts[0], texts[1]


def split_pair(record: dict) -> tuple[str, str, str]:
    """(prompt, chosen_response, rejected_response) of one hh-rlhf row by the plain split, or Rejected.

    Both transcripts must share the prompt exactly; otherwise the row is a `prompt_mismatch`.
    """
    chosen_text, rejected_text = transcripts(record)
    (prompt, chosen), (other, rejected) = (split_transcript(chosen_text, "chosen"),
                                           split_transcript(rejected_text, "rejected"))
    if prompt != other:
        at = next((i for i, (a, b) in enumerate(zip(prompt, other)) if a != b), min(len(prompt), len(other)))
        raise Rejected("prompt_mismatch", f"chosen and rejected differ before their last assistant turn "
                                          f"(first difference at character {at})")
    return prompt, chosen, rejected


def reference_split(record: dict) -> tuple[str, str, str, str | None]:
    """(prompt, chosen_response, rejected_response, note) of one hh-rlhf row as the reference splits it."""
    chosen_text, rejected_text = transcripts(record)
    *before, chosen = chosen_text.split(ASSISTANT)
    *other, rejected = rejected_text.split(ASSISTANT)
    note = None
    if not before:
        note = "no_assistant_turn"
    elif other != before:
        note = "prompt_mismatch"
    elif HUMAN in chosen or HUMAN in rejected:
        note = "final_human_turn"
    return ASSISTANT.join(before) + " " + ASSISTANT, chosen.strip(), rejected.strip(), note


SPLITS = {"plain": lambda record: (*split_pair(record), None), "reference": reference_split}


def _decode(row: dict, json_lines: bool) -> dict:
    """A raw row -> a record: JSON lines arrive as text (str or bytes), columnar rows as dicts (CSV cells as bytes)."""
    if not json_lines:
        return decode_row(row)
    line = row[TEXT_COLUMN]
    record = parse_json(decode_text(line, "the line") if isinstance(line, bytes) else line, "the line")
    if not isinstance(record, dict):
        raise Rejected("invalid_json", f"a JSON line must hold an object, got {type(record).__name__}")
    return record


def _original(row: dict, json_lines: bool):
    """The row as read, for its quarantine record."""
    if not json_lines:
        return row
    line = row.get(TEXT_COLUMN)
    return line.decode("utf-8", "backslashreplace") if isinstance(line, bytes) else line


def split_batch(batch: pa.Table, json_lines: bool, split: str = "plain") -> pa.Table:
    """Ray Data batch function: raw rows -> SPLIT_SCHEMA rows (one per input row, bad rows carry a reason)."""
    sources = batch.column(PATH_COLUMN).to_pylist() if PATH_COLUMN in batch.column_names else None
    if sources is not None:
        batch = batch.drop_columns([PATH_COLUMN])
    columns: dict[str, list] = {name: [] for name in SPLIT_SCHEMA.names}
    for i, row in enumerate(batch.to_pylist()):
        try:
            record = _decode(row, json_lines)
            texts, problem = (*SPLITS[split](record), *transcripts(record)), None
        except Rejected as r:
            texts, problem = (None,) * 6, (r.reason, r.detail)
        except Exception as e:  # noqa: BLE001 — any failure on one row is quarantined, never fatal
            texts, problem = (None,) * 6, ("internal_error", f"{type(e).__name__}: {e}")
        for name, value in zip(("prompt", "chosen_response", "rejected_response", "note", "chosen", "rejected"),
                               texts):
            columns[name].append(value)
        columns["reason"].append(problem and problem[0])
        columns["detail"].append(problem and utf8_safe(problem[1]))
        columns["record"].append(problem and record_json(_original(row, json_lines)))
        columns["source"].append(utf8_safe(str(sources[i])) if sources else None)
    return pa.Table.from_pydict(columns, schema=SPLIT_SCHEMA)
