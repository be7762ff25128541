"""Bad rows and bad files never crash a reformulation (issue 10 items 4 and 9f): each becomes a quarantine
record with a reason, counts reconcile, and too many of them fail the run without committing."""

import csv
import gzip
import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metaaligner.cli import main as cli_main
from metaaligner.config import ReformulateConfig
from metaaligner.data.contract import QUARANTINE_SCHEMA
from metaaligner.data.formats.canonical import validate_pair
from metaaligner.data.reformulate.algorithm import reformulate_pair
from metaaligner.data.reformulate.holdout import HoldoutSplit
from metaaligner.data.reformulate.job import run_reformulation
from metaaligner.data.reformulate.oracle import Reformulator
from metaaligner.data.reformulate.owners import LocalIdRegistry
from metaaligner.objectives import load_objective_set
from metaaligner.outputs import OutputError
from metaaligner.prompts import get_template
from metaaligner.synthetic import make_pair

SYN = load_objective_set("synthetic")
UF = load_objective_set("ultrafeedback")
HH = load_objective_set("hh_rlhf")
DEEP = "[" * 100_000 + "]" * 100_000  # deeper than any JSON parser's recursion limit
HUGE = "x" * ((1 << 20) + 1)  # over the default max_row_bytes
BOM = "\ufeff"
UF_KEYS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
SETS = {"canonical": "synthetic", "ultrafeedback": "ultrafeedback", "hh_rlhf_scores": "hh_rlhf",
        "fastchat": "synthetic"}


def completion(text, ratings="4444", annotations=None):
    return {"response": text, "annotations": annotations if annotations is not None else
            {k: {"Rating": r} for k, r in zip(UF_KEYS, ratings)}}


def pair(pid, **over):
    return {"id": pid, "question": f"question {pid}", "response_1": "a", "response_2": "b",
            "preferences": {"Calmness": ">"}, **over}


def hh(k, **over):
    return {"prompt": f"\n\nHuman: q{k}\n\nAssistant:", "chosen_response": f"yes {k}", "rejected_response": "no",
            "chosen_score1": 0.5, "rejected_score1": 0.1, "chosen_score2": -1.0, "rejected_score2": 0.2,
            "chosen_score3": 0.0, "rejected_score3": 0.0, **over}


def released(k, prompt=None, target=None, **over):
    prompt = prompt or get_template("paper").render("better", SYN.render(["Calmness"]), f"q{k}", "weak!")
    return {"id": f"r{k}", "conversations": [{"from": "human", "value": prompt},
                                             {"from": "gpt", "value": target or "calm."}], **over}


def good_rows(fmt, n):
    rng = random.Random(4)
    if fmt == "canonical":
        return [make_pair(f"g{k}", rng) for k in range(n)]
    if fmt == "ultrafeedback":
        return [{"instruction": f"instruction {k}", "completions": [completion(f"c{k}-{j}", r) for j, r in
                                                                   enumerate(("5432", "1234", "3333"))]}
                for k in range(n)]
    if fmt == "hh_rlhf_scores":
        return [hh(k) for k in range(n)]
    items = [i for k in range(n) for i in reformulate_pair(validate_pair(make_pair(f"g{k}", rng), SYN, None), SYN,
                                                            get_template("paper"), 1)]
    return [released(k, i["prompt"], i["target"]) for k, i in enumerate(items[:n])]


