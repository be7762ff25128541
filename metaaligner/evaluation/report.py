"""Outputs next to the results: results.json, results.md (Markdown tables) and PNG plots (matplotlib Agg)."""

from __future__ import annotations

import io

from metaaligner import storage as st
from metaaligner.config import StorageConfig

FIGSIZE, DPI = (8.0, 4.5), 100  # every plot is 800 x 450 pixels


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _ci(ci) -> str:
    return "" if not ci else f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def markdown(report: dict) -> str:
    """Per-objective win rates (%, (wins+ties)/total with bootstrap 95 % CI), W/T/L/invalid, and the improvement."""
    cands, objectives = report["candidates"], report["objectives"]
    improvement = report.get("improvement")
    judge = report["judge"]
    items = report["items"]
    lines = [
        "# Evaluation results", "",
        f"Judge: `{judge['kind']}` ({', '.join(f'{k}={v}' for k, v in judge.items() if k != 'kind')}); "
        f"items: {items['evaluated']} evaluated, {items['quarantined']} quarantined; "
        f"invalid verdicts: {report['invalid']['count']}.", "",
        "Win rate = (wins + ties) / valid judgments, in %, with bootstrap 95 % CI; "
        "net = (wins − losses) / valid.", "",
    ]
    header = ["Objective"] + [f"{c} win rate" for c in cands] + [f"{c} W/T/L/inv" for c in cands]
    if improvement:
        header.append(f"Δ {improvement['treatment']} − {improvement['baseline']} (pts)")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for obj in objectives:
        row = report["per_objective"][obj]
        cells = [obj] + [_pct(row[c]["win_rate"]) + _ci(row[c]["win_rate_ci"]) for c in cands]
        cells += [f"{row[c]['wins']}/{row[c]['ties']}/{row[c]['losses']}/{row[c]['invalid']}" for c in cands]
        if improvement:
            imp = improvement["per_objective"].get(obj)
            cells.append("–" if imp is None else f"{100 * imp['win_rate']:+.1f}" + _ci(imp["win_rate_ci"]))
        lines.append("| " + " | ".join(cells) + " |")
    avg = ["**Average**"] + [_pct(report["average"][c]["win_rate"]) for c in cands] + [""] * len(cands)
    if improvement:
        a = improvement["average"]["win_rate"]
        avg.append("–" if a is None else f"{100 * a:+.1f}")
    lines += ["| " + " | ".join(avg) + " |", ""]
    lines += ["Net win rate (Aligner's definition), %:", "",
              "| Objective | " + " | ".join(cands) + " |", "|" + "---|" * (len(cands) + 1)]
    for obj in objectives:
        row = report["per_objective"][obj]
        lines.append(f"| {obj} | " + " | ".join(_pct(row[c]["net_win_rate"]) + _ci(row[c]["net_win_rate_ci"])
                                                 for c in cands) + " |")
    lines.append("")
    cr = report.get("copy_rate")
    if cr and cr["n"]:
        lines += [f"Copy rate: {_pct(cr['rate'])} % of `{cr['candidate']}` answers are within normalised edit "
                  f"distance {cr['threshold']} of `{cr['reference']}` ({cr['copies']}/{cr['n']}; mean distance "
                  f"{cr['mean_distance']:.3f}).", ""]
    zs = report.get("zero_shot")
    if zs:
        lines += ["Zero-shot: win rate (%) per objective as objectives are added one by one:", "",
                  "| Objective | " + " | ".join(zs["labels"]) + " |", "|" + "---|" * (len(zs["labels"]) + 1)]
        lines += [f"| {o} | " + " | ".join(_pct(v) for v in vals) + " |" for o, vals in zs["win_rate"].items()]
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


def bars_png(report: dict, candidates: list[str]) -> bytes:
    """Grouped bars: win rate per objective for each candidate (e.g. before/after correction), 95 % CI whiskers."""
    import numpy as np

    plt, fig, ax = _figure()
    objectives = report["objectives"]
    x = np.arange(len(objectives))
    width = 0.8 / len(candidates)
    for i, cand in enumerate(candidates):
        rows = [report["per_objective"][o][cand] for o in objectives]
        rates = np.array([100 * (r["win_rate"] or 0.0) for r in rows])
        err = np.array([[rate - 100 * r["win_rate_ci"][0], 100 * r["win_rate_ci"][1] - rate]
                        if r["win_rate_ci"] else [0.0, 0.0] for r, rate in zip(rows, rates)]).T
        ax.bar(x + (i - (len(candidates) - 1) / 2) * width, rates, width, yerr=err, capsize=3, label=cand)
    ax.set_xticks(x, objectives, rotation=20, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("win rate vs golden (%)")
    ax.set_title("Win rate per objective (wins + ties) / total")
    ax.legend()
    return _png(plt, fig)


def zero_shot_png(report: dict) -> bytes:
    """Win rate per objective (one line each) as objectives are added one at a time (the paper's Figure 3)."""
    plt, fig, ax = _figure()
    zs = report["zero_shot"]
    stages = range(len(zs["labels"]))
    for obj, values in zs["win_rate"].items():
        ax.plot(stages, [None if v is None else 100 * v for v in values], marker="o", label=obj)
    ax.set_xticks(list(stages), zs["labels"], rotation=20, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("win rate vs golden (%)")
    ax.set_title("Zero-shot: win rate as objectives are added one by one")
    ax.legend(fontsize="small", ncol=2)
    return _png(plt, fig)


def write_bytes(uri: str, data: bytes, storage: StorageConfig) -> None:
    import os

    fs, path = st.filesystem(uri, storage)
    if not st.is_s3(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_reports(report: dict, cfg, storage: StorageConfig) -> list[str]:
    """results.json, results.md, win_rates.png and (with zero_shot) zero_shot.png under cfg.output."""
    out = {name: st.join(cfg.output, name) for name in ("results.json", "results.md", "win_rates.png")}
    st.write_json(out["results.json"], report, storage)
    st.write_text(out["results.md"], markdown(report), storage)
    bars = [cfg.baseline, cfg.treatment] if cfg.baseline and cfg.treatment else cfg.candidates
    write_bytes(out["win_rates.png"], bars_png(report, bars), storage)
    if report.get("zero_shot"):
        out["zero_shot.png"] = st.join(cfg.output, "zero_shot.png")
        write_bytes(out["zero_shot.png"], zero_shot_png(report), storage)
    return list(out.values())
