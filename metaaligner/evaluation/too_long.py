"""The too_long share of Table 2's "+": items whose prompt was over the corrector's limit.

With `correct`'s `on_too_long: original` such an item's correction is the untouched policy answer, so it adds
nothing to the "+" and pulls it toward 0 (a 2,048-token TinyLlama with 1,024 new tokens keeps every prompt over
1,024 tokens as it was). `evaluate` reads the `too_long` column of the `correct` output and shows, next to every
"+" (results.md and the printed summary), the share of its paired items that were too long, when above 1 %.
"""

from __future__ import annotations

SHOWN_ABOVE = 0.01  # a "+" gets its too_long share next to it above this share
_TRUE = {"true", "1"}


def flag(value) -> bool | None:
    """A too_long cell: a bool (Parquet), or its text (CSV, JSON rows read as text)."""
    if value is None or isinstance(value, bool):
        return value
    return str(value).strip().lower() in _TRUE


def too_long_shares(column: str, baseline: str, treatment: str, outcomes: dict, objectives: list[str],
                    valid: list[dict]) -> dict:
    """Per objective (and over all), the share of the "+"'s paired items whose prompt was over the corrector's limit:
    with on_too_long: original their correction is the original answer, which pulls the "+" toward 0."""
    flagged = {m["id"] for m in valid if m["too_long"]}

    def share(items: set) -> dict:
        n = len(flagged & items)
        return {"items": len(items), "too_long": n, "share": n / len(items) if items else 0.0}

    paired = {}
    for obj in objectives:
        base, treat = (outcomes.get(obj, {}).get(c, {}) for c in (baseline, treatment))
        paired[obj] = {i for i in base if i in treat}
    return {"column": column, "shown_above": SHOWN_ABOVE,
            "per_objective": {obj: share(ids) for obj, ids in paired.items()},
            "average": share(set().union(*paired.values()) if paired else set())}


def too_long_note(report: dict, objective: str | None) -> str:
    """' (too_long 12.3 %)' for a "+" (an objective's, or the average's when None) above the shown share."""
    shares = report.get("too_long")
    if not shares:
        return ""
    entry = shares["average"] if objective is None else shares["per_objective"].get(objective)
    return f" (too_long {100 * entry['share']:.1f} %)" if entry and entry["share"] > shares["shown_above"] else ""


def improvement_lines(report: dict) -> list[str]:
    """Table 2's "+" (win_rate) per objective and on average, each with its too_long share above 1 %."""
    improvement = report.get("improvement")
    if not improvement:
        return []
    cells = [f"{obj} {100 * v['win_rate']:+.1f}{too_long_note(report, obj)}"
             for obj, v in improvement["per_objective"].items()]
    average = improvement["average"]["win_rate"]
    if average is not None:
        cells.append(f"average {100 * average:+.1f}{too_long_note(report, None)}")
    lines = [f"evaluate: \"+\" (win_rate, {improvement['treatment']} - {improvement['baseline']}, points): "
             + "; ".join(cells)]
    if "(too_long" in lines[0]:
        lines.append(f"evaluate: too_long marks items whose prompt was over the corrector's limit; with on_too_long: "
                     f"original their {improvement['treatment']} is the {improvement['baseline']} answer, which pulls "
                     f"the \"+\" toward 0 (on_too_long: truncate corrects them with the answer's tail cut)")
    return lines
