"""Outputs next to the results: results.json, results.md (Markdown tables) and PNG plots (matplotlib Agg)."""

from __future__ import annotations

import io

from metaaligner.evaluation.stats import RATES
from metaaligner.evaluation.too_long import too_long_note

FIGSIZE, DPI = (8.0, 4.5), 100  # every plot is 800 x 450 pixels


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _ci(ci) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _rate_table(report: dict, name: str) -> list[str]:
    """One rate per objective and candidate (%, bootstrap 95 % CI), its average and the treatment's "+"."""
    cands, objectives = report["candidates"], report["objectives"]
    improvement = report.get("improvement")
    header = ["Objective", *cands]
    if improvement:
        header.append(f"+ {improvement['treatment']} − {improvement['baseline']} (pts, paired)")
    lines = [f"## {RATES[name].label}, %", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for obj in objectives:
        row = report["per_objective"][obj]
        cells = [obj] + [_pct(row[c][name]) + _ci(row[c][f"{name}_ci"]) for c in cands]
        if improvement:
            imp = improvement["per_objective"].get(obj)
            cells.append("–" if imp is None else f"{100 * imp[name]:+.1f}" + _ci(imp[f"{name}_ci"])
                         + too_long_note(report, obj))
        lines.append("| " + " | ".join(cells) + " |")
    avg = ["**Average**"] + [_pct(report["average"][c][name]) for c in cands]
    if improvement:
        a = improvement["average"][name]
        avg.append("–" if a is None else f"{100 * a:+.1f}" + too_long_note(report, None))
    return lines + ["| " + " | ".join(avg) + " |", ""]


def markdown(report: dict) -> str:
    """The three rates per objective (with CIs and the treatment-over-baseline "+"), then the counts."""
    cands, objectives = report["candidates"], report["objectives"]
    improvement = report.get("improvement")
    judge, items, invalid = report["judge"], report["items"], report["invalid"]
    missing = ", ".join(f"{c}: {n}" for c, n in report["missing"].items() if n) or "none"
    lines = [
        "# Evaluation results", "",
        f"Judge: `{judge['kind']}` ({', '.join(f'{k}={v}' for k, v in judge.items() if k != 'kind')}); "
        f"items: {items['evaluated']} evaluated, {items['quarantined']} quarantined; missing answers: {missing}; "
        f"invalid verdicts: {invalid['count']} ({100 * invalid['fraction']:.1f} % of the comparisons: "
        f"{invalid['unparseable']} unparseable, {invalid['rejected']} rejected by the judge).", "",
        "Every rate divides by *judged*, the comparisons asked: an invalid verdict counts as judged (a non-win and "
        "a non-loss). An item without a candidate's answer is left out of that candidate's rates (*missing*); the "
        "\"+\" columns compare the two candidates on the items judged for both (*paired n* below).", "",
    ]
    if report.get("too_long") and any(too_long_note(report, o) for o in [*objectives, None]):
        lines += [f"A \"+\" marked *too_long X %*: X % of its paired items had a prompt over the corrector's limit "
                  f"(`{report['too_long']['column']}`); with `on_too_long: original` their correction is the "
                  f"original answer, which pulls the \"+\" toward 0.", ""]
    for name in RATES:
        lines += _rate_table(report, name)
    header = ["Objective"] + [f"{c} W/T/L/invalid/missing" for c in cands] + (["paired n"] if improvement else [])
    lines += ["## Counts", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for obj in objectives:
        row = report["per_objective"][obj]
        cells = [obj] + [f"{row[c]['wins']}/{row[c]['ties']}/{row[c]['losses']}/{row[c]['invalid']}/"
                         f"{row[c]['missing']}" for c in cands]
        if improvement:
            imp = improvement["per_objective"].get(obj)
            cells.append(str(imp["paired_items"]) if imp else "0")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    cr = report.get("copy_rate")
    if cr and cr["n"]:
        lines += [f"Copy rate: {_pct(cr['rate'])} % of `{cr['candidate']}` answers are within normalised edit "
                  f"distance {cr['threshold']} of `{cr['reference']}` ({cr['copies']}/{cr['n']}; mean distance "
                  f"{cr['mean_distance']:.3f}).", ""]
    zs = report.get("zero_shot")
    if zs:
        name = report["plot_rate"]
        lines += [f"Zero-shot: {RATES[name].short} (%) per objective as objectives are added one by one:", "",
                  "| Objective | " + " | ".join(zs["labels"]) + " |", "|" + "---|" * (len(zs["labels"]) + 1)]
        lines += [f"| {o} | " + " | ".join(_pct(v) for v in vals) + " |" for o, vals in zs[name].items()]
        lines.append("")
    return "\n".join(lines)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def _ylim(ax, name: str) -> None:
    ax.set_ylim(-105 if name == "net_win_rate" else 0, 105)


def bars_png(report: dict, candidates: list[str]) -> bytes:
    """Grouped bars: `plot_rate` per objective for each candidate (e.g. before/after correction), 95 % CI whiskers."""
    import numpy as np

    name = report["plot_rate"]
    plt, fig, ax = _figure()
    objectives = report["objectives"]
    x = np.arange(len(objectives))
    width = 0.8 / len(candidates)
    for i, cand in enumerate(candidates):
        rows = [report["per_objective"][o][cand] for o in objectives]
        rates = np.array([100 * (r[name] or 0.0) for r in rows])
        err = np.array([[max(0.0, rate - 100 * r[f"{name}_ci"][0]), max(0.0, 100 * r[f"{name}_ci"][1] - rate)]
                        if r[f"{name}_ci"] else [0.0, 0.0] for r, rate in zip(rows, rates)]).reshape(-1, 2).T
        ax.bar(x + (i - (len(candidates) - 1) / 2) * width, rates, width, yerr=err, capsize=3, label=cand)
    ax.set_xticks(x, objectives, rotation=20, ha="right")
    _ylim(ax, name)
    ax.set_ylabel(f"{RATES[name].short} vs golden (%)")
    ax.set_title(RATES[name].label)
    ax.legend()
    return _png(plt, fig)


def zero_shot_png(report: dict) -> bytes:
    """`plot_rate` per objective (one line each) as objectives are added one at a time (the paper's Figure 3)."""
    name = report["plot_rate"]
    plt, fig, ax = _figure()
    zs = report["zero_shot"]
    stages = range(len(zs["labels"]))
    for obj, values in zs[name].items():
        ax.plot(stages, [None if v is None else 100 * v for v in values], marker="o", label=obj)
    ax.set_xticks(list(stages), zs["labels"], rotation=20, ha="right")
    _ylim(ax, name)
    ax.set_ylabel(f"{RATES[name].short} vs golden (%)")
    ax.set_title(f"Zero-shot: {RATES[name].short} as objectives are added one by one")
    ax.legend(fontsize="small", ncol=2)
    return _png(plt, fig)


def write_reports(report: dict, cfg, put) -> list[str]:
    """results.json, results.md, win_rates.png and (with zero_shot) zero_shot.png through `put(name, data)`;
    returns the names written."""
    import json

    files = {"results.json": json.dumps(report, indent=2, sort_keys=True, default=str) + "\n",
             "results.md": markdown(report)}
    bars = [cfg.baseline, cfg.treatment] if cfg.baseline and cfg.treatment else cfg.candidates
    files["win_rates.png"] = bars_png(report, bars)
    if report.get("zero_shot"):
        files["zero_shot.png"] = zero_shot_png(report)
    for name, data in files.items():
        put(name, data)
    return list(files)
