"""The column path of Algorithm 1 against the per-row path (the oracle): the same items, objective order
included, the same quarantine records and counters, on varied inputs. No Ray needed."""

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metaaligner.data import contract
from metaaligner.data.ids import content_digest
from metaaligner.data.io.columns import python_rows, row_bytes
from metaaligner.data.reformulate.algorithm import _digest, seeded_shuffle
from metaaligner.data.reformulate.batch import VectorReformulator
from metaaligner.data.reformulate.column_algorithm import digest_words, shuffled_positions
from metaaligner.data.reformulate.holdout import HoldoutSplit
from metaaligner.data.reformulate.oracle import Reformulator
from metaaligner.data.reformulate.owners import AllOwners
from metaaligner.objectives import Objective, ObjectiveSet, load_objective_set
from metaaligner.prompts import PROFILES, get_template

UF = load_objective_set("ultrafeedback")
HH = load_objective_set("hh_rlhf")
WIDE = ObjectiveSet("wide", [Objective(f"Aim {k} (ü)", f"description {k} | with pipes {{braces}}") for k in range(13)])
TEXTS = ["plain", "ünïcode ✓ 你好", "pipes | and\nnewlines\n", "{braces} {question} %s", "long " * 3000, " padded ",
         "emoji 🙂", "tab\tinside", "quote \" and \\ backslash"]
BLANKS = ["", "   ", "\u3000", "\u2028 \u00a0", "\n\t"]


def rows_of(columns: dict[str, list]) -> list[dict]:
    names = list(columns)
    return [dict(zip(names, values)) for values in zip(*columns.values())]


def oracle(table: pa.Table, fmt: str, objectives, template, seed=7, decimals=1, split=None, max_row_bytes=1 << 20):
    reformulator = Reformulator(fmt, objectives, template, seed, decimals, split or HoldoutSplit(0.0, 0), AllOwners(),
                                max_row_bytes)
    return reformulator(python_rows(table), "src.parquet", "")


def vectorised(table: pa.Table, fmt: str, objectives, template, seed=7, decimals=1, split=None,
               max_row_bytes=1 << 20):
    return VectorReformulator(fmt, objectives, template, seed, decimals, split or HoldoutSplit(0.0, 0),
                              max_row_bytes)(table, "src.parquet")


def assert_same(table: pa.Table, fmt: str, objectives, template=None, min_vector_share=0.0, **kw):
    template = template or get_template("paper")
    expected = oracle(table, fmt, objectives, template, **kw)
    got = vectorised(table, fmt, objectives, template, **kw)
    assert_outputs(got, expected)
    assert got.vector_rows >= min_vector_share * table.num_rows
    return got


def assert_outputs(got, expected):
    """The column path's output (BatchOutput) is the per-row path's (BatchResult): items, records, counters."""
    for kind, columns in expected.items.items():
        want = sorted(map(json.dumps, rows_of(columns)))
        have = sorted(json.dumps(r) for t in got.tables[kind] for r in t.to_pylist())
        assert have == want, kind
    quarantine = sorted(json.dumps(q, sort_keys=True) for q in expected.quarantine)
    assert sorted(json.dumps(q, sort_keys=True) for t in got.tables["_quarantine"] for q in t.to_pylist()) == quarantine
    assert +got.counts == +expected.counts


def random_preferences(rng, names, junk=0.0):
    prefs = {n: rng.choice(">><<==") for n in rng.sample(names, rng.randint(1, len(names)))}
    if rng.random() < junk:
        kind = rng.randrange(6)
        if kind == 0:
            prefs["Unknown aim"] = ">"
        elif kind == 1:
            prefs[rng.choice(names)] = rng.choice(["better", "", 1, None, ["<"], True])
        elif kind == 2:
            prefs = {}
        elif kind == 3:
            prefs = {n: None for n in names}
        elif kind == 4:
            prefs[rng.choice(names)] = "=="
    return prefs


