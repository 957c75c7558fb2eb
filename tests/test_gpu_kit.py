"""The GPU kit (`benchmarks/gpu_check.py`) and the users'-scale step benchmark's model preparation, on CPU.

The kit is meant for a GPU machine lent once in a while, for minutes; its dry run (tiny shapes, CPU) runs the same
code paths here, so the kit cannot rot between loans: every section must run, and its JSON must hold every section
with sane values. Nothing here times anything.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else None
    return proc, report, out


@pytest.mark.slow
def test_dry_run_writes_every_section(dry_run):
    proc, report, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report is not None and (out / "gpu_check.log").stat().st_size > 0
    assert report["dry_run"] is True
    assert list(report["sections"]) == ["environment", "parity", "divergence", "liger", "steps"]
    for name, record in report["sections"].items():
        assert record["status"] == "passed", (name, record.get("error"), record.get("traceback"))
        assert record["seconds"] >= 0
    # The summary is printed last (the device tool returns the output's tail)
    assert "[passed] steps" in proc.stdout


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

    divergence = sections["divergence"]
    timed = [row for row in divergence["rows"] if "time_ms" in row]
    assert {row["method"] for row in timed} >= {"floor_tiles", "floor_large", "tiles", "naive"}
    assert all(row["time_ms"] > 0 and math.isfinite(row["ratio_to_floor"]) for row in timed)
    assert divergence["targets"] and all(t["met"] is None for t in divergence["targets"])  # dry run: not judged

    liger = sections["liger"]
    # The control step (no Liger) runs on CPU: pi_theta == pi_ref at step 1, so every divergence is exactly 0
    assert liger["control"]["dgpo/divergence/max"] == 0.0, liger["control"]
    assert liger["control"]["dgpo/scored_fraction"] == 1.0
    assert liger["liger"].startswith("skipped")

    steps = sections["steps"]
    rows = {(row["path"], row["variant"]): row for row in steps["rows"]}
    assert set(rows) == {(p, v) for p in ("aligned", "offpolicy") for v in ("grpo_beta0", "grpo_beta0.04", "dgpo")}
    for row in rows.values():
        assert row["cycles"] >= 1 and row["cycle_ms"] > 0 and row["peak_mib"] > 0, row
        assert row["generate_ms"] is not None and 0 < row["generate_ms"] < row["cycle_ms"], row
        assert 0.0 <= row["frac_reward_zero_std"] <= 1.0
    assert rows[("offpolicy", "dgpo")]["steps_per_cycle"] == 2 and rows[("aligned", "dgpo")]["steps_per_cycle"] == 1
    # Off-policy: DGPO scores every completion at TRL's scoring-time forward
    assert rows[("offpolicy", "dgpo")]["scored_fraction"] == 1.0
    # A reference model costs memory; GRPO(beta=0) has none
    for path in ("aligned", "offpolicy"):
        assert rows[(path, "grpo_beta0.04")]["resident_mib"] > rows[(path, "grpo_beta0")]["resident_mib"]
    ratios = [r for r in steps["ratios"] if r["ratio"] in ("dgpo / grpo_beta0.04", "dgpo / grpo_beta0")]
    assert len(ratios) == 4 and all(math.isfinite(r["cycle_time"]) and r["peak_memory"] > 0 for r in ratios)


def test_padded_vocabulary_keeps_the_warmed_model(warm_model_path, tmp_path):
    """bench_steps' users'-scale model: the warmed tiny Llama padded to a larger vocabulary keeps its behaviour on
    the real tokens, while every projection runs over the full vocabulary."""
    sys.path.insert(0, str(BENCH))
    try:
        from bench_steps import pad_vocabulary
    finally:
        sys.path.remove(str(BENCH))
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from dgpo_trl.tiny import reversal_dataset, sft_batch

    info = pad_vocabulary(warm_model_path, str(tmp_path / "padded"), 4096, max_log_mass=-6.0)
    assert info["pad_log_mass_max"] <= -6.0 + 1e-3
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "padded")
    padded = AutoModelForCausalLM.from_pretrained(tmp_path / "padded")
    original = AutoModelForCausalLM.from_pretrained(warm_model_path)
    assert padded.config.vocab_size == 4096 and padded.get_output_embeddings().weight.shape[0] == 4096
    assert len(tokenizer) == original.config.vocab_size  # the tokenizer keeps its own tokens
    batch = sft_batch(tokenizer, list(reversal_dataset(32, seed=11)))
    with torch.no_grad():
        z_pad = padded(**batch).logits
        z_orig = original(**batch).logits
    mask = batch["labels"][:, 1:] != -100
    # Same logits on the real tokens; the padding's share of probability is tiny at every answer position
    torch.testing.assert_close(z_pad[..., : z_orig.shape[-1]], z_orig)
    pad_mass = z_pad[:, :-1][mask].log_softmax(-1)[:, z_orig.shape[-1] :].logsumexp(-1).exp()
    assert pad_mass.max() < 0.01
