"""The small-scale reproduction report (tools/benchmark_quality.py): tables shaped like the
APEX paper's, plain sentences on whether its claims and ablation orderings hold here, and plots.

Everything is a pure function of the per-run result dicts (OUT/results/*.json), so the report
can be regenerated at any time and tested on synthetic numbers. A result dict holds:
  job, entry (the plan row; a row with several training seeds has one job per seed),
  plan_index, seed, iters, flags, cells (the report cells the row fills: `headline`, `claim`
  ("teacher" | "apex"), `table6` ("1:0"...), `table7` ([a, b]), `options`, `site`,
  `fake_grad`, `weighting`, `curve`), status ("ok" | "failed"), error, train_seconds, eval_seconds,
  its_per_sec, and evals: a list of {nfe, sample_seed, acc, fd, diversity, fd_real,
  fd_class_means, diversity_real, num_generated, grid}. A `curve` row's result also holds
  curve: [{iters, evals}] (one training run evaluated at several lengths; evals is its last).
The numbers and verdicts come from megatron_apex/eval/report_claims.py, the plots from
megatron_apex/eval/report_plots.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from megatron_apex.eval.report_claims import (TABLE7_A, TABLE7_B, TABLE7_PAPER_BEST, TABLE7_SITES, Entry,
                                              aggregate, curve_points, curve_teachers, fmt, headline_claim,
                                              point_metric, references, seed_noise, stat, table6_ordering,
                                              table7_ordering, with_cell)
from megatron_apex.eval.report_plots import write_plots

# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

def _table(header: Sequence[str], rows: Iterable[Sequence]) -> List[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _status(e: Entry) -> str:
    if not e.jobs:
        return "not run"
    if e.errors and not e.ok_jobs:
        return "failed: " + "; ".join(e.errors)
    return "ok" if not e.errors else f"{len(e.ok_jobs)} ok, failed: " + "; ".join(e.errors)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h} h {rem // 60:02d} min" if h else f"{rem // 60} min {rem % 60:02d} s"


def headline_section(entries: Dict[str, Entry]) -> List[str]:
    rows = with_cell(entries, "headline")
    nfes = sorted({n for e in rows for n in e.nfes}) or [1]
    out = ["## Headline: FM teacher vs APEX", "",
           "Frechet distance (lower is better), mean ± std over the row's seeds (FM teacher: trained once, "
           "the spread is over sampling seeds; APEX rows: over training seeds, each sampled with its own seed):", ""]
    out += _table(["run", "n"] + [f"NFE={n}" for n in nfes],
                  ([e.cells["headline"], max((e.metric("fd", n).n for n in e.nfes), default=0)]
                   + [fmt(e.metric("fd", n)) for n in nfes] for e in rows))
    out += ["Class accuracy of the conditioning label (higher is better):", ""]
    out += _table(["run"] + [f"NFE={n}" for n in nfes],
                  ([e.cells["headline"]] + [fmt(e.metric("acc", n), 3) for n in nfes] for e in rows))
    out += ["Diversity (mean within-class feature distance; real images in the references below):", ""]
    out += _table(["run"] + [f"NFE={n}" for n in nfes],
                  ([e.cells["headline"]] + [fmt(e.metric("diversity", n)) for n in nfes] for e in rows))
    out += [headline_claim(entries), ""]
    failed = [f"`{e.name}`: {_status(e)}" for e in rows if e.errors]
    if failed:
        out += ["Failed headline runs: " + "; ".join(failed), ""]
    return out


def table6_section(entries: Dict[str, Entry]) -> List[str]:
    rows, text = table6_ordering(entries, _noise_row(entries, "table6"))
    out = ["## Table 6: loss weights lambda_p : lambda_e (`paper` variant, fine-tuned from the FM teacher)", ""]
    out += _table(["lambda_p:lambda_e", "paper GenEval (0.6B)", "our NFE=1 FD", "our NFE=1 acc"],
                  ([c, f"{p:.2f}", fmt(fd), fmt(acc, 3)] for c, p, fd, acc in rows))
    return out + [text, ""]


def _noise_row(entries: Dict[str, Entry], cell: str) -> Optional[Entry]:
    """The multi-seed row that is also a cell of this table (its seed spread is the noise)."""
    multi = [e for e in with_cell(entries, cell) if e.metric("fd", 1) is not None and e.metric("fd", 1).n > 1]
    return multi[0] if multi else None


PROJECTED_B_NOTE = (
    "At the projected site (after `txt_in`) the offset b is invisible to qwen-image: c_fake = a*h + b adds b to every "
    "hidden unit of every text token, each block reads the text stream through a LayerNorm that removes the mean "
    "over the hidden units, and the text stream's own output is discarded "
    "(tests/unit/test_family_models.py::test_projected_scalar_shift_offset_b_is_invisible_to_the_model). There "
    "the grid is its b = 0 column; cells with b != 0 that ran show it.")


def _fd1_by_seed(entry: Entry) -> Dict[int, float]:
    return {j.get("seed"): e["fd"] for j in entry.ok_jobs for e in j.get("evals", [])
            if int(e["nfe"]) == 1 and e.get("fd") is not None}


def _same_a_pairs(grid: Dict[Tuple[float, float], Entry]) -> str:
    """b != 0 cells against the b = 0 cell of the same a, trained with the same seed."""
    shown = []
    for a, b in sorted(grid):
        if b == 0 or (a, 0.0) not in grid:
            continue
        ours, base = _fd1_by_seed(grid[(a, b)]), _fd1_by_seed(grid[(a, 0.0)])
        shown += [f"(a={a:g}, b={b:g}) {ours[seed]:.2f} vs (a={a:g}, b=0) {base[seed]:.2f} (seed {seed})"
                  for seed in sorted(set(ours) & set(base))]
    return f" Measured, NFE=1 FD: {'; '.join(shown)}." if shown else ""


def table7_section(entries: Dict[str, Entry], cell: str = "table7") -> List[str]:
    if cell != "table7" and not with_cell(entries, cell):
        return []
    # the input site's cells are single runs: the seed spread of the projected default stands in
    grid, text = table7_ordering(entries, _noise_row(entries, cell) or _noise_row(entries, "table7"), cell)
    out = [f"## Table 7: condition shift c_fake = a*c + b at the {TABLE7_SITES[cell]} site (`released` variant, "
           "fine-tuned), NFE=1 FD", ""]
    if cell == "table7":
        out += [PROJECTED_B_NOTE + _same_a_pairs(grid), ""]

    def metric_grid(key):
        def cell_text(a, b):
            e = grid.get((a, b))
            mark = " (paper best)" if (a, b) == TABLE7_PAPER_BEST else ""
            return (fmt(e.metric(key, 1)) if e else "not run") + mark

        return _table(["a \\ b"] + [f"b={b:g}" for b in TABLE7_B],
                      ([f"a={a:g}"] + [cell_text(a, b) for b in TABLE7_B] for a in TABLE7_A))

    out += metric_grid("fd") + [text, ""]
    # a lower FD can come from sharper class prototypes at the cost of variety: show both
    out += ["NFE=1 diversity (mean within-class feature distance, higher is more varied):", ""]
    return out + metric_grid("diversity") + [""]


def ablation_section(entries: Dict[str, Entry], cell: str, title: str) -> List[str]:
    rows = with_cell(entries, cell)
    if not rows:
        return []
    out = [f"## {title}", ""]
    out += _table([cell.replace("_", " "), "run", "NFE=1 FD", "NFE=1 acc", "NFE=1 diversity", "NFE=4 FD", "status"],
                  ([e.cells[cell], f"`{e.name}`", fmt(e.metric("fd", 1)), fmt(e.metric("acc", 1), 3),
                    fmt(e.metric("diversity", 1)), fmt(e.metric("fd", 4)), _status(e)] for e in rows))
    best = [e for e in rows if e.metric("fd", 1) is not None]
    if len(best) > 1:
        best.sort(key=lambda e: e.metric("fd", 1).mean)
        out += [f"Lowest NFE=1 FD: {best[0].cells[cell]} ({best[0].metric('fd', 1).mean:.1f}); highest: "
                f"{best[-1].cells[cell]} ({best[-1].metric('fd', 1).mean:.1f}).", ""]
    return out


# ---- training length: a curve row's one run evaluated at several lengths ---------------------

def _same_flags_noise(entries: Dict[str, Entry], curve: Entry) -> Tuple[Optional[float], Optional[Entry]]:
    """The NFE=1 FD seed spread of a multi-seed row trained with the curve row's flags."""
    flags = {tuple(j.get("flags", [])) for j in curve.jobs}
    for e in entries.values():
        if e is not curve and {tuple(j.get("flags", [])) for j in e.jobs} == flags and seed_noise(e) is not None:
            return seed_noise(e), e
    return None, None


