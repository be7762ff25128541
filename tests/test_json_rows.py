"""`.json` files holding one JSON array (FastChat's format, the authors' `json.dumps(items)`) read as rows in every
reader, next to JSON Lines (issue 17 item 2), and released equal rows without objectives kept (item 3)."""

from __future__ import annotations

import io
import json
import random
from collections import Counter

import pyarrow.parquet as pq
import pytest

from metaaligner.cli import main as cli_main
from metaaligner.data.formats.fastchat import fastchat
from metaaligner.data.formats.hh_rlhf_raw import split_batch
from metaaligner.data.io import discovery, json_rows
from metaaligner.data.io.row_input import parse_rows, read_row_input
from metaaligner.data.io.sources import BadInputFile, Sources
from metaaligner.objectives import load_objective_set
from metaaligner.prompts import get_template
from metaaligner.storage import Storage

ITEMS = [{"id": k, "conversations": [{"from": "human", "value": f"a \"quoted\" [{k}], {{braces}} \\ é\n"},
                                     {"from": "gpt", "value": "t,]}"}]} for k in range(7)]


def split(data: bytes, chunk: int, batch_size: int = 3) -> list[bytes]:
    stream = io.BytesIO(data)
    return [row for batch in json_rows.split_array(lambda _: stream.read(chunk), batch_size) for row in batch]


@pytest.mark.parametrize("chunk", [1, 2, 5, 64, 1 << 20])
def test_an_array_splits_into_its_elements_whatever_the_chunking(chunk):
    for text in (json.dumps(ITEMS), json.dumps(ITEMS, indent=2), "  [ 1 , \"a,b]\" , {\"x\": [1, {}]} ]\n"):
        expected = json.loads(text)
        assert [json.loads(r) for r in split(text.encode(), chunk)] == expected
    assert split(b"[]", chunk) == [] and split(b"[1,]", chunk) == [b"1", b""]  # "" is quarantined later


@pytest.mark.parametrize("data,message", [(b'[{"a": 1}, {"b"', "not closed"), (b"[1]\n[2]", "after the end"),
                                          (b'[{"a": 1}}]', "unbalanced")])
def test_a_malformed_array_fails_the_file(data, message):
    with pytest.raises(ValueError, match=message):
        split(data, 4)


def test_arrays_and_json_lines_are_told_apart_by_the_first_bytes():
    assert json_rows.is_array(json.dumps(ITEMS).encode())  # the authors' json.dumps(items): one line
    assert json_rows.is_array(b"\n [\n  {\"a\": 1}\n]\n")  # pretty-printed
    assert not json_rows.is_array(b'{"a": 1}\n{"a": 2}\n')
    assert not json_rows.is_array(b'[1, 2]\n{"a": 1}\n')  # JSON Lines whose first row is an array


def test_reformulation_sources_read_an_array_file_as_rows(tmp_path):
    fs = Storage().filesystem(str(tmp_path))[0]
    (tmp_path / "a.json").write_text(json.dumps(ITEMS))
    (tmp_path / "b.json").write_text("".join(json.dumps(i) + "\n" for i in ITEMS))
    (tmp_path / "cut.json").write_text(json.dumps(ITEMS)[:-40])
    sources = Sources("jsonl", [str(tmp_path / n) for n in ("a.json", "b.json", "cut.json")], fs)
    for index in (0, 1):
        batches = list(sources.batches(index, 3))
        assert [first for first, _ in batches] == [0, 3, 6]
        assert [json.loads(r) for _, b in batches for r in b] == ITEMS
    with pytest.raises(BadInputFile, match="not closed") as e:
        list(sources.batches(2, 3))
    assert e.value.rows_before_error == 6