def json_variants(rng, prefs) -> str:
    """The same mapping written in several JSON styles (and some that are not JSON objects at all)."""
    style = rng.randrange(9)
    if style == 0:
        return json.dumps(prefs, separators=(",", ":"))
    if style == 1:
        return json.dumps(prefs, indent=rng.choice([None, 2]))
    if style == 2:
        return " \n" + json.dumps(prefs) + "\r\n "
    if style == 3:
        return json.dumps(prefs, ensure_ascii=True).replace(">", "\\u003e")
    if style == 4 and prefs:  # a key given twice: json.loads keeps the last
        k = next(iter(prefs))
        return "{" + json.dumps(k) + ': "<", ' + json.dumps(prefs)[1:]
    if style == 5:
        return rng.choice(["null", "[1, 2]", "{not json", "", "3", '"{}"', '[["Honesty", ">"]]', "{}\u00a0"])
    return json.dumps(prefs, ensure_ascii=rng.random() < 0.5)


def canonical_table(rng, n, objectives, junk=0.1, prefs_as="json", ids=None):
    names = objectives.names
    columns = {"id": [], "question": [], "response_1": [], "response_2": [], "preferences": []}
    for i in range(n):
        columns["id"].append(ids[i] if ids else f"id-{i}-{rng.choice(TEXTS)[:8]}")
        for field in ("question", "response_1", "response_2"):
            columns[field].append(rng.choice(BLANKS) if rng.random() < junk / 3 else rng.choice(TEXTS) + str(i))
        prefs = random_preferences(rng, names, junk)
        columns["preferences"].append(json_variants(rng, prefs) if prefs_as == "json" else prefs)
    if rng.random() < junk:
        columns["id"][rng.randrange(n)] = None
    if prefs_as == "json":
        return pa.table(columns)
    # struct column: only string-valued symbols fit; other junk stays in its own rows as None
    clean = [{k: v if isinstance(v, str) or v is None else None for k, v in p.items()} for p in columns["preferences"]]
    columns["preferences"] = clean
    return pa.Table.from_pydict(columns)


@pytest.mark.parametrize("profile", PROFILES)
def test_clean_json_preferences_every_template(profile):
    rng = random.Random(profile)
    table = canonical_table(rng, 400, UF, junk=0.0)
    got = assert_same(table, "canonical", UF, get_template(profile), min_vector_share=0.5)
    assert sum(t.num_rows for t in got.tables["contrastive"]) > 0


@pytest.mark.parametrize("seed", range(4))
def test_junk_json_preferences(seed):
    rng = random.Random(seed)
    assert_same(canonical_table(rng, 500, UF, junk=0.3), "canonical", UF, get_template("ultrafeedback"),
                min_vector_share=0.2, seed=seed)


def test_struct_preferences_with_unknown_fields_and_nulls():
    rng = random.Random(11)
    assert_same(canonical_table(rng, 400, UF, junk=0.3, prefs_as="struct"), "canonical", UF, min_vector_share=0.3)


def test_many_objectives_shuffle_like_the_oracle():
    rng = random.Random(5)
    table = canonical_table(rng, 600, WIDE, junk=0.0)
    got = assert_same(table, "canonical", WIDE, min_vector_share=0.6, seed=12345)  # some JSON styles fall back
    orders = {tuple(o) for t in got.tables["contrastive"] for o in t.column("objectives").to_pylist() if len(o) > 3}
    assert len(orders) > 20


def test_shuffle_kernel_matches_seeded_shuffle():
    rng = np.random.default_rng(0)
    members = rng.random((300, 16)) < 0.6
    ids = [f"p{i}" for i in range(300)]
    words = digest_words(3, pa.array(ids), "equal")[:, :16]
    positions, counts = shuffled_positions(members, words)
    names = [f"o{k}" for k in range(16)]
    for r in range(300):
        group = [names[k] for k in range(16) if members[r, k]]
        assert [names[k] for k in positions[r, :counts[r]]] == seeded_shuffle(group, _digest(3, ids[r], "equal")[:32])