def _curve_sentence(entries: Dict[str, Entry], row: Entry, points: Dict[int, List[Dict]]) -> str:
    """Whether the last step of training still lowered NFE=1 FD by more than the seed noise."""
    fd1 = {n: point_metric(ev, "fd", 1) for n, ev in points.items()}
    fd1 = {n: s.mean for n, s in fd1.items() if s is not None}
    if len(fd1) < 2:
        return ""
    lengths = sorted(fd1)
    first, prev, last = lengths[0], lengths[-2], lengths[-1]
    change = fd1[last] - fd1[prev]
    text = (f"{row.cells['curve']}: NFE=1 FD {fd1[first]:.1f} at {first} iterations, {fd1[last]:.1f} at {last}; "
            f"from {prev} to {last} iterations it changed by {change:+.1f}")
    noise, source = _same_flags_noise(entries, row)
    if noise is None:
        return text + " (no multi-seed row with the same flags to compare it with the seed noise)."
    verdict = ("within seed noise" if abs(change) <= noise
               else "still improving with more training" if change < 0 else "worse with more training")
    return text + (f": {verdict} (seed spread {noise:.1f}: std of NFE=1 FD over the seeds of `{source.name}`, "
                   "same flags).")


def curve_section(entries: Dict[str, Entry]) -> List[str]:
    rows = with_cell(entries, "curve")
    if not rows:
        return []
    out = ["## Training length", "",
           "One fine-tuning run per row, trained to its longest length at a constant learning rate (so its first "
           "N iterations are an N-iteration run), its checkpoint at each length sampled like every other row. "
           "Frechet distance (lower is better), diversity, class accuracy:", ""]
    table = []
    for e in rows:
        points = curve_points(e)
        table += [[e.cells["curve"], n, fmt(point_metric(ev, "fd", 1)), fmt(point_metric(ev, "fd", 4)),
                   fmt(point_metric(ev, "diversity", 1)), fmt(point_metric(ev, "acc", 1), 3)]
                  for n, ev in points.items()]
        if not points:
            table.append([e.cells["curve"], "-", "-", "-", "-", _status(e)])
    out += _table(["run", "iterations", "NFE=1 FD", "NFE=4 FD", "NFE=1 diversity", "NFE=1 accuracy"], table)
    teachers = curve_teachers(entries)
    if teachers:
        out += ["FM teacher at NFE=50 (Euler), the plot's horizontal lines: "
                + "; ".join(f"`{t.name}` FD {fmt(fd50)}" for t, fd50 in teachers) + ".", ""]
    sentences = [_curve_sentence(entries, e, curve_points(e)) for e in rows]
    return out + [s for s in sentences if s] + ([""] if any(sentences) else [])