# Poison rows per format: each makes exactly one quarantine record, in every file type.
POISON = {
    "canonical": [
        pair("p1", preferences=[[["Calmness"], ">"]]),  # an unhashable preference key
        pair("p2", preferences=DEEP),  # nested too deeply
        pair("p3", question="lone \udc80 surrogate"),
        pair("p4", preferences={"Calmness": "better"}),
        pair("p5", preferences={}),
        pair("p6", preferences={"Calmness": {"nested": [1, {"x": None}]}}),
        pair("p7", response_1=HUGE),
    ],
    "ultrafeedback": [
        {"instruction": "u1", "completions": [completion("a", annotations=[1, 2]), completion("b")]},  # a list
        {"instruction": "u2", "completions": DEEP},
        {"instruction": "u3 \udc80", "completions": [completion("a"), completion("b")]},
        {"instruction": "u4", "completions": {"not": "a list"}},
        {"instruction": "u5", "completions": [completion("a"), completion(["not", "text"])]},
        {"instruction": "u6", "completions": [completion("a", annotations={k: {"Rating": {"x": [1]}} for k in UF_KEYS}),
                                              completion("b")]},
        {"instruction": "u7", "completions": [completion(HUGE), completion("b")]},
    ],
    "hh_rlhf_scores": [
        hh(101, chosen_score1=[1, 2]),
        hh(102, chosen_score2="NaN"),
        hh(103, chosen_response="lone \udc80"),
        hh(104, prompt=""),
        hh(105, rejected_score3=DEEP),
        hh(106, chosen_response=HUGE),
    ],
    "fastchat": [
        released(201, conversations={"from": "human"}),
        released(202, prompt="Rewrite this nicely: hello"),
        released(203, prompt=get_template("paper").render("better", "Wit: be witty", "q", "a")),
        released(204, target="lone \udc80"),
        released(205, conversations=DEEP),
        released(206, conversations=[{"from": "human", "value": ["a"]}, {"from": "gpt", "value": "x"}]),
        released(207, target=HUGE),
    ],
}
RAW_JSONL_POISON = [b"{not json", b"[1, 2]", b"null", b'{"deep": ' + DEEP.encode() + b"}", b"\xff\xfe{}"]


def _cell(value):
    return value if isinstance(value, str) else json.dumps(value)


def write_input(kind, fmt, folder):
    """Good rows in one file plus every poison row of the format; returns the number of poison rows written."""
    folder.mkdir(parents=True)
    good, poison = good_rows(fmt, 40), POISON[fmt]
    if kind == "jsonl":
        lines = [json.dumps(r).encode() for r in good + poison] + RAW_JSONL_POISON
        random.Random(0).shuffle(lines)
        lines.insert(0, lines.pop(lines.index(json.dumps(good[0]).encode())))  # behind a byte order mark
        (folder / "rows.jsonl").write_bytes(BOM.encode() + b"\n".join(lines) + b"\n")
        return len(poison) + len(RAW_JSONL_POISON)
    if kind == "csv":
        names = sorted({k for r in good + poison for k in r})
        text = io.StringIO(BOM)
        text.seek(0, io.SEEK_END)
        writer = csv.writer(text)
        writer.writerow(names)
        for r in good + poison:
            writer.writerow([_cell(r[n]) if n in r else "" for n in names])
        (folder / "rows.csv").write_bytes(text.getvalue().encode("utf-8", "surrogatepass"))  # -> invalid UTF-8
        return len(poison)
    pq.write_table(pa.Table.from_pylist(good), folder / "good.parquet")
    written = 0
    for k, row in enumerate(poison):  # one file each: every row keeps its own (odd) schema
        for candidate in (row, {n: _cell(v) for n, v in row.items()}):
            try:
                pq.write_table(pa.Table.from_pylist([candidate]), folder / f"poison-{k}.parquet")
                written += 1
                break
            except (pa.ArrowException, UnicodeEncodeError):
                continue  # Arrow cannot hold it as is (e.g. mixed lists): as JSON text, or not at all
    return written


# -- per row, no Ray ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", sorted(POISON))
def test_every_poison_row_is_one_quarantine_record(fmt):
    rows = [json.dumps(r).encode() for r in POISON[fmt]] + RAW_JSONL_POISON
    out = Reformulator(fmt, load_objective_set(SETS[fmt]), get_template("paper"), 1, None, HoldoutSplit(0, 0),
                       LocalIdRegistry())(rows, "poison.jsonl", "0")
    assert len(out.quarantine) == len(rows) == out.counts["rows_bad"]
    assert out.counts["valid_pairs"] == 0 and "quarantined.internal_error" not in out.counts
    pa.Table.from_pylist(out.quarantine, schema=QUARANTINE_SCHEMA)  # UTF-8-safe: Arrow accepts every record
    assert all(q["detail"] and q["record"] and q["source"] == "poison.jsonl" for q in out.quarantine)