def score_row(rng, names, as_json, junk):
    s1, s2 = {}, {}
    for name in rng.sample(names, rng.randint(1, len(names))):
        a = rng.choice([round(rng.uniform(-3, 3), rng.choice([1, 2, 3])), rng.randint(-2, 2), 0.25, 0.15, 1e-12])
        b = a if rng.random() < 0.3 else round(a + rng.choice([0.01, -0.04, 0.05, 0.5]), 3)
        s1[name], s2[name] = a, b
    if rng.random() < junk:
        kind = rng.randrange(5)
        if kind == 0:
            s1[rng.choice(names)] = rng.choice(["high", "1.5", float("nan"), float("inf"), True])
        elif kind == 1:
            s2.pop(next(iter(s2)))
        elif kind == 2:
            s1["Unknown aim"] = 1.0
        elif kind == 3:
            s1 = {n: None for n in s1}
    if as_json:
        dump = lambda s: json.dumps(s) if all(not isinstance(v, float) or np.isfinite(v) for v in s.values()) else "{}"
        return dump(s1), dump(s2)
    return s1, s2


@pytest.mark.parametrize("as_json,decimals", [(True, 1), (True, None), (False, 2), (False, None), (True, 0)])
def test_scores_ties_and_rounding(as_json, decimals):
    rng = random.Random(f"{as_json}{decimals}")
    names = UF.names
    columns = {"id": [], "question": [], "response_1": [], "response_2": [], "scores_1": [], "scores_2": []}
    for i in range(500):
        columns["id"].append(f"s{i}")
        columns["question"].append(f"q{i} {rng.choice(TEXTS)}")
        columns["response_1"].append(rng.choice(TEXTS))
        columns["response_2"].append(rng.choice(TEXTS))
        s1, s2 = score_row(rng, names, as_json, junk=0.2)
        if not as_json:  # struct fields hold one type: keep floats, leave other junk out
            s1 = {k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None for k, v in s1.items()}
            s2 = {k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None for k, v in s2.items()}
        columns["scores_1"].append(s1)
        columns["scores_2"].append(s2)
    table = pa.table(columns) if as_json else pa.Table.from_pydict(columns)
    assert_same(table, "canonical", UF, decimals=decimals, min_vector_share=0.15)  # many scores end in 5: Python decides


def test_preferences_win_over_scores_and_missing_labels():
    table = pa.Table.from_pydict({
        "id": ["a", "b", "c", "d"], "question": ["q"] * 4, "response_1": ["x"] * 4, "response_2": ["y"] * 4,
        "preferences": ['{"Honesty": ">"}', None, None, "{}"],
        "scores_1": [{"Honesty": 1.0}, {"Honesty": 2.0}, None, {"Honesty": 1.0}],
        "scores_2": [{"Honesty": 3.0}, {"Honesty": 2.0}, {"Honesty": 1.0}, {"Honesty": 1.0}]})
    got = assert_same(table, "canonical", UF)
    assert got.vector_rows == 2 and got.counts["quarantined.missing_field"] == 1


def test_wrong_types_and_invalid_utf8_fall_back_per_row():
    bad = pa.array([b"ok", b"\xed\xa0\x80 surrogate", b"\xff"], pa.binary())
    table = pa.table({"id": pa.array([1, 2, 3]), "question": bad.view(pa.string()), "response_1": ["a", "b", "c"],
                      "response_2": ["a", "b", "c"], "preferences": ['{"Honesty": ">"}'] * 3})
    got = assert_same(table, "canonical", UF)
    assert got.vector_rows == 0 and got.counts["rows_quarantined"] + got.counts["pairs_quarantined"] == 3


def hh_table(rng, n, with_ids, as_csv):
    columns = {"prompt": [], "chosen_response": [], "rejected_response": []}
    if with_ids:
        columns["id"] = [rng.choice([None, f"h{i}", ""]) if i % 7 == 0 else f"h{i}" for i in range(n)]
    for k in (1, 2, 3):
        columns[f"chosen_score{k}"], columns[f"rejected_score{k}"] = [], []
    for i in range(n):
        columns["prompt"].append(f"\n\nHuman: {rng.choice(TEXTS)} {i}\n\nAssistant:")
        columns["chosen_response"].append(rng.choice(TEXTS + BLANKS[:1]))
        columns["rejected_response"].append(rng.choice(TEXTS))
        for k in (1, 2, 3):
            a = rng.choice([round(rng.gauss(0, 1), 4), 0.52, round(rng.gauss(0, 1), 4)])
            b = rng.choice([a, round(rng.gauss(0, 1), 4), round(rng.gauss(0, 1), 4)])
            if rng.random() < 0.05:  # absent scores (empty CSV cells)
                a, b = rng.choice([(None, None), (a, None)])
            columns[f"chosen_score{k}"].append(a)
            columns[f"rejected_score{k}"].append(b)
    table = pa.table(columns)
    if as_csv:  # the CSV reader gives every cell as bytes (missing cells empty)
        table = pa.table({name: pa.array([b"" if v is None else str(v).encode() for v in table.column(name).to_pylist()],
                                         pa.binary()) for name in table.column_names})
    return table


