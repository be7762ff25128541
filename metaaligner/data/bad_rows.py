"""The bad-row limit of a job (`max_bad_fraction`, modelled on Spark's and BigQuery's bad-record limits): above
it the job stops without committing and says why, with the top reasons, one example each and a hint."""

from __future__ import annotations

from collections import Counter

TOP_REASONS = 5


class TooManyBadRows(RuntimeError):
    """More than `max_bad_fraction` of the input rows were quarantined or in error."""


def check_bad_fraction(job: str, reasons: Counter, examples: dict[str, str], total: int, limit: float,
                       hint: str) -> None:
    """Raise TooManyBadRows when sum(reasons) / total > limit (`examples`: reason -> one example's text)."""
    bad = sum(reasons.values())
    if not total or bad / total <= limit:
        return
    top = "; ".join(f"{reason}: {n} rows (e.g. {examples.get(reason, '?')})"
                    for reason, n in reasons.most_common(TOP_REASONS))
    raise TooManyBadRows(f"{job}: {bad} of {total} input rows ({100 * bad / total:.1f} %) are bad, over "
                         f"max_bad_fraction={limit}; nothing was committed. Top reasons: {top}. Hint: {hint}")
