"""Validation of canonical pairs as column masks, and their preference labels as a symbol matrix.

Every check here is conservative: a row passes only when the per-row validation (`formats.canonical.validate_pair` after
the format's adapter) surely accepts it with the same labels. Anything else -- a wrong type, a blank or
non-UTF-8 text, an unknown objective, an odd symbol, a score that needs Python's own rounding, JSON of an
unusual shape -- fails the mask and goes to the per-row path, which decides and gives the reason.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from metaaligner.data.ids.columns import content_ids
from metaaligner.data.io.columns import as_text, combined
from metaaligner.data.reformulate.column_algorithm import NONE, SYMBOL_CODES, PairColumns
from metaaligner.objectives import ObjectiveSet

# every character str.isspace() accepts (what str.strip() removes); a test checks the list against Python
PY_SPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
            "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
# a character that str.strip() keeps: the text is not blank
_NOT_SPACE = "[^" + "".join(f"\\x{{{ord(c):x}}}" for c in PY_SPACE) + "]"
_JSON_WS = "[ \\t\\n\\r]*"  # the only whitespace json.loads skips
_NUMBER = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"  # a JSON number
_PLAIN_NUMBER = re.compile(r"^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")  # float(text) = Arrow's cast
_MAX_SCALED = 2.0 ** 40  # |score| * 10**decimals below this: numpy's rounding is exact enough to decide


def nonblank(array: pa.Array) -> np.ndarray:
    """Not null and not empty after str.strip() (Python's definition of whitespace)."""
    return _mask(pc.match_substring_regex(array, _NOT_SPACE))


def _mask(array) -> np.ndarray:
    """A boolean array with nulls as False, as numpy."""
    return pc.fill_null(array, False).to_numpy(zero_copy_only=False).astype(bool)


def _key_forms(name: str) -> set[str]:
    """The name as a JSON key, written raw or with \\u escapes (json.dumps' default for non-ASCII)."""
    return {json.dumps(name, ensure_ascii=False), json.dumps(name)}


def _key(name: str) -> str:
    return "(?:" + "|".join(re.escape(f) for f in sorted(_key_forms(name))) + ")"


def _safe_names(objectives: ObjectiveSet) -> bool:
    """Names that appear verbatim in JSON and cannot be mistaken for JSON structure."""
    return all(n and not re.search(r'["\\\x00-\x1f:,{}]', n) for n in objectives.names)


class SymbolReader:
    """Preferences (or scores) of canonical rows -> (symbols (rows, K) uint8, ok mask)."""

    def __init__(self, objectives: ObjectiveSet, decimals: int | None):
        self.names, self.decimals = objectives.names, decimals
        self.json_ok = _safe_names(objectives)
        keys = "(?:" + "|".join(_key(n) for n in self.names) + ")"
        forms = [(f, k) for k, n in enumerate(self.names) for f in sorted(_key_forms(n))]
        self.key_forms = pa.array([f for f, _ in forms], pa.string())
        self.key_objective = np.array([k for _, k in forms] + [-1])  # index -1 (not found) stays -1
        symbol_value = '(?:"[<>=]"|null)'
        member = f"{keys}{_JSON_WS}:{_JSON_WS}{symbol_value}{_JSON_WS}"
        self.preferences_shape = f"^{_JSON_WS}\\{{{_JSON_WS}(?:{member}(?:,{_JSON_WS}{member})*)?\\}}{_JSON_WS}$"
        score_value = f"(?:{_NUMBER}|null)"
        member = f"{keys}{_JSON_WS}:{_JSON_WS}{score_value}{_JSON_WS}"
        self.scores_shape = f"^{_JSON_WS}\\{{{_JSON_WS}(?:{member}(?:,{_JSON_WS}{member})*)?\\}}{_JSON_WS}$"

    # -- preferences ----------------------------------------------------------------------------------------------
    def preferences(self, column) -> tuple[np.ndarray, np.ndarray]:
        array = combined(column)
        n = len(array)
        symbols = np.zeros((n, len(self.names)), dtype=np.uint8)
        if pa.types.is_struct(array.type):
            ok = self._struct_fields_known(array)
            for k, name in enumerate(self.names):
                if array.type.get_field_index(name) < 0:
                    continue
                value = pc.struct_field(array, name)
                if not pa.types.is_string(value.type) and not pa.types.is_large_string(value.type):
                    ok &= ~_mask(pc.is_valid(value))
                    continue
                ok &= self._fill_symbols(symbols, k, value)
        elif (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)) and self.json_ok:
            ok = _mask(pc.match_substring_regex(array, self.preferences_shape))
            rows, k, value, ok = self._members(array, ok)
            index = pc.index_in(value, value_set=pa.array(['">"', '"<"', '"="'], value.type))
            symbols[rows, k] = pc.fill_null(pc.add(index, 1), 0).to_numpy(zero_copy_only=False).astype(np.uint8)
        else:
            ok = np.zeros(n, dtype=bool)
        return symbols, ok & (symbols != NONE).any(axis=1)

    def _struct_fields_known(self, array: pa.StructArray) -> np.ndarray:
        ok = np.ones(len(array), dtype=bool)
        for field in array.type:
            if field.name not in self.names:
                ok &= ~_mask(pc.is_valid(pc.struct_field(array, field.name)))  # an unknown objective with a value
        return ok

    @staticmethod
    def _fill_symbols(symbols: np.ndarray, k: int, value: pa.Array) -> np.ndarray:
        """Codes of ">", "<", "=" into column k; False where the value is another non-null string."""
        index = pc.index_in(value, value_set=pa.array(list(SYMBOL_CODES), value.type))
        codes = pc.fill_null(pc.add(index, 1), 0).to_numpy(zero_copy_only=False).astype(np.uint8)
        symbols[:, k] = codes
        return ~(_mask(pc.is_valid(value)) & (codes == NONE))

    def _members(self, array: pa.Array, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray, pa.Array, np.ndarray]:
        """Members of flat JSON objects whose shape is checked (`ok`): (row, objective index, value text) per
        member, and `ok` without the rows that give a key twice (json.loads keeps the last; left to it)."""
        text = pc.if_else(pa.array(ok), array, pa.scalar("{}", array.type))  # other rows: parsed by Python
        members = pc.split_pattern(pc.utf8_trim(text, characters=" \t\n\r{}"), ",")
        rows = pc.list_parent_indices(members).to_numpy(zero_copy_only=False)
        pairs = pc.split_pattern(pc.binary_join_element_wise(pc.list_flatten(members), ":", ""), ":", max_splits=1)
        key = pc.utf8_trim(pc.list_element(pairs, 0), characters=" \t\n\r")
        value = pc.utf8_trim(pc.list_element(pairs, 1), characters=" \t\n\r:")
        k = pc.fill_null(pc.index_in(key, value_set=self.key_forms), -1).to_numpy(zero_copy_only=False)
        k = self.key_objective[k]  # both spellings of a name -> its objective; "" of an empty object -> -1
        given = k >= 0
        rows, k, value = rows[given], k[given], value.filter(pa.array(given))
        seen = np.zeros((len(ok), len(self.names)), dtype=np.int64)
        np.add.at(seen, (rows, k), 1)
        return rows, k, value, ok & (seen <= 1).all(axis=1)

    # -- scores -----------------------------------------------------------------------------------------------
    def scores(self, column_1, column_2) -> tuple[np.ndarray, np.ndarray]:
        """Scores of both responses -> symbols, per objective present (non-null) in both."""
        values_1, ok_1 = self._score_values(combined(column_1))
        values_2, ok_2 = self._score_values(combined(column_2))
        return self.compare(values_1, values_2, ok_1 & ok_2)

    def compare(self, values_1: np.ndarray, values_2: np.ndarray, ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, K) float arrays with NaN for absent -> symbols; ties as preferences_from_scores decides them."""
        present = ~np.isnan(values_1) & ~np.isnan(values_2)
        a, b = np.where(present, values_1, 0.0), np.where(present, values_2, 0.0)
        if self.decimals is not None:
            a, ok_a = _rounded(a, self.decimals)
            b, ok_b = _rounded(b, self.decimals)
            ok = ok & (ok_a | ~present).all(axis=1) & (ok_b | ~present).all(axis=1)
        symbols = np.where(a > b, SYMBOL_CODES[">"], np.where(a < b, SYMBOL_CODES["<"], SYMBOL_CODES["="]))
        symbols = np.where(present, symbols, NONE).astype(np.uint8)
        return symbols, ok & present.any(axis=1)

    def _score_values(self, array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(rows, K) float64 with NaN where absent, ok mask (False: unknown name, a value to leave to Python)."""
        n = len(array)
        values = np.full((n, len(self.names)), np.nan)
        if pa.types.is_struct(array.type):
            ok = self._struct_fields_known(array)
            for k, name in enumerate(self.names):
                if array.type.get_field_index(name) >= 0:
                    column, column_ok = numbers(pc.struct_field(array, name))
                    values[:, k], ok = column, ok & column_ok
        elif (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)) and self.json_ok:
            ok = _mask(pc.match_substring_regex(array, self.scores_shape))
            rows, k, value, ok = self._members(array, ok)
            column, column_ok = numbers(pc.if_else(pc.equal(value, "null"), pa.scalar(None, value.type), value))
            values[rows, k] = column
            bad = np.zeros(n, dtype=bool)
            bad[rows[~column_ok]] = True
            ok &= ~bad
        else:
            ok = np.zeros(n, dtype=bool)
        return values, ok & _mask(pc.is_valid(array))