@pytest.mark.parametrize("with_ids,as_csv", [(False, False), (True, False), (False, True), (True, True)])
def test_hh_rlhf_scores(with_ids, as_csv):
    rng = random.Random(f"{with_ids}{as_csv}")
    assert_same(hh_table(rng, 300, with_ids, as_csv), "hh_rlhf_scores", HH, get_template("hh_rlhf"), decimals=None,
                min_vector_share=0.2)


def scored_table(rng, n, duplicates=0):
    """hh_rlhf_scores as `metaaligner score` writes it: text columns, float64 z-scores of rewards rounded to 0.1
    (equal rewards give equal z-scores: ties), no id column; `duplicates` rows repeat an earlier row's texts."""
    columns = {"prompt": [], "chosen_response": [], "rejected_response": []}
    for i in range(n):
        j = rng.randrange(i) if i and rng.random() < duplicates else i
        columns["prompt"].append(f"\n\nHuman: {TEXTS[j % len(TEXTS)]} {j}\n\nAssistant:")
        columns["chosen_response"].append(f" chosen {j} {TEXTS[(j * 7) % len(TEXTS)]}")
        columns["rejected_response"].append(f" rejected {j}")
    raw = np.round(np.array([[rng.gauss(0, 1) for _ in range(2 * n)] for _ in range(3)]), 1)
    z = (raw - raw.mean(axis=1, keepdims=True)) / raw.std(axis=1, keepdims=True)
    for k in range(3):
        columns[f"chosen_score{k + 1}"] = pa.array(z[k, :n], pa.float64())
        columns[f"rejected_score{k + 1}"] = pa.array(z[k, n:], pa.float64())
    return pa.table(columns)


def test_hh_rlhf_scores_as_score_writes_it_ids_included():
    """The paper's path: every clean row takes the column path, and the pair ids are the adapter's own
    ("hh-" + content digest), hashed in batches."""
    table = scored_table(random.Random(4), 600)
    got = assert_same(table, "hh_rlhf_scores", HH, get_template("hh_rlhf"), decimals=None, min_vector_share=1.0)
    pair_ids = {r["pair_id"] for t in got.tables["contrastive"] + got.tables["equal"] for r in t.to_pylist()}
    expected = {"hh-" + content_digest(r["prompt"], r["chosen_response"], r["rejected_response"])
                for r in table.to_pylist()}
    assert pair_ids == expected and got.counts["items.equal"] > 0  # z-scores of equal rewards tie


@pytest.mark.parametrize("ids", ["integers", "strings with blanks", "floats", "mixed nulls"])
def test_hh_rlhf_scores_id_columns(ids):
    rng = random.Random(ids)
    table = scored_table(rng, 200)
    n = table.num_rows
    column = {"integers": pa.array(range(n), pa.int64()),
              "strings with blanks": pa.array([rng.choice(["", " ", f"s{i}", f"s{i}"]) for i in range(n)]),
              "floats": pa.array([float(i) if i % 3 else None for i in range(n)], pa.float64()),
              "mixed nulls": pa.array([f"m{i}" if i % 4 else None for i in range(n)])}[ids]
    got = assert_same(table.append_column("id", column), "hh_rlhf_scores", HH, get_template("hh_rlhf"),
                      decimals=None, min_vector_share=0.2)
    assert got.counts["rows_read"] == n


def test_hh_rlhf_scores_invalid_utf8_and_missing_scores_fall_back_per_row():
    table = scored_table(random.Random(8), 50)
    prompts = pa.array([b"\xff bad" if i == 3 else p.encode() for i, p in enumerate(table.column("prompt").to_pylist())],
                       pa.binary())
    table = table.set_column(0, "prompt", prompts).drop_columns(["chosen_score2", "rejected_score3"])
    got = assert_same(table, "hh_rlhf_scores", HH, get_template("hh_rlhf"), decimals=None)
    assert got.counts["quarantined.invalid_utf8"] == 1


