"""Input discovery: test splits are skipped for training inputs, and outputs of ours are read through their manifest."""

from __future__ import annotations

import logging

import pytest

from metaaligner.data.io.discovery import discover
from metaaligner.outputs import OutputError, StagedOutput
from metaaligner.storage import Storage

LOCAL = Storage()


def _touch(path, text="{}\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_test_splits_are_skipped_only_when_asked(tmp_path, caplog):
    keep = [_touch(tmp_path / "train.csv"), _touch(tmp_path / "more" / "train_2.csv"), _touch(tmp_path / "testing.csv"),
            _touch(tmp_path / "contest.csv"), _touch(tmp_path / "train-00000-of-00001.csv")]
    held_out = [_touch(tmp_path / "test.csv"), _touch(tmp_path / "test_part-1.csv"), _touch(tmp_path / "test" / "a.csv"),
                _touch(tmp_path / "test-00000-of-00001.csv")]  # a Hugging Face shard name
    with caplog.at_level(logging.WARNING):
        kind, files = discover(str(tmp_path), LOCAL, skip_test_files=True)
    assert kind == "csv" and files == sorted(keep)
    assert "skipping 4 test-split file(s)" in caplog.text
    assert discover(str(tmp_path), LOCAL)[1] == sorted(keep + held_out)  # correct/evaluate read everything
    assert discover(str(tmp_path / "test.csv"), LOCAL, skip_test_files=True)[1] == held_out[:1]  # named explicitly


def test_outputs_are_read_through_their_manifest(tmp_path):
    root = tmp_path / "reformulated"
    out = StagedOutput(str(root), "reformulate", LOCAL)
    for rel in ("contrastive/part-1.parquet", "equal/part-1.parquet", "_quarantine/part-1.parquet"):
        _touch(tmp_path / "reformulated" / "_staging" / out.run_id / rel)
    out.commit({})
    stale = _touch(root / "contrastive" / "part-0-from-a-killed-copy.parquet")
    assert discover(str(root / "contrastive"), LOCAL)[1] == [str(root / "contrastive" / "part-1.parquet")]
    assert stale not in discover(str(root), LOCAL)[1] and len(discover(str(root), LOCAL)[1]) == 2  # no _quarantine

    other = tmp_path / "half-written"
    run = StagedOutput(str(other), "reformulate", LOCAL)
    _touch(other / "_staging" / run.run_id / "equal" / "p.parquet")
    _touch(other / "equal" / "p.parquet")
    for uri in (other, other / "equal"):
        with pytest.raises(OutputError, match="incomplete run"):
            discover(str(uri), LOCAL)


def test_a_byte_order_mark_at_the_start_of_a_jsonl_or_csv_file_is_read(tmp_path):
    import pyarrow as pa

    from metaaligner.data.contract import decode_record
    from metaaligner.data.io.row_input import parse_rows
    from metaaligner.data.io.sources import Sources

    bom = "\ufeff".encode()
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"id": "1", "question": "q"}\n{"id": "2"}\n')
    (tmp_path / "a.csv").write_bytes(bom + b'id,question\n1,"q"\n')
    fs, _ = LOCAL.filesystem(str(tmp_path))
    (_, lines), = Sources("jsonl", [str(tmp_path / "a.jsonl")], fs).batches(0, 10)
    assert [decode_record(line) for line in lines] == [{"id": "1", "question": "q"}, {"id": "2"}]
    (_, table), = Sources("csv", [str(tmp_path / "a.csv")], fs).batches(0, 10)
    assert table.column_names == ["id", "question"] and table.column("id").to_pylist() == [b"1"]
    rows, quarantined = parse_rows(pa.table({"text": ['\ufeff{"question": "q"}'], "path": ["a.jsonl"]}), "jsonl")
    assert rows == [{"question": "q"}] and not quarantined  # correct and evaluate read it too
