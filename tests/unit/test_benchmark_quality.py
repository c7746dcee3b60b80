"""tools/benchmark_quality.py and megatron_apex/eval/report.py: the plan per mode, what a rerun
does with finished / trained / partial runs, fine-tuning across a shift change, the report as a
pure function of the results (its verdicts flip with the numbers), and one --smoke run of the FM
teacher and one APEX fine-tune through the real launcher."""

import copy
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megatron_apex.eval import report as rp
from megatron_apex.eval import report_claims as rc
from megatron_apex.eval import report_plots as plots

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("benchmark_quality", REPO / "tools" / "benchmark_quality.py")
bq = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bq  # dataclasses look their module up
_spec.loader.exec_module(bq)


# ---- plan ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", sorted(bq.MODES))
def test_plan_names_unique_and_bases_earlier(mode):
    jobs = bq.build_plan(bq.MODES[mode])
    names = [j.name for j in jobs]
    assert len(names) == len(set(names))
    for i, j in enumerate(jobs):
        if j.base_job is not None:
            assert j.base_job in names[:i], f"{j.name}'s base {j.base_job} is not earlier"
        mode_ = bq.MODES[mode]
        assert j.iters == (max(mode_.curve) if j.run.curve else mode_.iters[j.run.budget]) >= 1


def test_modes_select_rows_and_seeds():
    full, quick = bq.build_plan(bq.MODES["full"]), bq.build_plan(bq.MODES["quick"])
    seeds = bq.MODES["full"].seeds
    assert len(seeds) > 1
    # headline APEX rows: one training run per seed, each with its own sampling seed
    released = [j for j in full if j.run.name == "released-ft"]
    assert [j.seed for j in released] == list(seeds)
    assert [j.sample_seeds for j in released] == [(i,) for i in range(len(seeds))]
    # the FM teacher is trained once and sampled once per seed
    fm = [j for j in full if j.run.name == "fm"]
    assert len(fm) == 1 and fm[0].sample_seeds == tuple(range(len(seeds)))
    assert fm[0].run.nfes == (1, 2, 4, 8, 50) and fm[0].run.method == "euler"
    assert {j.run.name for j in quick} == {r.name for r in bq.RUNS if r.quick}
    assert {j.run.name for j in quick} < {j.run.name for j in full}
    # every cell of the paper's Table 6 and 7 grids is a row of the full plan
    cells6 = {str(j.run.cells.get("table6")) for j in full}
    assert set(rc.TABLE6_PAPER) <= cells6
    # Table 7: the whole grid at the input site; at the projected site (where b is invisible) the
    # b = 0 column, the paper's best cell and one more b != 0 cell
    grid = {(a, b) for a in rc.TABLE7_A for b in rc.TABLE7_B}
    assert {tuple(j.run.cells["table7_input"]) for j in full if "table7_input" in j.run.cells} == grid
    projected = {tuple(j.run.cells["table7"]) for j in full if "table7" in j.run.cells}
    assert {(a, 0.0) for a in rc.TABLE7_A} | {rc.TABLE7_PAPER_BEST} <= projected <= grid
    assert any(b != 0 and a != rc.TABLE7_PAPER_BEST[0] for a, b in projected)
    for j in full:
        site = "input" if "table7_input" in j.run.cells else "projected" if "table7" in j.run.cells else None
        if site is not None:
            flags = list(j.run.flags)
            assert (flags[flags.index("--shift-site") + 1] if "--shift-site" in flags else "projected") == site


def test_every_run_of_the_full_plan_parses_with_the_trainer():
    from megatron_apex.training.arguments import parse_args

    out = Path("/nonexistent-benchmark-out")
    for job in bq.build_plan(bq.MODES["full"]):
        flags = [*bq.COMMON, *bq.schedule_flags(job.run.budget, job.iters), *job.run.flags,
                 "--seed", str(job.seed), "--train-iters", str(job.iters), "--save", str(out)]
        cfg = parse_args(flags)
        assert cfg.train.train_iters == job.iters
        assert cfg.objective.objective == ("fm" if job.run.budget == "fm" else "apex")
        assert cfg.data.caption_dropout == (0.1 if job.run.name == "fm-drop" else 0.0)
        for cell in ("table7", "table7_input"):
            if cell not in job.run.cells:
                continue
            a, b = job.run.cells[cell]
            assert (cfg.model_overrides.get("shift_a", -1.0), cfg.model_overrides.get("shift_b", 0.0)) == (a, b)
            assert cfg.model_overrides.get("shift_site", "projected") == rc.TABLE7_SITES[cell]
        if "table6" in job.run.cells:
            lp, le = (float(x) for x in job.run.cells["table6"].split(":"))
            assert cfg.objective.apex["variant"] == "paper"
            assert (cfg.objective.apex.get("lambda_p", 1.0), cfg.objective.apex.get("lambda_e", 1.0)) == (lp, le)


def test_validate_runs_rejects_bad_plans():
    fm = bq.Run("fm", None, "fm", bq.FM)
    ft = bq.Run("ft", "fm", "ft", bq.RELEASED)
    bq.validate_runs([fm, ft])
    with pytest.raises(ValueError, match="appears twice"):
        bq.validate_runs([fm, fm])
    with pytest.raises(ValueError, match="not an earlier row"):
        bq.validate_runs([ft, fm])
    with pytest.raises(ValueError, match="one run per seed"):
        bq.validate_runs([bq.Run("fm", None, "fm", bq.FM, seeds="train"), ft])
    with pytest.raises(ValueError, match="budget"):
        bq.validate_runs([bq.Run("x", None, "long", bq.FM)])
    with pytest.raises(ValueError, match="cells"):
        bq.validate_runs([bq.Run("x", None, "fm", bq.FM, cells={"tabel6": "1:1"})])
    with pytest.raises(ValueError, match="curve=True needs budget 'ft'"):  # a cosine LR depends on the length
        bq.validate_runs([bq.Run("x", None, "scratch", bq.RELEASED, curve=True)])