def test_correct_evaluate_and_score_read_an_array_file(ray_cluster, tmp_path):
    rows = [{"id": "a", "question": "q1", "answer": "x"}, [1, 2], {"id": "b", "question": "q2", "answer": "y"}]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "rows.json").write_text(json.dumps(rows))
    found = read_row_input(str(tmp_path / "in"), Storage())
    assert found.kind == "jsonl" and found.columns == {"id", "question", "answer"}
    decoded, quarantined = parse_rows(found.dataset.take_batch(10, batch_format="pyarrow"), "jsonl")
    assert decoded == [rows[0], rows[2]]
    assert [q["reason"] for q in quarantined] == ["invalid_json"] and quarantined[0]["record"] == "[1, 2]"

    hh = [{"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}] * 2
    (tmp_path / "hh").mkdir()
    (tmp_path / "hh" / "train.json").write_text(json.dumps(hh))
    kind, files = discovery.discover(str(tmp_path / "hh"), Storage())
    raw = discovery.read_files(kind, files, Storage().filesystem(str(tmp_path))[0]).take_batch(
        10, batch_format="pyarrow")
    assert split_batch(raw, json_lines=True).column("chosen_response").to_pylist() == [" yes", " yes"]


# -- the authors' released FastChat files -----------------------------------------------------------------------

HH_ASPECTS = ["Harmlessness: The response should avoid content that is offensive, discriminatory, or harmful",
              "Helpfulness: The response should provide useful resources and suggestions to the user",
              "Humour: The response should be cheerful and amusing"]


def authors_hh_items(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """What the authors' HH-RLHF data script writes: contrastive items per direction, and an equal item whenever a
    score ties, whose aspects are (as released) the ones the REJECTED answer won, often none."""
    rng = random.Random(seed)
    better, equal = get_template("hh_rlhf").format_for("better"), get_template("hh_rlhf").format_for("equal")
    items, equal_items = [], []
    for k in range(n):
        query, cr, rr = f"\n\nHuman: question {k}?\n\nAssistant:", f"chosen {k}", f"rejected {k}"
        cs, rs = [rng.choice([0.5, 1.0]) for _ in range(3)], [rng.choice([0.5, 1.0]) for _ in range(3)]
        chosen = [a for a, c, r in zip(HH_ASPECTS, cs, rs) if c > r]
        rejected = [a for a, c, r in zip(HH_ASPECTS, cs, rs) if c < r]
        tied = [a for a, c, r in zip(HH_ASPECTS, cs, rs) if c == r]
        if chosen:
            items.append((better.format(aspects="; ".join(chosen), question=query, answer=rr), cr))
        if rejected:
            items.append((better.format(aspects="; ".join(rejected), question=query, answer=cr), rr))
        if tied:
            equal_items.append((equal.format(aspects="; ".join(rejected), question=query, answer=rr), cr))
    as_rows = lambda pairs, start: [{"id": start + i, "conversations": [{"from": "human", "value": p},  # noqa: E731
                                                                        {"from": "gpt", "value": t}]}
                                    for i, (p, t) in enumerate(pairs)]
    return as_rows(items, 0), as_rows(equal_items, len(items))


def test_equal_row_without_objectives_is_kept_as_released():
    prompt = get_template("hh_rlhf").format_for("equal").format(aspects="", question="\n\nHuman: q", answer="a")
    stats = Counter()
    (item,) = fastchat({"id": 3, "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": "t"}]},
                       load_objective_set("hh_rlhf"), stats)
    assert item["objectives"] == [] and item["prompt"] == prompt and item["subset"] == "equal"
    assert stats["empty_objectives"] == 1


def test_reformulate_fastchat_reads_the_authors_json_files(ray_cluster, storage, tmp_path):
    """Done-when: `reformulate --format fastchat` reads a JSON-array file as the authors' scripts write it."""
    items, equal_items = authors_hh_items(60)
    empty = sum("aspects:  | Context:" in r["conversations"][0]["value"] for r in equal_items)
    assert items and 0 < empty < len(equal_items)
    for folder, rows in (("no_equal", items), ("all_equal", equal_items)):
        (tmp_path / "released" / folder).mkdir(parents=True)
        (tmp_path / "released" / folder / "train.json").write_text(json.dumps(rows))  # their f.write(json.dumps(...))
    for folder, rows in (("no_equal", items), ("all_equal", equal_items)):
        out = tmp_path / "out" / folder
        assert cli_main(["reformulate", "--input", str(tmp_path / "released" / folder), "--output", str(out),
                         "--format", "fastchat", "--objectives", "hh_rlhf"]) == 0
        s = json.loads((out / "_summary.json").read_text())
        assert s["rows_read"] == s["valid_pairs"] == s["items_total"] == len(rows) and s["quarantined"] == 0
        assert s["empty_objectives"] == (empty if folder == "all_equal" else 0)
        subset = "contrastive" if folder == "no_equal" else "equal"
        got = sorted(pq.read_table(out / subset).to_pylist(), key=lambda r: int(r["id"]))
        assert [g["prompt"] for g in got] == [r["conversations"][0]["value"] for r in rows]  # verbatim
        assert [g["target"] for g in got] == [r["conversations"][1]["value"] for r in rows]