@pytest.mark.parametrize("fmt", ["canonical", "hh_rlhf_scores"])
def test_held_out_rows_are_evaluation_rows_column_wise(fmt):
    rng = random.Random(3)
    if fmt == "canonical":
        table, objectives, template, decimals = canonical_table(rng, 400, UF, junk=0.05), UF, "paper", 1
    else:
        table, objectives, template, decimals = scored_table(rng, 400), HH, "hh_rlhf", None
    got = assert_same(table, fmt, objectives, get_template(template), decimals=decimals, split=HoldoutSplit(0.3, 9),
                      min_vector_share=0.5 if fmt == "canonical" else 1.0)
    assert got.counts["test_rows"] > 50


def test_released_fastchat_rows_match_too():
    from metaaligner.data.formats.canonical import validate_pair
    from metaaligner.data.reformulate.algorithm import reformulate_pair
    from metaaligner.synthetic import make_pair

    syn, template = load_objective_set("synthetic"), get_template("paper")
    rng = random.Random(2)
    items = [i for n in range(20) for i in reformulate_pair(validate_pair(make_pair(f"f{n}", rng), syn, None), syn,
                                                            template, 1)]
    turns = lambda i: [{"from": "human", "value": i["prompt"]}, {"from": "gpt", "value": i["target"]}]
    rows = [json.dumps({"id": n, "conversations": turns(i)}).encode() for n, i in enumerate(items)]
    rows += [b"{}", b"not json", json.dumps({"conversations": turns(items[0])[:1]}).encode()]
    expected = Reformulator("fastchat", syn, template, 1, 1, HoldoutSplit(0.0, 0), AllOwners())(rows, "f", "")
    got = VectorReformulator("fastchat", syn, template, 1, 1, HoldoutSplit(0.0, 0))(rows, "f")
    assert +got.counts == +expected.counts and got.counts["items.contrastive"] + got.counts["items.equal"] > 0
    for kind, columns in expected.items.items():
        assert sorted(json.dumps(r) for t in got.tables[kind] for r in t.to_pylist()) == \
            sorted(map(json.dumps, rows_of(columns)))


EQUIVALENCE_TESTS = {"canonical": test_junk_json_preferences, "hh_rlhf_scores": test_hh_rlhf_scores_id_columns,
                     "ultrafeedback": "test_formats_without_a_column_form_match_too",
                     "fastchat": test_released_fastchat_rows_match_too}


def test_every_format_has_an_equivalence_test():
    from metaaligner.data.formats.registry import FORMATS

    assert set(EQUIVALENCE_TESTS) == set(FORMATS)


@pytest.mark.parametrize("fmt", ["canonical", "hh_rlhf_scores"])
def test_resolve_keys_column_wise_are_the_per_row_keys(fmt):
    """The resolve step's (id, digest) keys of deferred rows: the column form gives rule.pair_digest's digests."""
    from metaaligner.data.reformulate.resolve import PairKeys

    rng = random.Random(fmt)
    if fmt == "canonical":
        table, objectives, decimals = canonical_table(rng, 300, UF, junk=0.3), UF, 1
    else:
        table, objectives, decimals = hh_table(rng, 300, True, False), HH, None
    field = "question" if fmt == "canonical" else "prompt"
    texts = table.column(field).to_pylist()
    texts[1] = "a control character \x01 json writes as \\u0001"
    table = table.set_column(table.column_names.index(field), field, pa.array(texts, table.schema.field(field).type))
    reformulator = VectorReformulator(fmt, objectives, get_template("paper"), 7, decimals, HoldoutSplit(0.0, 0))
    keys = PairKeys(reformulator)
    positions = np.arange(table.num_rows) * 3
    column_wise = keys(table, 5, positions)
    per_row = keys._per_row(python_rows(table), 5, positions)
    rows = lambda t: sorted(zip(*(t.column(c).to_pylist() for c in t.column_names)))
    assert rows(column_wise) == rows(per_row) and column_wise.num_rows > 100