def test_only_adds_bases_and_rejects_unknown_names():
    jobs = bq.build_plan(bq.MODES["full"])
    picked = bq.select(jobs, "t7-a-0.5-b1")
    assert [j.name for j in picked] == ["fm", "t7-a-0.5-b1"]
    seeds = bq.select(jobs, "released-ft")  # a row: all its seeds
    assert [j.name for j in seeds] == ["fm"] + [f"released-ft-s{s}" for s in bq.MODES["full"].seeds]
    assert [j.name for j in bq.select(jobs, "paper-ft-s1235")] == ["fm", "paper-ft-s1235"]
    with pytest.raises(ValueError, match="--only nope"):
        bq.select(jobs, "fm,nope")


# ---- where a job stands -------------------------------------------------------------------
def _fake_checkpoint(save: Path, iteration: int) -> Path:
    ckpt = save / f"iter_{iteration:07d}"
    ckpt.mkdir(parents=True)
    (ckpt / "common.pt").write_bytes(b"weights")
    (ckpt / "train_state.json").write_text(json.dumps({"iteration": iteration, "model_config": {}}))
    (save / "latest").write_text(str(iteration))
    return ckpt


def _quick_jobs(*names):
    by = {j.name: j for j in bq.build_plan(bq.MODES["quick"])}
    return [by[n] for n in names]


def _fake_launcher(monkeypatch, tmp_path, failures: int, message: str):
    """A launcher that fails `failures` times printing `message`, then writes the job's checkpoint."""
    script = tmp_path / "fake_launcher.py"
    script.write_text(f"""
import json, sys
from pathlib import Path
count = Path(sys.argv[1]) / "attempts"
n = int(count.read_text()) + 1 if count.exists() else 1
count.write_text(str(n))
if n <= {failures}:
    print({message!r}); sys.exit(1)
ckpt = Path(sys.argv[2]) / "iter_{{:07d}}".format(int(sys.argv[3]))
ckpt.mkdir(parents=True)
(ckpt / "common.pt").write_bytes(b"weights")
(ckpt / "train_state.json").write_text(json.dumps({{"iteration": int(sys.argv[3])}}))
""")
    fm, = _quick_jobs("fm")
    save = bq.run_dir(tmp_path, fm.name)
    monkeypatch.setattr(bq, "launcher_command", lambda args: [sys.executable, str(script), str(tmp_path), str(save), str(fm.iters)])
    return fm, tmp_path / "attempts"


def test_train_relaunches_a_run_that_lost_the_port_race(monkeypatch, tmp_path):
    fm, attempts = _fake_launcher(monkeypatch, tmp_path, 2, "DistNetworkError: ... EADDRINUSE, message: address already in use")
    bq.train(tmp_path, fm)
    assert attempts.read_text() == "3"
    assert bq.trained_iters(bq.run_dir(tmp_path, fm.name)) == fm.iters


@pytest.mark.parametrize("failures,message", [(1, "ValueError: --lr must be positive"),
                                              (bq.PORT_RACE_ATTEMPTS, "EADDRINUSE")])
def test_train_does_not_relaunch_other_failures_or_forever(monkeypatch, tmp_path, failures, message):
    fm, attempts = _fake_launcher(monkeypatch, tmp_path, failures, message)
    with pytest.raises(bq.JobFailed, match="exit code 1"):
        bq.train(tmp_path, fm)
    assert attempts.read_text() == str(failures)


