"""The report's plots (PNG files next to report.md), drawn with matplotlib when it is installed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_apex.eval.report_claims import (TABLE6_PAPER, TABLE7_SITES, Entry, Stat, aggregate, curve_points,
                                              curve_teachers, point_metric, references, shift_key, with_cell)

PLOT_NFE = "fd_vs_nfe.png"
PLOT_ABLATIONS = "ablations.png"
PLOT_CURVE = "curve.png"


def write_plots(results: Sequence[Dict], out_dir) -> List[str]:
    """PNG plots next to report.md; returns their file names ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    entries = aggregate(results)
    written = []
    for name, draw in ((PLOT_NFE, _plot_nfe), (PLOT_ABLATIONS, _plot_ablations), (PLOT_CURVE, _plot_curve)):
        fig = draw(plt, entries, references(results))
        if fig is None:
            continue
        path = Path(out_dir) / name
        tmp = path.with_name(f".{name}.tmp.png")
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(fig)
        os.replace(tmp, path)
        written.append(name)
    return written


def _plot_nfe(plt, entries: Dict[str, Entry], ref: Dict):
    rows = [e for e in with_cell(entries, "headline") if e.nfes]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "fd", "Frechet distance (lower is better)"),
                           (axes[1], "acc", "class accuracy")):
        for e in rows:
            stats = [(n, e.metric(key, n)) for n in e.nfes]
            xs = [n for n, s in stats if s]
            ax.errorbar(xs, [s.mean for _, s in stats if s], yerr=[s.std for _, s in stats if s], marker="o",
                        capsize=3, label=e.cells["headline"])
        if key == "fd":
            for rkey, style, rlabel in (("fd_class_means", "--", "class means"), ("fd_real", ":", "real images")):
                if ref.get(rkey):
                    ax.axhline(ref[rkey].mean, color="grey", linestyle=style, label=rlabel)
        ax.set_xscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle("FM teacher vs APEX: quality vs number of function evaluations")
    return fig


def _ablation_panels(entries: Dict[str, Entry]) -> List[Tuple[str, List[str], List[Optional[Stat]]]]:
    panels = []
    t6 = {e.cells["table6"]: e for e in with_cell(entries, "table6")}
    if t6:
        cells = [c for c in TABLE6_PAPER if c in t6]
        panels.append(("Table 6: lambda_p:lambda_e", cells, [t6[c].metric("fd", 1) for c in cells]))
    for cell, site in TABLE7_SITES.items():
        t7 = with_cell(entries, cell)
        if t7:
            panels.append((f"Table 7 ({site}): shift (a, b)",
                           [f"{a:g},{b:g}" for a, b in (shift_key(e.cells[cell]) for e in t7)],
                           [e.metric("fd", 1) for e in t7]))
    for cell, title in (("options", "released options"), ("site", "shift site"), ("fake_grad", "fake_grad"),
                        ("weighting", "weighting")):
        rows = with_cell(entries, cell)
        if rows:
            panels.append((title, [str(e.cells[cell]) for e in rows], [e.metric("fd", 1) for e in rows]))
    return panels


def _plot_ablations(plt, entries: Dict[str, Entry], ref: Dict):
    panels = _ablation_panels(entries)
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 4 * nrows), squeeze=False)
    for ax, (title, labels, stats) in zip(axes.flat, panels):
        xs = range(len(labels))
        ax.bar(xs, [s.mean if s else 0 for s in stats], yerr=[s.std if s else 0 for s in stats], capsize=3)
        if ref.get("fd_class_means"):
            ax.axhline(ref["fd_class_means"].mean, color="grey", linestyle="--", label="class means")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("NFE=1 FD (lower is better)")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _plot_curve(plt, entries: Dict[str, Entry], ref: Dict):
    """NFE=1 and NFE=4 FD against training length, the FM teachers' NFE=50 FD as horizontal
    lines; None without curve results."""
    rows = [(e, curve_points(e)) for e in with_cell(entries, "curve")]
    rows = [(e, p) for e, p in rows if p]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e, points in rows:
        for nfe, marker in ((1, "o"), (4, "s")):
            stats = [(n, point_metric(ev, "fd", nfe)) for n, ev in points.items()]
            stats = [(n, s) for n, s in stats if s is not None]
            if stats:
                ax.errorbar([n for n, _ in stats], [s.mean for _, s in stats], yerr=[s.std for _, s in stats],
                            marker=marker, capsize=3, label=f"{e.cells['curve']}, NFE={nfe}")
    for (teacher, fd50), style in zip(curve_teachers(entries), ("--", ":", "-.")):
        ax.axhline(fd50.mean, color="grey", linestyle=style, label=f"{teacher.cells.get('headline', teacher.name)}, NFE=50")
    ax.set_xscale("log")
    lengths = sorted({n for _, points in rows for n in points})
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xticks([], minor=True)  # a log axis labels its minor ticks (3x10^2 ...) between the lengths
    ax.set_xlabel("APEX fine-tuning iterations")
    ax.set_ylabel("Frechet distance (lower is better)")
    ax.legend(fontsize=7)
    ax.set_title("One-step quality against training length")
    return fig