def references_section(results: Sequence[Dict]) -> List[str]:
    ref = references(results)
    n = stat(e.get("num_generated") for r in results for e in r.get("evals", []))
    def mean(key, digits=1):
        return f"{ref[key].mean:.{digits}f}" if ref[key] else "-"

    return ["## Scale references (same protocol, same number of images)", "",
            f"- class-mean images (a generator that collapses each prompt to its mean): FD {mean('fd_class_means')}",
            f"- real held-out images (a perfect generator): FD {mean('fd_real', 2)}, diversity "
            f"{mean('diversity_real')}",
            f"- generated images per evaluation: {int(n.mean) if n else '-'} (FD depends on this number; compare "
            "only within this report)", ""]


def runs_section(results: Sequence[Dict]) -> List[str]:
    rows = sorted(results, key=lambda r: (r.get("plan_index", 0), r.get("seed", 0)))
    out = ["## Runs", ""]
    out += _table(["job", "base", "iters", "seed", "train", "it/s", "eval", "status", "flags"],
                  ([f"`{r['job']}`", r.get("base") or "-", r.get("iters", "-"), r.get("seed", "-"),
                    _duration(r.get("train_seconds") or 0), f"{r['its_per_sec']:.2f}" if r.get("its_per_sec") else "-",
                    _duration(r.get("eval_seconds") or 0), r.get("status"),
                    "`" + " ".join(r.get("flags", [])) + "`"] for r in rows))
    return out