def test_job_action_and_launcher_load_flags(tmp_path):
    fm, rel = _quick_jobs("fm", "released-ft")
    assert bq.job_action(tmp_path, fm) == "start"
    assert "--load" not in bq.launcher_args(tmp_path, fm)
    fm_ckpt = _fake_checkpoint(tmp_path / "runs" / "fm", fm.iters // 2)
    assert bq.job_action(tmp_path, fm) == "resume"
    args = bq.launcher_args(tmp_path, fm)
    assert args[args.index("--load") + 1] == str(tmp_path / "runs" / "fm") and "--finetune" not in args
    fm_ckpt = _fake_checkpoint(tmp_path / "runs" / "fm", fm.iters)
    assert bq.job_action(tmp_path, fm) == "evaluate"
    # a new fine-tune starts from its base's newest checkpoint ...
    args = bq.launcher_args(tmp_path, rel)
    assert args[args.index("--load") + 1] == str(fm_ckpt) and "--finetune" in args
    # ... an unfinished one resumes its own run
    _fake_checkpoint(tmp_path / "runs" / rel.name, 7)
    args = bq.launcher_args(tmp_path, rel)
    assert args[args.index("--load") + 1] == str(tmp_path / "runs" / rel.name) and "--finetune" not in args
    assert args[args.index("--train-iters") + 1] == str(rel.iters) and args[args.index("--seed") + 1] == str(rel.seed)
    # only an ok result counts as finished
    bq.write_json(bq.result_path(tmp_path, "fm"), {"status": "failed"})
    assert bq.job_action(tmp_path, fm) == "evaluate"
    bq.write_json(bq.result_path(tmp_path, "fm"), {"status": "ok"})
    assert bq.job_action(tmp_path, fm) == "skip"


def test_run_job_skips_evaluates_and_records_failures(tmp_path, monkeypatch):
    mode = bq.MODES["quick"]
    fm, rel, paper = _quick_jobs("fm", "released-ft", "paper-ft")
    _fake_checkpoint(tmp_path / "runs" / "fm", fm.iters)  # trained, not evaluated
    trained, evaluated = [], []

    def fake_train(out, job):
        trained.append(job.name)
        if job.name == "released-ft":
            raise bq.JobFailed("launcher exit code 2: boom")
        _fake_checkpoint(out / "runs" / job.name, job.iters)

    monkeypatch.setattr(bq, "train", fake_train)
    monkeypatch.setattr(bq, "Scorer", lambda k: "scorer")
    monkeypatch.setattr(bq, "evaluate", lambda out, job, scorer: evaluated.append(job.name) or
                        [{"nfe": n, "fd": 10.0 + n} for n in job.run.nfes])
    jobs = [fm, rel, paper]
    progress = bq.Progress(jobs, mode, tmp_path)
    for job in jobs:
        bq.run_job(tmp_path, mode, job, progress, [])
    assert trained == ["released-ft", "paper-ft"] and evaluated == ["fm", "paper-ft"]
    failed = json.loads(bq.result_path(tmp_path, "released-ft").read_text())
    assert failed["status"] == "failed" and "boom" in failed["error"]
    ok = json.loads(bq.result_path(tmp_path, "paper-ft").read_text())
    assert ok["status"] == "ok" and ok["evals"][0]["fd"] == 11.0 and ok["base"] == "fm"
    # a rerun skips the finished ones and retries the failed one
    trained.clear(), evaluated.clear()
    for job in jobs:
        bq.run_job(tmp_path, mode, job, bq.Progress(jobs, mode, tmp_path), [])
    assert trained == ["released-ft"] and evaluated == []


def test_a_row_without_nfe_1_is_recorded_and_reports_its_lowest_nfe(tmp_path, monkeypatch, capsys):
    """The few-step sampler's row samples NFE 2 and 4 only; its result is written and the progress
    line names its lowest NFE's FD (an NFE=1 summary divided by zero here once)."""
    mode = bq.MODES["full"]
    job = next(j for j in bq.build_plan(mode) if j.name == "release-preset-release-sampler")
    assert 1 not in job.run.nfes
    _fake_checkpoint(tmp_path / "runs" / job.base_job, mode.iters["fm"])
    _fake_checkpoint(tmp_path / "runs" / job.name, job.iters)
    monkeypatch.setattr(bq, "Scorer", lambda k: "scorer")
    monkeypatch.setattr(bq, "evaluate", lambda out, j, scorer: [{"nfe": n, "fd": 10.0 * n} for n in j.run.nfes])
    bq.run_job(tmp_path, mode, job, bq.Progress([job], mode, tmp_path), [])
    record = json.loads(bq.result_path(tmp_path, job.name).read_text())
    assert record["status"] == "ok" and [e["nfe"] for e in record["evals"]] == list(job.run.nfes)
    lowest = min(job.run.nfes)
    assert f"NFE={lowest} FD {10.0 * lowest:.1f}" in capsys.readouterr().out


def test_dependents_of_an_untrained_base_wait(tmp_path, monkeypatch, capsys):
    mode = bq.MODES["quick"]
    (rel,) = _quick_jobs("released-ft")
    monkeypatch.setattr(bq, "train", lambda out, job: pytest.fail("must not train without its base"))
    bq.run_job(tmp_path, mode, rel, bq.Progress([rel], mode, tmp_path), [])
    assert "base fm is not trained" in capsys.readouterr().out
    assert not bq.result_path(tmp_path, rel.name).exists()


def test_estimate_follows_iterations_and_speeds():
    mode = bq.MODES["quick"]
    fm, rel, paper = _quick_jobs("fm", "released-ft", "paper-ft")
    fixed = bq.LAUNCH_SECONDS
    sampling = lambda j: 10 * mode.num_per_prompt * len(j.sample_seeds) * sum(j.run.nfes) * bq.SECONDS_PER_IMAGE_STEP
    evals = lambda j: len(j.run.nfes) * len(j.sample_seeds) * bq.SECONDS_PER_EVAL
    assert bq.estimate_seconds(fm, mode) == pytest.approx(fixed + 600 / 4.9 + sampling(fm) + evals(fm))
    assert bq.estimate_seconds(rel, mode) == pytest.approx(fixed + 200 / 1.45 + sampling(rel) + evals(rel))
    assert bq.estimate_seconds(paper, mode) == pytest.approx(fixed + 200 / 2.1 + sampling(paper) + evals(paper))
    total = sum(bq.estimate_seconds(j, mode) for j in bq.build_plan(mode))
    assert total < 30 * 60  # the quick mode's promise, on the idle machine


def test_bad_flags_are_one_line_errors(capsys):
    assert bq.main(["--quick", "--only", "t6-1-2", "--list"]) == 2  # a full-only row
    assert "--only t6-1-2: not in this mode's plan" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bq.main(["--quick", "--smoke"])
    with pytest.raises(SystemExit):
        bq.main(["--eval-threads", "0", "--list"])


# ---- report: a pure function of the results -----------------------------------------------
def _result(entry, fds, cells, seed=1234, job=None, status="ok", index=0, acc=0.8):
    """fds: {nfe: fd or [fd per sampling seed]}."""
    evals = [{"nfe": n, "sample_seed": i, "fd": v, "acc": acc, "diversity": 2.0, "fd_real": 3.0,
              "fd_class_means": 270.0, "diversity_real": 2.5, "num_generated": 100,
              "grid": f"samples/{job or entry}/nfe{n}_s{i}.png"}
             for n, vals in fds.items() for i, v in enumerate(vals if isinstance(vals, list) else [vals])]
    return {"job": job or entry, "entry": entry, "plan_index": index, "mode": "synthetic", "seed": seed, "base": None,
            "iters": 10, "flags": [], "cells": cells, "status": status, "evals": evals if status == "ok" else [],
            "error": None if status == "ok" else "boom", "train_seconds": 60.0, "eval_seconds": 6.0,
            "its_per_sec": 2.0}


def _headline(fm1, apex1, fm50=(60.0, 62.0, 61.0)):
    fm = _result("fm", {1: list(fm1), 50: list(fm50)}, {"headline": "FM teacher", "claim": "teacher"})
    apex = [_result("released-ft", {1: v, 4: v - 20}, {"headline": "APEX", "claim": "apex"}, seed=s,
                    job=f"released-ft-s{s}", index=1) for s, v in zip((1, 2, 3), apex1)]
    return [fm, *apex]


def test_stat_matches_statistics_module():
    vals = [3.0, 5.5, 4.25, 9.0]
    s = rc.stat(vals)
    assert (s.mean, s.std, s.lo, s.hi, s.n) == pytest.approx((statistics.mean(vals), statistics.stdev(vals), 3.0, 9.0, 4))
    assert rc.stat([2.0]).std == 0 and rc.stat([]) is None and rc.stat([float("nan"), 1.0]).n == 1


def test_headline_claim_flips_with_the_numbers():
    apex1 = (120.0, 130.0, 125.0)
    text = rc.headline_claim(rc.aggregate(_headline((300.0, 305.0, 295.0), apex1)))
    assert text.startswith("One-step claim HOLDS")
    assert f"{statistics.mean(apex1):.1f} ± {statistics.stdev(apex1):.1f}" in text
    gap = [a - statistics.mean((60.0, 62.0, 61.0)) for a in apex1]
    assert f"{statistics.mean(gap):+.1f} ± {statistics.stdev(gap):.1f}" in text and "worse than the teacher" in text
    # overlapping seeds, or a small ratio: not a wide margin
    assert rc.headline_claim(rc.aggregate(_headline((300.0, 305.0, 295.0), (280.0, 320.0, 300.0)))).startswith(
        "One-step claim DOES NOT HOLD")
    assert rc.headline_claim(rc.aggregate(_headline((300.0, 301.0, 302.0), (250.0, 251.0, 252.0)))).startswith(
        "One-step claim DOES NOT HOLD")  # all below, but only 1.2x lower
    assert rc.headline_claim(rc.aggregate(_headline((300.0, 305.0, 295.0), (100.0, 110.0, 310.0)))).startswith(
        "One-step claim DOES NOT HOLD")  # 1.7x lower on average, but one seed is no better than FM
    text = rc.headline_claim(rc.aggregate(_headline((300.0, 305.0, 295.0), (40.0, 41.0, 42.0))))
    assert "better than the teacher" in text
    assert "cannot be checked" in rc.headline_claim(rc.aggregate(_headline((300.0,), ())))


def _table6(fd_by_cell, noise_seeds=None):
    out = [_result(f"t6-{c}", {1: fd}, {"table6": c}, index=i) for i, (c, fd) in enumerate(fd_by_cell.items())]
    return out


def test_table6_ordering_sentence_flips():
    paper_order = sorted(rc.TABLE6_PAPER, key=lambda c: -rc.TABLE6_PAPER[c])  # best first
    same = {c: 100.0 + 10 * i for i, c in enumerate(paper_order)}
    _, text = rc.table6_ordering(rc.aggregate(_table6(same)))
    assert text.startswith("Table 6 ordering HOLDS") and "all 5 cells" in text and "tau +1.00" in text
    swapped = dict(same, **{"1:1": same["1:0"], "1:0": same["1:1"]})
    _, text = rc.table6_ordering(rc.aggregate(_table6(swapped)))
    assert text.startswith("Table 6 ordering DOES NOT HOLD") and "Best cell here: 1:0" in text
    reversed_ = {c: 200.0 - 10 * i for i, c in enumerate(paper_order)}
    assert "tau -1.00" in rc.table6_ordering(rc.aggregate(_table6(reversed_)))[1]
    # a subset (the quick plan) is compared on the cells that ran
    _, text = rc.table6_ordering(rc.aggregate(_table6({"1:0": 300.0, "0:1": 200.0, "1:1": 150.0})))
    assert text.startswith("Table 6 ordering HOLDS") and "the 3 of 5 cells run here" in text
    assert "cannot be checked" in rc.table6_ordering(rc.aggregate(_table6({"1:1": 1.0})))[1]


def test_table6_noise_sentence_uses_the_seed_spread():
    rows = _table6({"1:0": 300.0, "0:1": 200.0, "1:0.5": 190.0, "1:2": 170.0})
    rows += [_result("paper-ft", {1: v}, {"table6": "1:1"}, seed=s, job=f"paper-ft-s{s}", index=9)
             for s, v in ((1, 150.0), (2, 160.0), (3, 155.0))]
    _, text = rc.table6_ordering(rc.aggregate(rows), rc.aggregate(rows)["paper-ft"])
    noise = statistics.stdev((150.0, 160.0, 155.0))
    gaps = [170.0 - 155.0, 190.0 - 170.0, 200.0 - 190.0, 300.0 - 200.0]
    assert f"is {noise:.1f}; {sum(g < noise for g in gaps)} of the 4 gaps" in text


def test_kendall_tau_matches_scipy():
    from scipy.stats import kendalltau

    rng = np.random.default_rng(0)
    items = list("abcdef")
    for _ in range(5):
        perm = list(rng.permutation(items))
        expected = kendalltau([items.index(x) for x in perm], list(range(len(items)))).statistic
        assert rc.kendall_tau(perm, items) == pytest.approx(expected)


def _table7(fd_by_cell, cell="table7"):
    return [_result(f"{cell}-{a}-{b}", {1: fd}, {cell: [a, b]}, index=i)
            for i, ((a, b), fd) in enumerate(fd_by_cell.items())]


def test_table7_sentence_flips():
    grid = {(a, b): 100.0 + 5 * i for i, (a, b) in enumerate((a, b) for a in rc.TABLE7_A for b in rc.TABLE7_B)}
    best = {**grid, rc.TABLE7_PAPER_BEST: 50.0}
    cells, text = rc.table7_ordering(rc.aggregate(_table7(best)))
    assert len(cells) == 12 and text.startswith("Table 7 ordering (projected site) HOLDS") and "ranks 1 of 12 (FD 50.0)" in text
    worst = {**grid, rc.TABLE7_PAPER_BEST: 500.0}
    _, text = rc.table7_ordering(rc.aggregate(_table7(worst)))
    assert text.startswith("Table 7 ordering (projected site) DOES NOT HOLD") and "ranks 12 of 12 (FD 500.0)" in text
    assert "best here (a=-1, b=0)" in text
    no_best = {k: v for k, v in grid.items() if k != rc.TABLE7_PAPER_BEST}
    assert "CANNOT BE CHECKED" in rc.table7_ordering(rc.aggregate(_table7(no_best)))[1]
    # the input site's grid is its own table
    _, text = rc.table7_ordering(rc.aggregate(_table7(worst, "table7_input")), cell="table7_input")
    assert text.startswith("Table 7 ordering (input site) DOES NOT HOLD")


def test_projected_table7_compares_b_cells_with_b0_of_the_same_seed():
    rows = _table7({(-1.0, 0.0): 120.0, (-1.0, 1.0): 121.5, (-0.5, 0.0): 130.0})
    rows.append(_result("table7--1.0-0.0", {1: 200.0}, {"table7": [-1.0, 0.0]}, seed=99, job="b0-seed99"))
    text = "\n".join(rp.table7_section(rc.aggregate(rows)))
    assert "b is invisible" in text
    assert f"(a=-1, b=1) 121.50 vs (a=-1, b=0) 120.00 (seed {rows[0]['seed']})" in text
    assert "200.00" not in text  # the b=0 run of another seed is not a pair
    assert rp.table7_section(rc.aggregate(rows), "table7_input") == []  # no input-site results: no section


def _all_results():
    rows = _headline((300.0, 305.0, 295.0), (120.0, 130.0, 125.0))
    rows += _table6({"1:0": 300.0, "0:1": 200.0, "1:1": 150.0})
    rows += _table7({(-1.0, 0.0): 120.0, (-0.5, 1.0): 110.0})
    rows += _table7({(-1.0, 0.0): 140.0, (-0.5, 1.0): 150.0}, "table7_input")
    rows += [_result("released-cfg", {}, {"options": "CFG"}, status="failed", index=20),
             _result("released-nodm", {1: 250.0, 4: 200.0}, {"options": "no DM"}, index=21)]
    return rows


def test_render_report_is_pure_and_follows_the_numbers():
    results = _all_results()
    before = copy.deepcopy(results)
    text = rp.render_report(results, expected_seconds=3600.0)
    assert results == before and rp.render_report(results, expected_seconds=3600.0) == text
    assert "One-step claim HOLDS" in text and "Table 6 ordering HOLDS" in text
    assert "Table 7 ordering (projected site) HOLDS" in text and "Table 7 ordering (input site) DOES NOT HOLD" in text
    assert "expected for this mode: 1 h 00 min" in text
    assert "| APEX | 3 | 125.0 ± 5.0 | 105.0 ± 5.0 | - |" in text  # n, then NFE 1, 4, 50
    assert "failed: released-cfg: boom" in text
    assert "![fm NFE=1](samples/fm/nfe1_s0.png)" in text
    total = sum(r["train_seconds"] + r["eval_seconds"] for r in results)
    assert f"Runtime: {rp._duration(total)} measured" in text
    flipped = copy.deepcopy(results)
    for r in flipped:
        if r["entry"] == "table7--0.5-1.0":
            r["evals"][0]["fd"] = 999.0
    assert "Table 7 ordering (projected site) DOES NOT HOLD" in rp.render_report(flipped)


def test_write_report_reads_results_and_writes_plots(tmp_path):
    from PIL import Image

    for r in _all_results():
        bq.write_json(tmp_path / "results" / f"{r['job']}.json", r)
    path = rp.write_report(tmp_path, expected_seconds=60.0)
    text = path.read_text()
    assert text == rp.render_report(rp.load_results(tmp_path / "results"), 60.0, [plots.PLOT_NFE, plots.PLOT_ABLATIONS])
    for name in (plots.PLOT_NFE, plots.PLOT_ABLATIONS):
        with Image.open(tmp_path / name) as img:
            assert img.size[0] > 200 and img.size[1] > 100
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]
    (tmp_path / "results" / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json"):
        rp.load_results(tmp_path / "results")


# ---- training-length curve: one run evaluated at several lengths ----------------------------
def _curve_job(mode_name="full"):
    """The release-preset-curve job; in quick/smoke (where its base fm-drop is not planned) the
    same row after its base."""
    mode = bq.MODES[mode_name]
    row = next(r for r in bq.RUNS if r.name == "release-preset-curve")
    base = next(r for r in bq.RUNS if r.name == row.base)
    if mode.quick_rows_only:
        jobs = bq.build_plan(mode, [bq.RUNS[0], dataclasses.replace(base, quick=True),
                                    dataclasses.replace(row, quick=True)])
    else:
        jobs = bq.build_plan(mode)
    return next(j for j in jobs if j.run.name == row.name), next(j for j in jobs if j.name == row.base)


def _trainer_kept_checkpoints(save: Path, cfg, interrupt_at=None):
    """Which checkpoints survive a run, by the trainer's rule (megatron_apex/training/loop.py: a
    checkpoint when iteration % --save-interval == 0, one when stopped by a signal and one at the
    end if the last iteration was not saved; after each, the real prune_checkpoints with
    --keep-last), optionally interrupted once at `interrupt_at` and resumed."""
    from megatron_apex.checkpoint import complete_checkpoints, prune_checkpoints

    def save_at(it):
        _fake_checkpoint(save, it)
        if cfg.checkpoint.keep_last:
            prune_checkpoints(str(save), cfg.checkpoint.keep_last)

    last_saved = None
    for it in range(1, cfg.train.train_iters + 1):
        if cfg.checkpoint.save_interval and it % cfg.checkpoint.save_interval == 0:
            save_at(it)
            last_saved = it
        elif it == interrupt_at:
            save_at(it)
            last_saved = it
    if last_saved != cfg.train.train_iters:
        save_at(cfg.train.train_iters)
    return complete_checkpoints(str(save))


@pytest.mark.parametrize("mode_name", ["full", "quick", "smoke"])
def test_curve_row_trains_its_longest_length_and_keeps_every_curve_checkpoint(tmp_path, mode_name):
    from megatron_apex.training.arguments import parse_args

    mode = bq.MODES[mode_name]
    job, base = _curve_job(mode_name)
    assert job.curve == tuple(sorted(mode.curve)) and job.iters == max(mode.curve)
    assert job.seed == mode.seeds[0] and job.sample_seeds == (0,) and job.base_job == "fm-drop"
    assert job.run.flags == bq.PRESET and job.run.budget == "ft" and job.run.cells == {
        "curve": "release preset (from fm-drop)"}
    _fake_checkpoint(bq.run_dir(tmp_path, base.name), base.iters)
    cfg = parse_args(bq.launcher_args(tmp_path, job))
    assert cfg.train.train_iters == job.iters and cfg.optim.lr_decay_style == "constant"
    # a signal's checkpoint lands between the saves (in full and quick mode)
    for k, interrupt in enumerate((None, job.curve[0] + 1, job.iters - 1)):
        kept = _trainer_kept_checkpoints(tmp_path / f"sim{k}", cfg, interrupt)
        assert set(job.curve) <= set(kept), (interrupt, kept)
    # the normal rows' flags would lose them: the simulation can fail
    normal = dataclasses.replace(job, curve=())
    lost = _trainer_kept_checkpoints(tmp_path / "normal", parse_args(bq.launcher_args(tmp_path, normal)))
    assert not set(job.curve) <= set(lost)


def test_curve_row_is_in_the_full_plan_only_and_after_the_release_preset_rows():
    full = [j.run.name for j in bq.build_plan(bq.MODES["full"])]
    assert full.count("release-preset-curve") == 1
    assert full.index("release-preset-curve") > max(i for i, n in enumerate(full) if n.startswith("release-preset")
                                                    and n != "release-preset-curve")
    assert "release-preset-curve" not in {j.run.name for j in bq.build_plan(bq.MODES["quick"])}
    assert [j.curve for j in bq.build_plan(bq.MODES["full"]) if j.run.name != "release-preset-curve"] == [()] * (
        len(full) - 1)


def test_estimate_counts_the_curve_training_and_every_length_evaluated():
    mode = bq.MODES["full"]
    job, _ = _curve_job()
    images = 10 * mode.num_per_prompt
    one_eval = images * sum(bq.APEX_NFES) * bq.SECONDS_PER_IMAGE_STEP + len(bq.APEX_NFES) * bq.SECONDS_PER_EVAL
    speed = 1.45 * 0.8  # released APEX, with the preset's any-step rows
    assert bq.estimate_seconds(job, mode) == pytest.approx(
        bq.LAUNCH_SECONDS + max(mode.curve) / speed + len(mode.curve) * one_eval)


class _CurveScorer:
    """Scores that depend on the checkpoint loaded and the NFE; records where samples go."""

    def __init__(self):
        self.saved = []

    def images(self, model, nfe, method, seed):
        return (model, nfe, seed)

    def save(self, images, prefix, nfe):
        self.saved.append(Path(prefix))

    def score(self, images):
        checkpoint, nfe, seed = images
        iteration = int(Path(checkpoint).name.split("_")[1])
        return {"fd": _curve_fd(iteration, nfe), "acc": 0.5, "diversity": 1.0 + seed}


def _curve_fd(iteration, nfe):
    return 1000.0 / iteration + nfe


def _curve_fakes(monkeypatch, tmp_path, interrupt_at=None):
    """The curve job trained by a fake launcher that saves where the job's own save flags say,
    and the real evaluate() with a fake model loader and scorer; returns (job, loads, scorer)."""
    from megatron_apex.inference import loading

    job, base = _curve_job()
    if bq.trained_iters(bq.run_dir(tmp_path, base.name)) < base.iters:
        _fake_checkpoint(bq.run_dir(tmp_path, base.name), base.iters)
    loads, scorer = [], _CurveScorer()

    def fake_train(out, j):
        args = bq.launcher_args(out, j)
        interval = int(args[args.index("--save-interval") + 1])
        for it in range(interval, j.iters + 1, interval):
            _fake_checkpoint(bq.run_dir(out, j.name), it)

    def fake_load(path, weights):
        if interrupt_at is not None and path.endswith(f"iter_{interrupt_at:07d}"):
            raise RuntimeError("interrupted")
        loads.append(path)
        return path, {}

    monkeypatch.setattr(bq, "train", fake_train)
    monkeypatch.setattr(bq, "Scorer", lambda k: scorer)
    monkeypatch.setattr(loading, "load_model_for_inference", fake_load)
    return job, loads, scorer


def _run_curve(tmp_path, job):
    mode = bq.MODES["full"]
    bq.run_job(tmp_path, mode, job, bq.Progress([job], mode, tmp_path), [])


def test_curve_run_evaluates_each_length_from_its_checkpoint(monkeypatch, tmp_path):
    from megatron_apex.checkpoint import checkpoint_dir

    job, loads, scorer = _curve_fakes(monkeypatch, tmp_path)
    _run_curve(tmp_path, job)
    save = str(bq.run_dir(tmp_path, job.name))
    assert loads == [checkpoint_dir(save, n) for n in job.curve]
    assert sorted({p.parent.name for p in scorer.saved}) == sorted(f"iters{n}" for n in job.curve)
    record = json.loads(bq.result_path(tmp_path, job.name).read_text())
    assert record["status"] == "ok" and record["iters"] == max(job.curve)
    assert [p["iters"] for p in record["curve"]] == list(job.curve)
    for point in record["curve"]:
        assert [(e["nfe"], e["sample_seed"], e["fd"]) for e in point["evals"]] == [
            (nfe, 0, _curve_fd(point["iters"], nfe)) for nfe in job.run.nfes]
        assert all(e["grid"] == f"samples/{job.name}/iters{point['iters']}/nfe{e['nfe']}_s0.png"
                   for e in point["evals"])
    assert record["evals"] == record["curve"][-1]["evals"]  # every existing table reads the last length


def test_curve_evaluation_resumes_after_the_finished_lengths(monkeypatch, tmp_path):
    from megatron_apex.checkpoint import checkpoint_dir

    third = _curve_job()[0].curve[2]
    job, loads, _ = _curve_fakes(monkeypatch, tmp_path, interrupt_at=third)
    with pytest.raises(RuntimeError, match="interrupted"):
        _run_curve(tmp_path, job)
    assert not bq.result_path(tmp_path, job.name).exists()
    save = bq.run_dir(tmp_path, job.name)
    assert [p["iters"] for p in json.loads((save / bq.CURVE_PROGRESS).read_text())["curve"]] == list(job.curve[:2])
    assert bq.job_action(tmp_path, job) == "evaluate"

    job, loads, _ = _curve_fakes(monkeypatch, tmp_path)  # the rerun: the two finished lengths are kept
    _run_curve(tmp_path, job)
    assert loads == [checkpoint_dir(str(save), n) for n in job.curve[2:]]
    record = json.loads(bq.result_path(tmp_path, job.name).read_text())
    assert [[e["fd"] for e in p["evals"]] for p in record["curve"]] == [
        [_curve_fd(n, nfe) for nfe in job.run.nfes] for n in job.curve]

    # a checkpoint rewritten after its evaluation is evaluated again; a finished result is skipped
    os.remove(bq.result_path(tmp_path, job.name))
    state = Path(checkpoint_dir(str(save), job.curve[0])) / "train_state.json"
    os.utime(state, ns=(state.stat().st_atime_ns, state.stat().st_mtime_ns + 10**9))
    loads.clear()
    _run_curve(tmp_path, job)
    assert loads == [checkpoint_dir(str(save), job.curve[0])]
    loads.clear()
    _run_curve(tmp_path, job)
    assert loads == []


def test_curve_run_with_a_missing_checkpoint_fails_with_one_line(monkeypatch, tmp_path):
    import shutil

    from megatron_apex.checkpoint import checkpoint_dir

    job, loads, _ = _curve_fakes(monkeypatch, tmp_path)
    bq.train(tmp_path, job)
    save = bq.run_dir(tmp_path, job.name)
    shutil.rmtree(checkpoint_dir(str(save), job.curve[1]))
    _run_curve(tmp_path, job)
    record = json.loads(bq.result_path(tmp_path, job.name).read_text())
    assert record["status"] == "failed" and loads == []
    assert f"curve checkpoints [{job.curve[1]}] are missing under {save}" in record["error"]
    assert "\n" not in record["error"]


def _curve_result(fd1_by_iters, seed=1234, flags=("--x",), base="fm-drop", index=30):
    """A curve row's result: NFE=1 FD per length as given, NFE=4 half of it."""
    curve = [{"iters": n, "evals": _result("x", {1: fd, 4: fd / 2}, {}, acc=0.5 + n / 10000)["evals"]}
             for n, fd in fd1_by_iters.items()]
    r = _result("release-preset-curve", {}, {"curve": "preset curve"}, seed=seed,
                job=f"release-preset-curve-s{seed}", index=index)
    r.update(curve=curve, evals=curve[-1]["evals"], flags=list(flags), base=base)
    return r


def _curve_results(noise_fds=(110.0, 115.0, 112.0)):
    rows = _headline((300.0, 305.0, 295.0), (120.0, 130.0, 125.0))
    rows.append(_result("fm-drop", {1: 310.0, 50: 57.5}, {"headline": "FM drop"}, index=12))
    for s, v in zip((1, 2, 3), noise_fds):
        r = _result("release-preset", {1: v}, {"options": "preset"}, seed=s, job=f"release-preset-s{s}", index=20)
        r["flags"] = ["--x"]
        rows.append(r)
    rows.append(_curve_result({250: 150.0, 500: 120.0, 1000: 104.0, 2000: 100.0}, seed=1))
    rows.append(_curve_result({250: 160.0, 500: 118.0, 1000: 106.0, 2000: 98.0}, seed=2))
    return rows


def test_curve_section_values_come_from_the_curve_json():
    results = _curve_results()
    lines = rp.curve_section(rc.aggregate(results))
    assert lines[0] == "## Training length"
    curves = [r for r in results if "curve" in r]
    table = [line for line in lines if line.startswith("| preset curve")]
    assert len(table) == 4
    for line, n in zip(table, (250, 500, 1000, 2000)):
        evals = [e for r in curves for p in r["curve"] if p["iters"] == n for e in p["evals"]]
        def cell(key, nfe, digits=1):
            vals = [e[key] for e in evals if e["nfe"] == nfe]
            return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"
        assert line == (f"| preset curve | {n} | {cell('fd', 1)} | {cell('fd', 4)} | {cell('diversity', 1)} | "
                        f"{cell('acc', 1, 3)} |")
    text = "\n".join(lines)
    assert f"`fm` FD {statistics.mean((60.0, 62.0, 61.0)):.1f} ± {statistics.stdev((60.0, 62.0, 61.0)):.1f}" in text
    assert "`fm-drop` FD 57.5" in text
    change = statistics.mean((100.0, 98.0)) - statistics.mean((104.0, 106.0))
    noise = statistics.stdev((110.0, 115.0, 112.0))
    assert f"from 1000 to 2000 iterations it changed by {change:+.1f}: still improving" in text
    assert f"seed spread {noise:.1f}" in text and "`release-preset`" in text
    # a wider seed spread makes the same change noise
    noisy = "\n".join(rp.curve_section(rc.aggregate(_curve_results((100.0, 120.0, 140.0)))))
    assert f"changed by {change:+.1f}: within seed noise" in noisy


def test_curve_section_without_curve_results():
    assert rp.curve_section(rc.aggregate(_all_results())) == []
    failed = _result("release-preset-curve", {}, {"curve": "preset curve"}, status="failed", index=30)
    lines = rp.curve_section(rc.aggregate(_all_results() + [failed]))
    assert "| preset curve | - | - | - | - | failed: release-preset-curve: boom |" in lines


def test_write_report_draws_the_curve_plot_only_with_curve_results(tmp_path):
    from PIL import Image

    for r in _curve_results():
        bq.write_json(tmp_path / "results" / f"{r['job']}.json", r)
    text = rp.write_report(tmp_path).read_text()
    assert "## Training length" in text and f"![{plots.PLOT_CURVE}]({plots.PLOT_CURVE})" in text
    with Image.open(tmp_path / plots.PLOT_CURVE) as img:
        assert img.size[0] > 200 and img.size[1] > 100
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]
    bare = tmp_path / "bare"
    for r in _all_results():
        bq.write_json(bare / "results" / f"{r['job']}.json", r)
    text = rp.write_report(bare).read_text()
    assert "Training length" not in text and plots.PLOT_CURVE not in text and not (bare / plots.PLOT_CURVE).exists()