def test_deferred_rows_are_left_out():
    table = canonical_table(random.Random(1), 50, UF, junk=0.0)
    full = vectorised(table, "canonical", UF, get_template("paper"))
    part = VectorReformulator("canonical", UF, get_template("paper"), 7, 1, HoldoutSplit(0.0, 0))(
        table, "src", defer=np.arange(0, 50, 2))
    assert part.counts["rows_read"] == 25 and full.counts["rows_read"] == 50
    kept = {r["pair_id"] for t in part.tables["contrastive"] + part.tables["equal"] for r in t.to_pylist()}
    assert kept == {f for f in table.column("id").to_pylist()[1::2]} & kept and kept


def test_formats_without_a_column_form_match_too():
    keys = ("instruction_following", "honesty", "truthfulness", "helpfulness")
    comp = lambda text, r: {"response": text, "annotations": {k: {"Rating": v} for k, v in zip(keys, r)}}
    rows = [json.dumps({"instruction": f"Q{i}", "completions": [comp("a", "5432"), comp("b", ["1", "N/A", "4", "4"])]})
            .encode() for i in range(20)] + [b"{bad"]
    template = get_template("ultrafeedback")
    expected = Reformulator("ultrafeedback", UF, template, 1, 1, HoldoutSplit(0.0, 0), AllOwners())(rows, "f", "")
    got = VectorReformulator("ultrafeedback", UF, template, 1, 1, HoldoutSplit(0.0, 0))(rows, "f")
    assert +got.counts == +expected.counts and got.vector_rows == 0


def test_whitespace_list_is_pythons():
    import sys

    from metaaligner.data.reformulate.column_checks import PY_SPACE

    assert PY_SPACE == "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())


# -- text types, dictionaries and the row size limit (issue 18) -----------------------------------------------------