def render_report(results: Sequence[Dict], expected_seconds: Optional[float] = None,
                  plots: Sequence[str] = ()) -> str:
    """report.md's text from the result dicts (pure: no files read or written)."""
    entries = aggregate(results)
    mode = sorted({r.get("mode", "?") for r in results})
    total = sum((r.get("train_seconds") or 0) + (r.get("eval_seconds") or 0) for r in results)
    out = ["# APEX small-scale reproduction", "",
           f"Mode: {', '.join(mode) or '-'}; {len(results)} runs with results "
           f"({sum(r.get('status') == 'ok' for r in results)} ok). qwen-image-tiny on the built-in Fashion-MNIST "
           "with MiniLM prompts, global batch 64, EMA 0.99 weights sampled; scored by "
           "megatron_apex.eval.metrics.evaluate_images (classifier trained on the real train split, FD in its "
           "feature space against held-out test images).", "",
           f"Runtime: {_duration(total)} measured (training + sampling + scoring, summed over the runs here)"
           + (f"; expected for this mode: {_duration(expected_seconds)}." if expected_seconds else "."), ""]
    out += headline_section(entries) + table6_section(entries) + table7_section(entries, "table7")
    out += table7_section(entries, "table7_input")
    out += ablation_section(entries, "options", "`released` variant: options")
    out += ablation_section(entries, "site", "Shift site (`released`, fine-tuned)")
    out += ablation_section(entries, "fake_grad", "fake_grad (`paper`, fine-tuned)")
    out += ablation_section(entries, "weighting", "Weighting w(t) of L_mix (`paper`, fine-tuned)")
    out += curve_section(entries)
    out += references_section(results)
    out += sample_grid_section(entries)
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    out += runs_section(results)
    return "\n".join(out)


def sample_grid_section(entries: Dict[str, Entry]) -> List[str]:
    shown = []
    for e in with_cell(entries, "headline"):
        for nfe in sorted({1, max(e.nfes)} if e.nfes else set()):
            grid = e.grid(nfe)
            if grid:
                shown.append(f"- {e.cells['headline']}, NFE={nfe}: ![{e.name} NFE={nfe}]({grid})")
    return (["## Sample grids (one row per class prompt)", ""] + shown + [""]) if shown else []


# ---------------------------------------------------------------------------------------------
# Files: results in, report.md and plots out
# ---------------------------------------------------------------------------------------------

def load_results(results_dir) -> List[Dict]:
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        return []
    out = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}); delete it to rerun that job") from None
    return out


def write_report(out_dir, expected_seconds: Optional[float] = None) -> Path:
    """Read OUT/results/*.json, write OUT/report.md and the plots; returns report.md's path."""
    out_dir = Path(out_dir)
    results = load_results(out_dir / "results")
    plots = write_plots(results, out_dir)
    path = out_dir / "report.md"
    tmp = path.with_name(f".report.md.tmp-{os.getpid()}")
    tmp.write_text(render_report(results, expected_seconds, plots))
    os.replace(tmp, path)
    return path