def test_the_named_poison_shapes_get_their_reasons():
    def reasons(fmt, rows):
        out = Reformulator(fmt, load_objective_set(SETS[fmt]), get_template("paper"), 1, None, HoldoutSplit(0, 0),
                           LocalIdRegistry())([json.dumps(r).encode() for r in rows], "f", "0")
        return [q["reason"] for q in out.quarantine]

    assert reasons("ultrafeedback", POISON["ultrafeedback"][:1]) == ["wrong_type"]  # annotations as a list
    assert reasons("canonical", POISON["canonical"][:3]) == ["wrong_type", "wrong_type", "invalid_utf8"]
    deep_line = Reformulator("canonical", SYN, get_template("paper"), 1, None, HoldoutSplit(0, 0),
                             LocalIdRegistry())([RAW_JSONL_POISON[3]], "f", "0")
    assert [q["reason"] for q in deep_line.quarantine] == ["invalid_json"]
    for fmt in POISON:  # the last poison row of each format is over max_row_bytes: its record keeps a prefix
        out = Reformulator(fmt, load_objective_set(SETS[fmt]), get_template("paper"), 1, None, HoldoutSplit(0, 0),
                           LocalIdRegistry())([json.dumps(POISON[fmt][-1]).encode()], "f", "0")
        (q,) = out.quarantine
        assert q["reason"] == "row_too_large" and "over max_row_bytes 1048576" in q["detail"]
        assert len(q["record"]) == 1024 and out.counts["rows_bad"] == 1


def test_an_unexpected_failure_is_an_internal_error_record():
    out = Reformulator("canonical", SYN, get_template("paper"), 1, None, HoldoutSplit(0, 0), LocalIdRegistry())(
        [5, json.dumps(pair("ok")).encode()], "f", "0")  # a row type no reader produces
    (q,) = out.quarantine
    assert q["reason"] == "internal_error" and q["detail"].startswith("TypeError:") and q["record"] == "5"
    assert out.counts["rows_read"] == 2 == out.counts["valid_pairs"] + out.counts["rows_quarantined"]


# -- through the job on Ray Data ---------------------------------------------------------------------------------

def reconciles(s):
    assert s["rows_read"] == s["rows_adapted"] + s["rows_quarantined"]
    assert s["pairs_total"] == s["valid_pairs"] + s["pairs_quarantined"]
    assert s["valid_pairs"] == s["training_pairs"] + s["holdout_pairs"]
    assert s["quarantined"] == s["rows_quarantined"] + s["pairs_quarantined"] + s["test_rows_quarantined"]
    assert s["quarantined"] == sum(s["quarantined_by_reason"].values())


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv"])
@pytest.mark.parametrize("fmt", sorted(POISON))
def test_poison_corpus_in_every_format_and_file_type(ray_cluster, storage, tmp_path, fmt, kind):
    n_poison = write_input(kind, fmt, tmp_path / "in")
    cfg = ReformulateConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), format=fmt,
                            objectives=SETS[fmt], template="paper")
    s = run_reformulation(cfg, storage)
    reconciles(s)
    assert s["rows_bad"] == n_poison and "internal_error" not in s["quarantined_by_reason"]
    assert s["training_pairs"] == (120 if fmt == "ultrafeedback" else 40)  # every good row made it (BOM too)
    assert s["quarantined_by_reason"]["row_too_large"] == 1 and s["max_row_bytes"] == 1 << 20
    quarantine = pq.read_table(tmp_path / "out" / "_quarantine").to_pylist()
    assert len(quarantine) == s["quarantined"] and all(q["reason"] and q["detail"] and q["record"] for q in quarantine)