def _through_parquet(table: pa.Table) -> pa.Table:
    """The table as a Parquet reader gives it back (string_view, large_string and dictionary types kept)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return pq.read_table(pa.BufferReader(sink.getvalue()))


def _with(table: pa.Table, name: str, array) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, array)


def test_string_view_and_large_string_columns_with_invalid_utf8_are_quarantined_per_row():
    table = canonical_table(random.Random(5), 60, UF, junk=0.0)
    valid = _through_parquet(_with(_with(table, "question", table.column("question").cast(pa.string_view())),
                                   "response_1", table.column("response_1").cast(pa.large_string())))
    assert valid.schema.field("question").type == pa.string_view()
    assert valid.schema.field("response_1").type == pa.large_string()
    reference = assert_same(valid, "canonical", UF)
    assert reference.vector_rows == vectorised(table, "canonical", UF, get_template("paper")).vector_rows > 0

    questions = [q.encode() for q in table.column("question").to_pylist()]
    answers = [a.encode() for a in table.column("response_1").to_pylist()]
    questions[3], answers[7] = b"not \xff UTF-8", b"cut \xc3"
    bad = _through_parquet(_with(_with(table, "question", pa.array(questions, pa.binary_view()).view(
        pa.string_view())), "response_1", pa.array(answers, pa.large_binary()).view(pa.large_string())))
    got = assert_same(bad, "canonical", UF)  # used to crash: no `take` kernel for string_view, UnicodeDecodeError
    assert got.counts["quarantined.invalid_utf8"] == 2 and got.counts["rows_read"] == 60
    broken = {table.column("id")[3].as_py(), table.column("id")[7].as_py()}
    items = lambda out: sorted(json.dumps(r) for k in ("contrastive", "equal") for t in out.tables[k]
                               for r in t.to_pylist() if r["pair_id"] not in broken)
    assert items(got) == items(reference)  # every other row as with valid text


def test_dictionary_columns_take_the_column_path():
    table = canonical_table(random.Random(6), 80, UF, junk=0.05)
    encoded = _through_parquet(_with(_with(table, "question", table.column("question").dictionary_encode()),
                                     "preferences", table.column("preferences").dictionary_encode()))
    assert pa.types.is_dictionary(encoded.schema.field("question").type)
    plain = vectorised(table, "canonical", UF, get_template("paper"))
    assert assert_same(encoded, "canonical", UF).vector_rows == plain.vector_rows > 0


def test_the_row_size_is_the_same_counted_on_columns_and_on_rows():
    bad = b"ok \xff"
    table = pa.table({
        "view": pa.array([b"hello", bad, None], pa.binary_view()).view(pa.string_view()),
        "large": pa.array([b"h\xc3\xa9", bad, b"x"], pa.large_binary()).view(pa.large_string()),
        "dict": pa.DictionaryArray.from_arrays(pa.array([0, 1, 0]), pa.array(["ab", "cde"])),
        "struct": pa.array([{"a": "x", "b": ["yy", None]}, None, {"a": None, "b": []}]),
        "map": pa.array([[("k", "vv")], None, []], pa.map_(pa.string(), pa.string())),
        "fixed": pa.array([b"abcd", None, b"efgh"], pa.binary(4)), "number": [1, 2, 3]})
    for t in (table, table.slice(1)):
        assert list(row_bytes(t)) == [contract.row_bytes(r) for r in python_rows(t)]


def test_rows_over_max_row_bytes_are_quarantined_on_every_path():
    table = canonical_table(random.Random(8), 40, UF, junk=0.0)
    answers = table.column("response_2").to_pylist()
    answers[5], answers[9] = "y" * 200_000, "z" * 100_000  # the two largest rows
    table = _with(table, "response_2", pa.array(answers))
    limit = int(row_bytes(table.slice(9, 1))[0])  # row 9 is exactly at the limit: kept
    got = assert_same(table, "canonical", UF, max_row_bytes=limit)
    assert got.counts["quarantined.row_too_large"] == 1 and got.counts["rows_read"] == 40
    (q,) = [q for t in got.tables["_quarantine"] for q in t.to_pylist() if q["reason"] == "row_too_large"]
    assert len(q["record"]) == 1024 and f"over max_row_bytes {limit}" in q["detail"]
    assert got.vector_rows == vectorised(table, "canonical", UF, get_template("paper")).vector_rows - 1

    lines = [json.dumps(r).encode() for r in python_rows(table)]  # JSON lines: the line's bytes count
    template = get_template("paper")
    limit = len(lines[9])
    expected = Reformulator("canonical", UF, template, 7, 1, HoldoutSplit(0.0, 0), AllOwners(), limit)(lines, "f", "")
    got = VectorReformulator("canonical", UF, template, 7, 1, HoldoutSplit(0.0, 0), limit)(lines, "f")
    assert +got.counts == +expected.counts and got.counts["quarantined.row_too_large"] == 1
def uf_lines(rng, n):
    keys = ("instruction_following", "honesty", "truthfulness", "helpfulness")
    comp = lambda text: {"response": text, "annotations": {k: {"Rating": rng.choice("12345")} for k in keys}}
    return [json.dumps({"instruction": f"Q{i % 7}", "completions": [comp(f"a{i}"), comp(f"b{i % 3}"), comp("c")]})
            .encode() for i in range(n)] + [b"{bad"]


@pytest.mark.parametrize("fmt", ["canonical", "hh_rlhf_scores", "ultrafeedback"])
def test_replayed_batches_are_the_per_row_path_with_the_decided_owners(fmt):
    """The resolve step's replay of one batch (column path, straight quarantine of losing rows, per-row fallback)
    gives what the per-row path gives with the same owners."""
    from metaaligner.data.reformulate.owners import PositionOwners
    from metaaligner.data.reformulate.resolve import replay_batch

    rng = random.Random(fmt)
    objectives, decimals, template = UF, 1, get_template("paper")
    if fmt == "canonical":
        raw = canonical_table(rng, 400, UF, junk=0.2)
    elif fmt == "hh_rlhf_scores":
        raw, objectives, decimals = hh_table(rng, 400, True, rng.random() < 0.5), HH, None
    else:
        raw = uf_lines(rng, 60)
    n = raw.num_rows if isinstance(raw, pa.Table) else len(raw)
    lost = sorted({(r, rng.randrange(3) if fmt == "ultrafeedback" else 0) for r in rng.sample(range(n), n // 3)})
    rows = python_rows(raw) if isinstance(raw, pa.Table) else raw
    expected = Reformulator(fmt, objectives, template, 7, decimals, HoldoutSplit(0.2, 1), PositionOwners(set(lost)))(
        rows, "src.parquet", "")
    at, candidates = (np.array(c, dtype=np.int64) for c in zip(*lost))
    reformulator = VectorReformulator(fmt, objectives, template, 7, decimals, HoldoutSplit(0.2, 1))
    got = replay_batch(reformulator, raw, "src.parquet", at, candidates)
    assert_outputs(got, expected)
    assert expected.counts["quarantined.duplicate_id"] > 10


def _extra_columns(rng, n) -> dict:
    """Columns a canonical file may carry beside the pair: numbers json writes with and without an exponent,
    booleans, nulls, control characters (json's \\u00XX) and a list (no column form)."""
    floats = [rng.choice([0.0, -0.0, 1.0, 0.1, 1e-5, 2.5e-4, 1e16, 123456.789, float("nan"), None, -3.0])
              for _ in range(n)]
    return {"score": pa.array(floats, pa.float64()), "half": pa.array(floats, pa.float32()),
            "count": pa.array([rng.choice([0, -7, 2**63 - 1, None]) for _ in range(n)], pa.int64()),
            "flag": pa.array([rng.choice([True, False, None]) for _ in range(n)]),
            "note": pa.array([rng.choice(["ok", "ctl\x01", "tab\t\"q\"", None, "ü"]) for _ in range(n)])}


@pytest.mark.parametrize("variant", ["canonical extra columns", "canonical list column", "hh as score writes it",
                                     "hh integer and one-sided scores", "hh oversize rows"])
def test_losing_rows_are_quarantined_column_wise_as_the_per_row_path_does(variant):
    """Every row of a batch loses its id: `VectorReformulator.lose` writes the `duplicate_id` records column-wise
    (json_text), the per-row path with the same owners writes them with json.dumps: the same records, counters
    and row-size rule (an oversize row is `row_too_large`, as the per-row path decides it, not `duplicate_id`)."""
    from metaaligner.data.reformulate.owners import PositionOwners
    from metaaligner.data.reformulate.resolve import replay_batch

    rng = random.Random(variant)
    fmt, objectives, decimals, template, limit = "canonical", UF, 1, get_template("paper"), 1 << 20
    if variant.startswith("canonical"):
        table = canonical_table(rng, 200, UF, junk=0.1)
        for name, column in _extra_columns(rng, table.num_rows).items():
            table = table.append_column(name, column)
        if variant == "canonical list column":
            table = table.append_column("tags", pa.array([[f"t{i}"] for i in range(table.num_rows)]))
    else:
        fmt, objectives, decimals, template = "hh_rlhf_scores", HH, None, get_template("hh_rlhf")
        table = scored_table(rng, 200)
        if variant == "hh integer and one-sided scores":
            table = _with(table, "chosen_score2", pa.array([rng.randint(-3, 3) for _ in range(200)], pa.int64()))
            table = _with(table, "rejected_score2", pa.array([rng.randint(-3, 3) for _ in range(200)], pa.int64()))
            table = table.drop_columns(["rejected_score3"])
        if variant == "hh oversize rows":
            answers = table.column("chosen_response").to_pylist()
            answers[3] = answers[8] = "y" * 40_000
            table = _with(table, "chosen_response", pa.array(answers))
            limit = 30_000
    n = table.num_rows
    lost = {(row, 0) for row in range(n)}
    expected = Reformulator(fmt, objectives, template, 7, decimals, HoldoutSplit(0.0, 0), PositionOwners(lost),
                            limit)(python_rows(table), "src.parquet", "")
    reformulator = VectorReformulator(fmt, objectives, template, 7, decimals, HoldoutSplit(0.0, 0), limit)
    per_row = reformulator.per_row.lose_rows
    by_python = []
    reformulator.per_row.lose_rows = lambda rows, source: by_python.append(len(rows)) or per_row(rows, source)
    got = replay_batch(reformulator, table, "src.parquet", np.arange(n), np.zeros(n, np.int32))
    assert_outputs(got, expected)
    assert expected.counts["quarantined.duplicate_id"] > n // 2
    if variant == "canonical list column":
        assert sum(by_python) > n // 2  # no column form: every checked row's record is written by Python
    else:
        assert sum(by_python) < expected.counts["quarantined.duplicate_id"] // 2
    if variant == "hh oversize rows":
        assert expected.counts["quarantined.row_too_large"] == 2
