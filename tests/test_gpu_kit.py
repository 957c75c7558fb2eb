"""The GPU kit (`benchmarks/gpu_check.py`) and the users'-scale step benchmark's model preparation, on CPU.

The kit runs on a GPU machine without network access, where a failure is costly to diagnose; its dry run (tiny
shapes, CPU) runs the same code paths in every test run, so the kit cannot rot between GPU runs: every section must
run, and its JSON must hold every section with sane values. Nothing here times anything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else None
    return proc, report, out


@pytest.mark.slow
def test_dry_run_writes_every_section(dry_run):
    proc, report, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report is not None and (out / "gpu_check.log").stat().st_size > 0
    assert report["dry_run"] is True
    assert list(report["sections"]) == ["environment", "parity", "divergence", "exactness", "liger", "steps"]
    for name, record in report["sections"].items():
        assert record["status"] == "passed", (name, record.get("error"), record.get("traceback"))
        assert record["seconds"] >= 0
    # The summary is printed last, so that the output's tail holds it
    assert "[passed] steps" in proc.stdout
    # Everything lands under --out, the steps section's runs file included
    assert (out / "steps" / "steps_gpu_check.runs.jsonl").stat().st_size > 0


def test_results_go_to_out_else_the_results_folder(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCH))
    monkeypatch.setenv("OUT", str(tmp_path / "elsewhere"))  # an unrelated variable of the user's shell: not read
    assert gpu_check.output_dir(tmp_path / "mine", dry_run=False) == tmp_path / "mine"
    assert gpu_check.output_dir(tmp_path / "mine", dry_run=True) == tmp_path / "mine"
    assert gpu_check.output_dir(None, dry_run=False) == BENCH / "results" / "gpu_check"
    # A dry run's tiny-shape numbers never land among the results
    assert gpu_check.output_dir(None, dry_run=True) == Path(tempfile.gettempdir()) / "dgpo_gpu_check_dry"


@pytest.mark.slow
def test_dry_run_values_are_sane(dry_run):
    _, report, _ = dry_run
    sections = {name: record["result"] for name, record in report["sections"].items()}

    env = sections["environment"]
    assert env["versions"]["torch"] == torch.__version__
    assert env["versions"]["trl"] and env["trl_from"] and "not importable" not in env["dgpo_trl_from"]

    parity = sections["parity"]
    assert parity["counts"]["passed"] >= 1 and parity["counts"]["failed"] == 0
    # Without CUDA the CUDA tests skip (never faked); the torch tiles meet the float64 reference at bf16 and fp32
    assert all(t["outcome"] == "skipped" for name, t in parity["tests"].items() if "cuda" in name)
    assert {row["dtype"] for row in parity["numerics"]} == {"float32", "bfloat16"}
    for row in parity["numerics"]:
        assert row["within_tolerance"] and row["max_abs_err"] < 1e-4, row
        assert 0.0 < row["mean_hellinger"] < 1.0 and row["mean_entropy"] > 0.0
    assert parity["compile_sm90"]["status"] in ("passed", "skipped", "unavailable"), parity["compile_sm90"]
    # The kernel guard's check ran on both dtypes; on CPU the default dispatch runs the torch tiles and checks nothing
    assert [row["dtype"] for row in parity["kernel_guard"]] == ["float32", "bfloat16"]
    for row in parity["kernel_guard"]:
        assert row["paths"] == ["tiles", "tiles"] and row["checks"] == 0 and row["warnings"] == [], row

    divergence = sections["divergence"]
    timed = [row for row in divergence["rows"] if "time_ms" in row]
    assert {row["method"] for row in timed} >= {"floor_tiles", "floor_large", "tiles", "naive"}
    assert all(row["time_ms"] > 0 and math.isfinite(row["ratio_to_floor"]) for row in timed)
    assert divergence["targets"] and all(t["met"] is None for t in divergence["targets"])  # dry run: not judged

    exactness = sections["exactness"]
    # On CPU: fp32 only (bf16 is the GPU run's); TRL's log-probs exactly, no dropout in the divergence
    assert exactness["log_ratio_fp32"] == [0.0, 0.0], exactness
    assert exactness["divergence_attention_dropout"] == [0.0] and exactness["divergence_lora_dropout"] == [0.0]

    liger = sections["liger"]
    # The control step (no Liger) runs on CPU: pi_theta == pi_ref at step 1, so every divergence is exactly 0
    assert liger["control"]["dgpo/divergence/max"] == 0.0, liger["control"]
    assert liger["control"]["dgpo/scored_fraction"] == 1.0
    assert liger["liger"].startswith("skipped")

    steps = sections["steps"]
    rows = {(row["config"], row["variant"]): row for row in steps["rows"]}
    configs = ("aligned:0.5:completion", "offpolicy:0:all")
    assert set(rows) == {(c, v) for c in configs for v in ("dgpo", "grpo_beta0.04", "grpo_beta0")}
    for row in rows.values():
        assert row["rounds"] == 1 and row["cycle_ms"] > 0 and row["peak_mib"] > 0, row
        assert row["generate_ms"] is not None and 0 < row["generate_ms"] < row["cycle_ms"], row
        assert row["score_ms"] >= 0 and row["train_ms"] > 0, row
    # The controlled reward set the zero-advantage fraction; DGPO skipped exactly those groups on the aligned path
    # and scored everything off-policy
    assert rows[("aligned:0.5:completion", "dgpo")]["frac_reward_zero_std"] == 0.5
    assert rows[("aligned:0.5:completion", "dgpo")]["scored_fraction"] == 0.5
    assert rows[("offpolicy:0:all", "dgpo")]["frac_reward_zero_std"] == 0.0
    assert rows[("offpolicy:0:all", "dgpo")]["scored_fraction"] == 1.0
    # The reference's backbone is timed where there is one
    for config in configs:
        assert rows[(config, "grpo_beta0")]["ref_forward_ms"] is None
        assert rows[(config, "grpo_beta0.04")]["ref_forward_ms"] > 0 and rows[(config, "dgpo")]["ref_forward_ms"] > 0
    ratios = [r for r in steps["ratios"] if r["ratio"] in ("dgpo / grpo_beta0.04", "dgpo / grpo_beta0")]
    assert len(ratios) == 4 and all(math.isfinite(r["cycle"]["mean"]) and r["peak"]["mean"] > 0 for r in ratios)
    assert steps["targets"] and all(t["met"] is None for t in steps["targets"])  # dry run: not judged


def _bench_steps():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_steps
    finally:
        sys.path.remove(str(BENCH))
    return bench_steps


@pytest.mark.parametrize("fraction", [0.0, 0.4, 0.5, 0.75])
def test_controlled_reward_sets_the_zero_advantage_fraction(fraction):
    """The step benchmark's reward: exactly `fraction` of the groups constant, the others all distinct, the same
    sequence in every process (it depends on the group index only), across calls of any size."""
    reward = _bench_steps().ControlledReward(fraction, num_generations=4)
    rewards = reward(["p"] * 8, ["c"] * 8) + reward(["p"] * 32, ["c"] * 32)  # 10 groups over two calls
    groups = [rewards[i : i + 4] for i in range(0, len(rewards), 4)]
    constant = [len(set(g)) == 1 for g in groups]
    assert sum(constant) == math.floor(fraction * len(groups))
    assert all(len(set(g)) == 4 for g, c in zip(groups, constant) if not c)
    again = _bench_steps().ControlledReward(fraction, num_generations=4)
    assert again(["p"] * 40, ["c"] * 40) == rewards
    with pytest.raises(ValueError):
        reward(["p"] * 3, ["c"] * 3)


def test_step_benchmark_pairs_ratios_within_rounds():
    """Ratios are taken per round (each process against the other variant's of the same round) and summarised with
    their spread, and the rounds a +-3% resolution needs."""
    bench = _bench_steps()

    def run(variant, round_, cycle_s, ref_s=None):
        cycle = dict(
            total_s=cycle_s, generate_s=0.1, score_s=0.1, train_s=cycle_s - 0.2, ref_forward_s=ref_s, warmup=False
        )
        return dict(
            config="aligned:0:completion",
            variant=variant,
            round=round_,
            peak_mib=100.0,
            cycles=[dict(cycle, warmup=True, total_s=99.0), cycle],
            load_average_start=[0.0],
            wall_s=1.0,
            frac_reward_zero_std=0.0,
            scored_fraction=None,
            completion_length=None,
        )

    # Round 2 runs 2x slower for everyone (machine drift): the per-round ratio stays 0.9
    runs = (
        [run("dgpo", r, 0.9 * s, 0.05 * s) for r, s in ((1, 1.0), (2, 2.0))]
        + [run("grpo_beta0.04", r, s, 0.1 * s) for r, s in ((1, 1.0), (2, 2.0))]
        + [run("grpo_beta0", r, 0.8 * s) for r, s in ((1, 1.0), (2, 2.0))]
    )
    summary = bench.summarize(runs)
    ratio = {r["ratio"]: r for r in summary["ratios"]}
    assert ratio["dgpo / grpo_beta0.04"]["cycle"]["mean"] == pytest.approx(0.9)
    assert ratio["dgpo / grpo_beta0.04"]["cycle"]["sd"] == pytest.approx(0.0, abs=1e-12)
    assert ratio["dgpo / grpo_beta0"]["cycle"]["mean"] == pytest.approx(0.9 / 0.8)
    assert ratio["floor: 1 + dgpo ref_forward / grpo_beta0"]["cycle"]["mean"] == pytest.approx(1 + 0.05 / 0.8)
    spread = bench.spread([1.0, 1.1, 0.9, 1.0])
    assert spread["ci95"] == pytest.approx(3.182 * spread["sd"] / 2)
    assert bench.t95(spread["rounds_for_3pct"] - 1) * spread["sd"] / spread["rounds_for_3pct"] ** 0.5 <= 0.03


def test_step_benchmark_does_not_resume_another_machines_runs(tmp_path):
    """A table mixes rounds, so a runs file measured on one processor is not continued on another: an interrupted run
    resumed on a different machine would pair its rounds with rounds of other speeds."""
    bench = _bench_steps()
    args = argparse.Namespace(
        shape="micro",
        device="cpu",
        dtype="float32",
        threads=1,
        batch=8,
        generations=8,
        max_completion_length=16,
        warmup_cycles={"aligned": 2},
        timed_cycles={"aligned": 5},
        allocator="reuse",
        out=tmp_path,
        stem="steps",
    )
    settings = bench.settings_of(args)
    here = bench.machine_label("cpu")
    run = dict(settings, config="aligned:0:completion", variant="dgpo", round=1, settings=settings)
    (tmp_path / "steps.runs.jsonl").write_text(json.dumps(dict(run, machine="Another CPU")) + "\n")
    with pytest.raises(
        SystemExit, match=re.escape(f"measured on 'Another CPU', this is {here!r}; use another --stem")
    ):
        bench.run_benchmark(args)


@pytest.mark.parametrize(
    ("mean", "ci95", "met", "resolved"),
    [
        (0.97, 0.02, True, True),
        (0.99, 0.02, True, False),
        (1.01, 0.02, False, False),
        (1.05, 0.02, False, True),
        (0.97, math.nan, True, False),
    ],
)
def test_a_target_is_resolved_only_when_its_interval_is_on_one_side(mean, ci95, met, resolved):
    """A mean of 1.002 +- 0.04 is not "missed" against a limit of 1.00, nor 0.99 +- 0.02 "met": both are unresolved."""
    assert _bench_steps().judge(mean, ci95, 1.00) == dict(met=met, resolved=resolved)