def test_wrong_format_fails_without_committing_and_explains(ray_cluster, storage, tmp_path, capsys):
    rows = good_rows("canonical", 300)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    common = ["reformulate", "--input", str(tmp_path / "in"), "--output", str(out), "--objectives", "synthetic"]
    assert cli_main([*common, "--format", "canonical"]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()

    assert cli_main([*common, "--format", "ultrafeedback"]) == 2  # it used to "succeed" with 0 items
    err = capsys.readouterr().err
    assert "300 of 300 input rows (100.0%)" in err and "max_bad_fraction 0.5" in err
    assert "missing_field: 300 (instruction is missing" in err and '"id": "g0"' in err and "is --format right?" in err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and "_staging" not in p.parts}
    assert after == before  # the committed output is exactly as it was
    (staging,) = (out / "_staging").iterdir()
    assert str(staging) in err
    assert pq.read_table(staging / "_quarantine").num_rows == 300  # the quarantine sample stays readable
    assert json.loads((staging / "_summary.json").read_text())["committed"] is False


def test_bad_input_files_fail_with_their_name_or_are_recorded(ray_cluster, storage, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(2):
        pq.write_table(pa.Table.from_pylist(good_rows("hh_rlhf_scores", 40)[k * 20:(k + 1) * 20]), folder / f"ok-{k}.parquet")
    (folder / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    cfg = ReformulateConfig(input=str(folder), output=str(tmp_path / "out"), format="hh_rlhf_scores",
                            objectives="hh_rlhf")
    with pytest.raises(OutputError, match=r"cannot read input file .*broken\.parquet"):
        run_reformulation(cfg, storage)
    assert not (tmp_path / "out" / "_SUCCESS").exists()

    s = run_reformulation(cfg.model_copy(update={"on_bad_file": "quarantine"}), storage)
    (bad,) = s["bad_files"]
    assert bad["path"].endswith("broken.parquet") and bad["rows_before_error"] == 0 and bad["error"]
    assert s["files"] == 3 and s["valid_pairs"] == 40
    assert json.loads((tmp_path / "out" / "_summary.json").read_text())["bad_files"] == [bad]

    gz = tmp_path / "gz"
    gz.mkdir()
    lines = b"\n".join(json.dumps(r).encode() for r in good_rows("hh_rlhf_scores", 5)) + b"\n"
    (gz / "rows.jsonl.gz").write_bytes(gzip.compress(lines)[:-12])  # a truncated archive
    gz_cfg = cfg.model_copy(update={"input": str(gz), "output": str(tmp_path / "gz-out"), "on_bad_file": "quarantine"})
    with pytest.raises(OutputError, match="none of the 1 input files could be read .*Truncated compressed stream"):
        run_reformulation(gz_cfg, storage)  # nothing readable at all: nothing to commit
    (gz / "more.jsonl").write_bytes(lines)
    s = run_reformulation(gz_cfg, storage)
    (bad,) = s["bad_files"]
    assert bad["path"].endswith("rows.jsonl.gz") and s["rows_read"] == 5 == s["valid_pairs"]


def test_a_file_breaking_half_way_aborts_its_parts(ray_cluster, storage, tmp_path):
    """Items already written for a file that then fails are aborted, never left as a closed, valid-looking part."""
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "scores.parquet"
    pq.write_table(pa.Table.from_pylist([hh(k) for k in range(2000)]), path, row_group_size=1000)
    meta = pq.ParquetFile(path).metadata
    data = bytearray(path.read_bytes())
    second = min(c.dictionary_page_offset or c.data_page_offset for c in
                 (meta.row_group(1).column(k) for k in range(meta.num_columns)))
    for k in range(second, len(data) - meta.serialized_size - 8):  # garble the second row group
        data[k] = (data[k] * 7 + 13) % 256
    path.write_bytes(bytes(data))
    cfg = ReformulateConfig(input=str(tmp_path / "in"), output=str(tmp_path / "out"), format="hh_rlhf_scores",
                            objectives="hh_rlhf", batch_size=300)
    with pytest.raises(OutputError, match=r"cannot read input file .*scores\.parquet: OSError"):
        run_reformulation(cfg, storage)
    (staging,) = (tmp_path / "out" / "_staging").iterdir()
    assert not [p for p in staging.rglob("*") if p.is_file()]  # 900 rows were written, then aborted

    s = run_reformulation(cfg.model_copy(update={"on_bad_file": "quarantine"}), storage)
    assert s["bad_files"][0]["rows_before_error"] == 900 == s["rows_read"] == s["valid_pairs"]