# ---- end to end: the FM teacher and one fine-tune through the launcher, then a rerun --------
def _run_tool(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "benchmark_quality.py"), *args], cwd=REPO,
                          capture_output=True, text=True)


def test_smoke_end_to_end_then_rerun(tmp_path):
    out = tmp_path / "bench"
    proc = _run_tool("--smoke", "--only", "fm,released-ft", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[benchmark 2/2" in proc.stdout
    for name in ("report.md", plots.PLOT_NFE, plots.PLOT_ABLATIONS):
        assert (out / name).is_file(), name
    fm = json.loads((out / "results" / "fm.json").read_text())
    rel = json.loads((out / "results" / "released-ft.json").read_text())
    assert fm["status"] == rel["status"] == "ok"
    assert sorted(e["nfe"] for e in fm["evals"]) == [1, 2, 4, 8, 50] and rel["base"] == "fm"
    log = (out / "runs" / "released-ft" / "launcher.log").read_text()
    assert f"--load {out / 'runs' / 'fm' / 'iter_0000004'} --finetune" in log
    assert "One-step claim" in (out / "report.md").read_text()

    # the samples are tools/sample.py's for the same checkpoint, NFE and seed; the scores tools/evaluate.py's
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, str(REPO / "tools" / "sample.py"), "--load", str(out / "runs" / "released-ft"),
                    "--nfe", "2", "--num-per-prompt", str(bq.MODES["smoke"].num_per_prompt), "--seed", "0",
                    "--out", str(ref)], check=True, capture_output=True, cwd=REPO)
    with np.load(ref.with_suffix(".npz")) as a, np.load(out / "samples" / "released-ft" / "nfe2_s0.npz") as b:
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    subprocess.run([sys.executable, str(REPO / "tools" / "evaluate.py"), "--samples", str(ref.with_suffix(".npz")),
                    "--json", str(tmp_path / "ref.json")], check=True, capture_output=True, cwd=REPO)
    ours = next(e for e in rel["evals"] if e["nfe"] == 2)
    theirs = json.loads((tmp_path / "ref.json").read_text())
    assert ours["fd"] == pytest.approx(theirs["fd"], rel=1e-9) and ours["acc"] == theirs["acc"]

    # rerun: the finished FM result is kept, the trained fine-tune is only re-evaluated
    stamp = (out / "results" / "fm.json").stat().st_mtime_ns
    ckpts = sorted(p.name for p in (out / "runs" / "released-ft").glob("iter_*"))
    os.remove(out / "results" / "released-ft.json")
    proc = _run_tool("--smoke", "--only", "released-ft", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "released-ft: evaluating" in proc.stdout and "training" not in proc.stdout
    assert (out / "results" / "fm.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (out / "runs" / "released-ft").glob("iter_*")) == ckpts
    again = json.loads((out / "results" / "released-ft.json").read_text())
    assert [e["fd"] for e in again["evals"]] == [e["fd"] for e in rel["evals"]]


def test_table7_section_shows_each_cells_diversity_beside_its_fd():
    rows = _table7({(-1.0, 1.0): 115.0, (-0.5, 1.0): 104.0}, "table7_input")
    rows[0]["evals"][0]["diversity"], rows[1]["evals"][0]["diversity"] = 9.3, 5.7
    lines = rp.table7_section(rc.aggregate(rows), "table7_input")
    start = next(i for i, line in enumerate(lines) if line.startswith("NFE=1 diversity"))
    fd_rows = {line.split(" | ")[0]: line for line in lines[:start] if line.startswith("| a=")}
    div_rows = {line.split(" | ")[0]: line for line in lines[start:] if line.startswith("| a=")}
    assert "115.0" in fd_rows["| a=-1"] and "104.0 (paper best)" in fd_rows["| a=-0.5"]
    assert "9.3" in div_rows["| a=-1"] and "5.7 (paper best)" in div_rows["| a=-0.5"]
    assert "115.0" not in div_rows["| a=-1"]