def numbers(array: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A score column -> float64 (NaN where null) and ok (False where `pairs.number` may decide otherwise)."""
    n = len(array)
    valid = _mask(pc.is_valid(array))
    if pa.types.is_integer(array.type) or pa.types.is_floating(array.type):
        values = pc.cast(array, pa.float64(), safe=False).to_numpy(zero_copy_only=False).astype(np.float64)
    elif pa.types.is_string(array.type) or pa.types.is_large_string(array.type) or pa.types.is_binary(array.type):
        text = as_text(array)
        if text is None:
            return np.full(n, np.nan), ~valid
        plain = _mask(pc.match_substring_regex(text, _PLAIN_NUMBER.pattern))
        parsed = pc.cast(pc.if_else(pa.array(plain), text, pa.scalar("0", text.type)), pa.float64())
        values = parsed.to_numpy(zero_copy_only=False).astype(np.float64)
        values = np.where(plain, values, np.nan)
        return values, ~valid | (plain & np.isfinite(np.where(plain, values, 0.0)))
    else:
        return np.full(n, np.nan), ~valid
    values = np.where(valid, values, np.nan)
    return values, ~valid | np.isfinite(np.where(valid, values, 0.0))


def _rounded(values: np.ndarray, decimals: int) -> tuple[np.ndarray, np.ndarray]:
    """Integers round(x, decimals) * 10**decimals and whether numpy surely agrees with Python's round (exact
    decimal, half to even): the scaled value is not within its rounding error of a half."""
    scaled = values * (10.0 ** decimals)
    with np.errstate(invalid="ignore", over="ignore"):  # inf and nan are never ok
        fraction = np.abs(scaled - np.floor(scaled) - 0.5)
        ok = (np.abs(scaled) < _MAX_SCALED) & (fraction > 1e-9 * (1.0 + np.abs(scaled)))
    return np.rint(scaled), ok


class CanonicalColumns:
    """Maps a batch of one input format to PairColumns + ok mask, or says the format has no column form."""

    def __init__(self, fmt: str, objectives: ObjectiveSet, decimals: int | None):
        self.format = fmt
        self.objectives = objectives
        self.symbols = SymbolReader(objectives, decimals)

    @property
    def supported(self) -> bool:
        return self.format in ("canonical", "hh_rlhf_scores")

    def __call__(self, table: pa.Table) -> tuple[PairColumns, np.ndarray] | None:
        if self.format == "canonical":
            return self._canonical(table)
        if self.format == "hh_rlhf_scores":
            return self._hh_rlhf_scores(table)
        return None

    def _texts(self, table: pa.Table, names: tuple[str, ...]) -> tuple[list[pa.Array], np.ndarray] | None:
        columns, ok = [], np.ones(table.num_rows, dtype=bool)
        for name in names:
            if name not in table.column_names:
                return None
            text = as_text(table.column(name))
            if text is None:
                return None
            columns.append(text)
            ok &= nonblank(text)
        return columns, ok

    def _canonical(self, table: pa.Table) -> tuple[PairColumns, np.ndarray] | None:
        texts = self._texts(table, ("id", "question", "response_1", "response_2"))
        if texts is None:
            return None
        (ids, question, r1, r2), ok = texts
        n = table.num_rows
        has_prefs = np.zeros(n, dtype=bool)
        symbols = np.zeros((n, len(self.objectives.names)), dtype=np.uint8)
        if "preferences" in table.column_names:
            prefs = combined(table.column("preferences"))
            has_prefs = _mask(pc.is_valid(prefs))
            pref_symbols, pref_ok = self.symbols.preferences(prefs)
            symbols = np.where(has_prefs[:, None], pref_symbols, symbols)
            ok &= ~has_prefs | pref_ok
        if "scores_1" in table.column_names and "scores_2" in table.column_names:
            score_symbols, score_ok = self.symbols.scores(table.column("scores_1"), table.column("scores_2"))
            symbols = np.where(has_prefs[:, None], symbols, score_symbols)
            ok &= has_prefs | score_ok
        else:
            ok &= has_prefs
        return PairColumns(ids, question, r1, r2, symbols), ok

    def _hh_rlhf_scores(self, table: pa.Table) -> tuple[PairColumns, np.ndarray] | None:
        texts = self._texts(table, ("prompt", "chosen_response", "rejected_response"))
        if texts is None:
            return None
        (question, r1, r2), ok = texts
        n, names = table.num_rows, self.objectives.names
        values_1, values_2 = np.full((n, len(names)), np.nan), np.full((n, len(names)), np.nan)
        for k in range(len(names)):
            for values, column in ((values_1, f"chosen_score{k + 1}"), (values_2, f"rejected_score{k + 1}")):
                if column in table.column_names:
                    values[:, k], column_ok = numbers(combined(table.column(column)))
                    ok &= column_ok
        symbols, scores_ok = self.symbols.compare(values_1, values_2, ok)
        ids, ids_ok = self._hh_ids(table, question, r1, r2)
        return PairColumns(ids, question, r1, r2, symbols), scores_ok & ids_ok

    @staticmethod
    def _hh_ids(table: pa.Table, question, r1, r2) -> tuple[pa.Array, np.ndarray]:
        return hh_rlhf_ids(table, question, r1, r2)


def hh_rlhf_ids(table: pa.Table, question: pa.Array, r1: pa.Array, r2: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """The `hh_rlhf_scores` adapter's ids, column-wise: the id column as text (strings, integers), else "hh-" + the
    content digest of (prompt, chosen, rejected), hashed in batches (data.ids.columns). `ok` is False where the
    adapter must decide (floats, bools, nested values, invalid UTF-8, blank ids)."""
    n = table.num_rows
    given = combined(table.column("id")) if "id" in table.column_names else pa.nulls(n, pa.string())
    ok = np.ones(n, dtype=bool)
    if pa.types.is_integer(given.type):
        given = pc.cast(given, pa.string())
    elif not pa.types.is_null(given.type):
        text = as_text(given)
        if text is None:  # floats, bools, nested values, invalid UTF-8: the adapter decides those rows
            ok = ~_mask(pc.is_valid(given))
            text = pa.nulls(n, pa.string())
        given = text
    given = given.cast(pa.string())
    missing = ~_mask(pc.is_valid(given))
    if missing.all():
        given = content_ids([question, r1, r2], "hh-")
    elif missing.any():
        index = pa.array(np.nonzero(missing)[0], pa.int64())
        digests = content_ids([question.take(index), r1.take(index), r2.take(index)], "hh-")
        given = pc.replace_with_mask(given, pa.array(missing), digests)
    return given, ok & nonblank(given)
