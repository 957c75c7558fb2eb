"""The GPU kit: every GPU check of DGPO in one command, for a CUDA machine without network access.

    make gpu-wheels                            # on a machine with PyPI: the wheels the GPU machine lacks, in .whl/
    python3 benchmarks/gpu_check.py --out DIR  # on the GPU machine (or: make gpu-check GPU_CHECK_ARGS="--out DIR")
    python benchmarks/gpu_check.py --dry-run   # the same code paths on CPU with tiny shapes (seconds)

Sections, each run in its own Python process (a CUDA fault or a hang in one cannot take the others down; each has a
time limit inside the kit's overall budget, --budget-s, 480 s by default), in this order:

- environment: versions of Python, torch, CUDA, Triton, transformers, TRL, datasets, accelerate, peft, liger-kernel;
  the GPU and its memory.
- parity:      `tests/test_kernels.py` under pytest (the fused Triton kernel against the float64 reference and the
               torch tiles, fp32, bf16 and fp16, CUDA tests included; the Triton-interpreter test is left to
               `make test`), then the kernel's numerics at an LM's size (N 1024, V 151936, H 896, fp32 and bf16
               inputs): the largest absolute error of each statistic against the float64 reference on the same inputs;
               the guard of `token_statistics`' default dispatch on the same inputs (the kernel's first run checked
               against the torch tiles: passed or not, the largest difference, which path ran, no re-check on a second
               call); and an ahead-of-time compile of the kernel for sm_90 (which the CPU dry run can do too).
- exactness:   DGPO where users train, on the GPU (tiny models, seconds each): the first micro-step after a
               generation (steps_per_generation 2) in bf16 weights and under bf16 autocast, on a model whose logits
               exceed 15: max |log pi_theta - old_per_token_logps| must be exactly 0 (TRL's own log-probs), as
               GRPOTrainer's; and step-1 `dgpo/divergence/max` exactly 0 with dropout in the policy (nn.Dropout
               modules, a config's attention_dropout, LoRA dropout on a pretrained adapter).
- divergence:  `benchmarks/bench_divergence.py`'s cases at V = 151936, H = 896 and 3584, N 2048/8192/16384, bf16: the
               fused kernel and the torch tiles against the two-matmul floor (target <= 1.15x), and the extra memory
               per added token (independent of N: a few bytes per token, the outputs; the naive pass needs 8 V).
- liger:       one DGPOTrainer step with `use_liger_kernel=True` on a tiny CUDA Llama (bf16), and the same step
               without Liger as a control: the logged `dgpo/divergence/max` at step 1 (pi_theta == pi_ref) must be 0.
- steps:       `benchmarks/bench_steps.py`'s benchmark with its own definitions (the CPU figures' batch, lengths and
               configurations), at the random-init Qwen2.5-0.5B shape (bf16, V = 151936): DGPO vs GRPO(beta=0.04) vs
               GRPO(beta=0), aligned (every completion scored, and 40% zero-advantage groups) and off-policy
               (steps_per_generation 2), one process per trainer, as many rounds (up to 3) as fit in the section's
               time, torch.cuda.max_memory_allocated. Its runs file lands in `DIR/steps/`.

A failing section is recorded (status "failed", the error, the end of its output) and the kit goes on. Everything
lands in `DIR/gpu_check.json` and `DIR/gpu_check.log` (`--out DIR`; default benchmarks/results/gpu_check/, or a
temporary folder for the dry run). The exit status is 1 if any section failed, after both files are written.

Packages: the GPU machine needs Python (3.12 unless the wheels were built for another: `GPU_PYTHON_VERSION`), a CUDA
build of torch, Triton, transformers, accelerate and peft, and datasets' own dependencies (see
`benchmarks/gpu_wheels.sh`); it may lack TRL, datasets and liger-kernel. `make gpu-wheels` puts their wheels in
`.whl/`, which travels with the working tree; this script installs them with `pip install --no-index --no-deps
--target` into a private folder put first on PYTHONPATH (the machine's torch and transformers are never touched;
`--install no` skips it where those packages are installed), and runs dgpo-trl from the working tree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
SECTIONS = ("environment", "parity", "exactness", "divergence", "liger", "steps")
# Seconds each section may take at most on the GPU (the kit's budget caps the sum); the dry run takes seconds
SECTION_LIMITS = {"environment": 90, "parity": 150, "exactness": 90, "divergence": 150, "liger": 120, "steps": 300}
# On a GPU every section gets its own process; on the dry run the three torch-only sections share one and the two
# that import TRL another (TRL's import takes seconds to tens of seconds where vLLM is installed)
GROUPS_GPU = [["environment"], ["parity"], ["exactness"], ["divergence"], ["liger"], ["steps"]]
GROUPS_DRY = [["environment", "parity", "divergence"], ["exactness", "liger", "steps"]]
PACKAGES = (
    "torch",
    "triton",
    "transformers",
    "trl",
    "datasets",
    "accelerate",
    "peft",
    "liger-kernel",
    "tokenizers",
    "numpy",
    "pyarrow",
)


def _setup_env() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    for path in (str(BENCH), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)


def _log(*parts) -> None:
    print(*parts, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Sections (each runs in a child process; `dry` selects the tiny CPU shapes)


def section_environment(dry: bool, device) -> dict:
    import importlib.metadata as metadata

    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info = dict(
        python=sys.version.split()[0],
        platform=platform.platform(),
        versions=versions,
        cuda_available=torch.cuda.is_available(),
        torch_cuda=torch.version.cuda,
    )
    # Where each carried package was imported from (the private folder, not the image)
    for module in ("trl", "datasets", "liger_kernel", "dgpo_trl"):
        try:
            info[f"{module}_from"] = str(Path(__import__(module).__file__).parent)
        except Exception as error:  # noqa: BLE001 - recorded: a missing package fails the sections that need it
            info[f"{module}_from"] = f"not importable: {type(error).__name__}: {error}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=props.total_memory / 2**30,
            multiprocessors=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
        )
    elif not dry:
        raise RuntimeError("no CUDA device visible to torch")
    _log(json.dumps(info, indent=1))
    return info


class _Outcomes:
    """A pytest plugin that records each test's outcome and duration."""

    def __init__(self):
        self.tests = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome in ("failed", "skipped"):
            entry = self.tests.setdefault(report.nodeid, {"outcome": report.outcome, "seconds": 0.0})
            if report.outcome != "passed" or entry["outcome"] == "passed":
                entry["outcome"] = report.outcome
            entry["seconds"] += report.duration
            if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
                entry["reason"] = str(report.longrepr[-1])
            if report.outcome == "failed":
                entry["error"] = str(report.longrepr)[-2000:]


def section_parity(dry: bool, device) -> dict:
    import pytest
    import torch

    from dgpo_trl.functional import TokenStatistics, token_statistics, token_statistics_reference
    from dgpo_trl.kernels import triton_available

    outcomes = _Outcomes()
    # The interpreter test is CPU-only (and `make test` runs it); everything else in the file runs here
    code = pytest.main(
        [
            str(ROOT / "tests" / "test_kernels.py"),
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "not interpreter",
            "-W",
            "ignore::DeprecationWarning",
        ],
        plugins=[outcomes],
    )
    tests = outcomes.tests
    counts = {k: sum(t["outcome"] == k for t in tests.values()) for k in ("passed", "failed", "skipped")}
    cuda_tests = {name: t for name, t in tests.items() if "cuda" in name}
    result = dict(pytest_exit_code=int(code), counts=counts, tests=tests)
    problems = []
    if counts["failed"] or code not in (0, 5):
        problems.append(f"pytest: {counts['failed']} failed (exit code {int(code)})")
    if not dry and (not cuda_tests or any(t["outcome"] != "passed" for t in cuda_tests.values())):
        problems.append(
            "CUDA parity tests did not all run and pass: "
            + ", ".join(f"{n.split('::')[-1]}={t['outcome']}" for n, t in cuda_tests.items())
        )

    result["compile_sm90"] = compile_for_hopper()
    _log(f"  ahead-of-time compile for sm_90: {result['compile_sm90']}")
    if result["compile_sm90"].get("status") == "failed":
        problems.append(f"the fused kernel does not compile for sm_90: {result['compile_sm90'].get('error')}")

    # Numerics at an LM's size: the same inputs (bf16 or fp32) through the fused kernel (CUDA) or the torch tiles,
    # against the float64 reference; plus fused vs tiles
    from bench_divergence import make_inputs

    n, vocab, hidden = (64, 1000, 32) if dry else (1024, 151936, 896)
    fused = device.type == "cuda" and triton_available()
    numerics = []
    # Tolerances: both sides take the same (bf16 or fp32) inputs and accumulate in fp32, so the error is the fp32
    # summation order over H products and V terms (the CUDA tests use 2e-5 to 3e-4 at V 301-32003)
    tolerance = 1e-3
    guard = []
    for dtype in (torch.float32, torch.bfloat16):
        h_p, w_p, h_q, w_q, labels = make_inputs(n, vocab, hidden, dtype, device)
        want = token_statistics_reference(h_p, w_p, h_q, w_q, labels)
        got = {"tiles": token_statistics(h_p, w_p, h_q, w_q, labels, use_triton=False)}
        if fused:
            got["fused"] = token_statistics(h_p, w_p, h_q, w_q, labels, use_triton=True)
        for method, stats in got.items():
            row = dict(method=method, dtype=str(dtype).removeprefix("torch."), N=n, V=vocab, H=hidden)
            for field, g, w in zip(TokenStatistics._fields, stats, want):
                row[f"{field}_max_abs_err"] = (g.float() - w.float()).abs().max().item()
                row[f"{field}_finite"] = bool(torch.isfinite(g).all())
            row["mean_hellinger"] = want.hellinger.mean().item()
            row["mean_entropy"] = want.entropy.mean().item()
            row["max_abs_err"] = max(v for k, v in row.items() if k.endswith("_max_abs_err"))
            row["within_tolerance"] = row["max_abs_err"] <= tolerance and all(
                v for k, v in row.items() if k.endswith("_finite")
            )
            numerics.append(row)
            if not row["within_tolerance"]:
                problems.append(f"{method} {row['dtype']}: max abs error {row['max_abs_err']:.2e} > {tolerance}")
        guard.append(kernel_guard_check(h_p, w_p, h_q, w_q, labels, device))
        if fused and not (
            guard[-1]["paths"] == ["fused", "fused"]
            and guard[-1]["checks"] == 1
            and guard[-1]["passed"]
            and not guard[-1]["warnings"]
        ):
            problems.append(f"kernel guard {guard[-1]['dtype']}: {guard[-1]}")
        del h_p, w_p, h_q, w_q, labels, want, got
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not fused:
        result["fused_numerics"] = "skipped: the fused kernel needs a CUDA device and Triton"
    result.update(numerics=numerics, tolerance=tolerance, kernel_guard=guard)
    for row in numerics:
        _log(
            f"  {row['method']:5s} {row['dtype']:8s} N={n} V={vocab} H={hidden}: max abs error "
            + ", ".join(f"{f} {row[f + '_max_abs_err']:.1e}" for f in TokenStatistics._fields)
        )
    for row in guard:
        _log(f"  kernel guard {row['dtype']}: {_guard_line(row)}")
    if problems:
        result["problems"] = problems
        raise SectionFailed("; ".join(problems), result)
    return result


def kernel_guard_check(h_p, w_p, h_q, w_q, labels, device) -> dict:
    """Two calls of `token_statistics`' default dispatch on these inputs, as a training run's first two divergence
    passes meet them: on CUDA the first runs the kernel and checks its first token chunk against the torch tiles
    (passed or not, the statistic that differed most and its largest difference, the tolerance), the second runs it
    without re-checking; which path each ran; the guard's warnings. On CPU the default dispatch runs the tiles."""
    import warnings

    import torch

    from dgpo_trl import functional

    functional._KERNEL_CHECKS.clear()  # a first call in this process for these inputs (the pytest run made others)
    paths, seconds = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            functional.token_statistics(h_p, w_p, h_q, w_q, labels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
            paths.append(functional.last_divergence_path())
    checks = list(functional._KERNEL_CHECKS.values())
    row = dict(
        dtype=str(h_p.dtype).removeprefix("torch."),
        paths=paths,
        first_call_s=seconds[0],
        second_call_s=seconds[1],
        checks=len(checks),
        warnings=[str(w.message) for w in caught if "fused Triton kernel" in str(w.message)],
    )
    if checks:
        row.update(checks[0]._asdict())
    return row


def _guard_line(row: dict) -> str:
    if not row.get("checks"):
        return f"paths {row['paths']}, no check (the default dispatch runs the kernel on CUDA only)"
    found = row["error"] or (
        f"largest difference {row['difference']:.1e} ({row['field']}, tolerance {row['tolerance']})"
    )
    return (
        f"first call {'verified' if row['passed'] else 'FELL BACK'}: {found}; paths {row['paths']}, "
        f"{row['checks']} check(s), {row['first_call_s'] * 1e3:.0f} / {row['second_call_s'] * 1e3:.0f} ms"
    )


def compile_for_hopper() -> dict:
    """Compiles the fused kernel ahead of time for sm_90 (H100/H200), bf16 and fp32 variants, with the installed
    Triton: no GPU needed (Triton's wheel carries ptxas), so the dry run checks that this Triton can build the kernel.
    Uses Triton's compiler API (`ASTSource`, `triton.compile`), which moves between releases: where it does not fit,
    the check reports itself unavailable rather than failed."""
    import inspect

    from dgpo_trl.kernels import divergence

    if divergence._kernel is None or divergence.INTERPRETER:
        return dict(
            status="skipped", reason="Triton is not installed" if divergence._kernel is None else "TRITON_INTERPRET=1"
        )
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as error:
        return dict(status="unavailable", reason=f"{type(error).__name__}: {error}")
    params = list(inspect.signature(divergence._fused_statistics_kernel).parameters)
    floats = {"logit_scale", "softcap", "inv_temperature"}
    result = dict(status="passed", triton=triton.__version__, variants={})
    for name, dtype, config, precision in (
        ("bf16", "bf16", divergence.DEFAULT_CONFIG, "tf32"),
        ("fp32", "fp32", divergence.FP32_CONFIG, "ieee"),
    ):
        signature, constexprs = (
            {},
            dict(
                HAS_BIAS_P=False,
                HAS_BIAS_Q=False,
                HAS_SOFTCAP=False,
                HAS_LABELS=True,
                UPCAST=dtype == "fp32",
                INPUT_PRECISION=precision,
                BLOCK_N=config.block_n,
                BLOCK_V=config.block_v,
                BLOCK_K=config.block_k,
            ),
        )
        for p in params:
            if p in constexprs:
                signature[p] = "constexpr"
            elif p.endswith("_ptr"):
                signature[p] = {
                    "labels_ptr": "*i64",
                    "partial_ptr": "*fp32",
                    "bp_ptr": "*fp32",
                    "bq_ptr": "*fp32",
                }.get(p, f"*{dtype}")
            else:
                signature[p] = "fp32" if p in floats else "i32"
        try:
            source = ASTSource(
                fn=divergence._kernel,
                signature=signature,
                constexprs={(params.index(k),): v for k, v in constexprs.items()},
            )
        except TypeError as error:  # another release's ASTSource
            return dict(status="unavailable", reason=f"ASTSource: {error}")
        start = time.perf_counter()
        try:
            compiled = triton.compile(
                source,
                target=GPUTarget("cuda", 90, 32),
                options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
            )
        except Exception as error:  # noqa: BLE001 - a kernel that does not build for Hopper is the finding
            return dict(status="failed", variant=name, error=f"{type(error).__name__}: {str(error)[:1500]}")
        result["variants"][name] = dict(
            seconds=time.perf_counter() - start,
            shared_bytes=compiled.metadata.shared,
            cubin_bytes=len(compiled.asm.get("cubin", b"")),
            config=tuple(config),
        )
    return result


def section_divergence(dry: bool, device) -> dict:
    import bench_divergence
    import torch

    from dgpo_trl.kernels import triton_available

    fused = device.type == "cuda" and triton_available()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dry:
        ns, vocab, hiddens = (64, 256), 1000, (32,)
        args = argparse.Namespace(repeats=2, naive_max_gib=1.0)
    else:
        ns, vocab, hiddens = (2048, 8192, 16384), 151936, (896, 3584)
        # the naive pass only where its fp32 logits stay small (it grows 1.2 MB per token at this vocabulary)
        args = argparse.Namespace(repeats=5, naive_max_gib=3.0)
    # One set of inputs per (V, H), at the largest N, sliced for the smaller ones: generating a 151936 x 3584
    # weight on the CPU takes seconds, so it is done once per H rather than once per case
    make_inputs, cache = bench_divergence.make_inputs, {}

    def cached_inputs(n, vocab_, hidden_, dtype_, device_, seed=0):
        key = (vocab_, hidden_, dtype_, str(device_))
        if key not in cache:
            cache.clear()
            cache[key] = make_inputs(max(ns), vocab_, hidden_, dtype_, device_, seed)
        h_p, w_p, h_q, w_q, labels = cache[key]
        return h_p[:n], w_p, h_q[:n], w_q, labels[:n]

    bench_divergence.make_inputs = cached_inputs
    rows, errors = [], {}
    for hidden in hiddens:
        for n in ns:
            try:
                case = bench_divergence.run_case(n, vocab, hidden, args, device, dtype, fused)
            except Exception as error:  # noqa: BLE001 - recorded; the other cases still run
                errors[f"N={n} H={hidden}"] = f"{type(error).__name__}: {error}\n{traceback.format_exc()[-2000:]}"
                _log(errors[f"N={n} H={hidden}"])
                continue
            rows += case
            _log(
                bench_divergence.format_table(
                    case, ["N", "V", "H", "method", "time_ms", "ratio_to_floor", "peak_extra_mib", "tflops", "note"]
                )
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
    summary, targets = [], []
    methods = ["fused", "tiles"] if fused else ["tiles"]
    for method in methods + ["naive"]:
        for hidden in hiddens:
            group = sorted(
                (r for r in rows if r["method"] == method and r["H"] == hidden and "time_ms" in r),
                key=lambda r: r["N"],
            )
            if not group:
                continue
            first, last = group[0], group[-1]
            growth = (
                (last["peak_extra_mib"] - first["peak_extra_mib"]) * 2**20 / (last["N"] - first["N"])
                if last["N"] > first["N"]
                else None
            )
            entry = dict(
                method=method,
                V=vocab,
                H=hidden,
                N_range=f"{first['N']}-{last['N']}",
                ratio_min=min(r["ratio_to_floor"] for r in group),
                ratio_max=max(r["ratio_to_floor"] for r in group),
                mem_first_mib=first["peak_extra_mib"],
                mem_last_mib=last["peak_extra_mib"],
                bytes_per_added_token=growth,
            )
            summary.append(entry)
            if method == methods[0]:
                # The pass's outputs are 5 fp32 per token (20 B); allow 64 B per token for them and the allocator's
                # rounding. A pass that held logits would add 8 V bytes (1.2 MB at V = 151936) per token.
                # (the dry run's tiny shapes measure nothing: its targets are recorded, not judged)
                targets.append(
                    dict(
                        target=f"{method} pass <= 1.15 x two-matmul floor, H={hidden}",
                        measured=entry["ratio_max"],
                        met=None if dry else entry["ratio_max"] <= 1.15,
                    )
                )
                if growth is not None:
                    targets.append(
                        dict(
                            target=f"{method} extra memory independent of N, H={hidden} (<= 64 B/token)",
                            measured=growth,
                            met=None if dry else growth <= 64,
                        )
                    )
    bench_divergence.make_inputs = make_inputs
    cache.clear()
    _log(
        bench_divergence.format_table(
            summary,
            [
                "method",
                "V",
                "H",
                "N_range",
                "ratio_min",
                "ratio_max",
                "mem_first_mib",
                "mem_last_mib",
                "bytes_per_added_token",
            ],
        )
    )
    result = dict(dtype=str(dtype), fused_kernel=fused, rows=rows, summary=summary, targets=targets)
    if not fused:
        result["fused"] = "skipped: the fused kernel needs a CUDA device and Triton"
    if errors:
        result["errors"] = errors
        raise SectionFailed(
            f"{len(errors)} case(s) failed: " + "; ".join(f"{k}: {v.splitlines()[0]}" for k, v in errors.items()),
            result,
        )
    return result


def _train_one_step(path, tokenizer, *, use_liger, dtype, device, out_dir):
    """One DGPOTrainer step (every completion scored); returns the logs of step 1."""
    import torch
    from bench_steps import ControlledReward
    from transformers import PrinterCallback, TrainerCallback

    from dgpo_trl import DGPOConfig, DGPOTrainer
    from dgpo_trl.tasks import reversal_dataset

    captured = {}

    class CaptureLogs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.global_step == 1:
                captured.update(logs)

    half = device.type == "cuda" and dtype == torch.bfloat16
    config = DGPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=16,
        max_steps=1,
        logging_steps=1,
        learning_rate=1e-4,
        bf16=half,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
        use_liger_kernel=use_liger,
        dgpo_skip_zero_advantage=False,  # score every completion, whatever the rewards
        model_init_kwargs={"dtype": dtype},
    )
    reward = ControlledReward(0.0, config.num_generations)  # every group informative
    trainer = DGPOTrainer(
        path, reward, args=config, train_dataset=reversal_dataset(64, seed=3), processing_class=tokenizer
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(CaptureLogs())
    trainer.train()
    policy_dtype = str(next(trainer.model.parameters()).dtype)
    reference = getattr(trainer, "ref_model", None)
    ref_dtype = str(next(reference.parameters()).dtype) if reference is not None else None
    del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    keys = (
        "dgpo/divergence/max",
        "dgpo/divergence/mean",
        "dgpo/reverse_kl/mean",
        "dgpo/weight/max",
        "dgpo/scored_fraction",
        "reward",
        "frac_reward_zero_std",
    )
    return {k: captured.get(k) for k in keys} | {"policy_dtype": policy_dtype, "ref_dtype": ref_dtype}


def _exactness_config(out_dir, device, **overrides):
    import torch

    from dgpo_trl import DGPOConfig

    fields = dict(output_dir=out_dir, per_device_train_batch_size=16, num_generations=4, max_completion_length=8,
                  max_steps=1, logging_steps=1, learning_rate=3e-4, bf16=False, gradient_checkpointing=False,
                  report_to="none", save_strategy="no", seed=0, disable_tqdm=True, use_cpu=device.type == "cpu",
                  model_init_kwargs={"dtype": torch.float32})  # fmt: skip
    fields.update(overrides)
    return DGPOConfig(**fields)


def _first_micro_step_log_ratio(trainer) -> list[float]:
    """max |log pi_theta - old_per_token_logps| on the first micro-step of each generation batch, pi_theta by TRL's
    own method on the model as it is then."""
    import torch
    from trl import GRPOTrainer

    ratios, compute_loss = [], trainer._compute_loss

    def spy(model, inputs):
        if trainer._step % trainer.args.steps_per_generation == 0:
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            with torch.no_grad():
                logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                    trainer, model, ids, mask, inputs["completion_ids"].size(1)
                )
            valid = inputs["completion_mask"].bool()
            ratios.append((logps - inputs["old_per_token_logps"])[valid].abs().max().item())
        return compute_loss(model, inputs)

    trainer._compute_loss = spy
    trainer.train()
    return ratios


def section_exactness(dry: bool, device) -> dict:
    """The bf16 log-probs TRL receives, and dropout-free divergences, on the device (see the module docstring)."""
    import torch
    import transformers
    from bench_steps import ControlledReward
    from peft import LoraConfig, get_peft_model
    from transformers import PreTrainedTokenizerFast

    from dgpo_trl import DGPOTrainer
    from dgpo_trl.tasks import reversal_dataset
    from dgpo_trl.tiny import build_tiny_model

    result, problems = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        sharp = build_tiny_model(Path(tmp) / "sharp", hidden_size=64, num_layers=2, seed=0, initializer_range=0.6)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(sharp)
        regimes = {"fp32": {}}
        if device.type == "cuda":
            regimes = {
                "bf16_weights": {"model_init_kwargs": {"dtype": torch.bfloat16}},
                "bf16_autocast": {"bf16": True},
            }
        for name, overrides in regimes.items():
            args = _exactness_config(f"{tmp}/{name}", device, steps_per_generation=2, max_steps=4, **overrides)
            trainer = DGPOTrainer(sharp, ControlledReward(0.0, 4), args=args, processing_class=tokenizer,
                                  train_dataset=reversal_dataset(64, seed=3))  # fmt: skip
            result[f"log_ratio_{name}"] = ratios = _first_micro_step_log_ratio(trainer)
            if any(r != 0.0 for r in ratios):
                problems.append(f"first-micro-step log ratio {ratios} in {name}, not exactly 0")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        plain = build_tiny_model(Path(tmp) / "plain", hidden_size=64, num_layers=2, seed=0)
        config = transformers.AutoConfig.from_pretrained(plain)
        config.attention_dropout = 0.3
        config.save_pretrained(Path(tmp) / "plain_attention_dropout")
        transformers.AutoModelForCausalLM.from_pretrained(plain).save_pretrained(Path(tmp) / "plain_attention_dropout")
        tokenizer.save_pretrained(Path(tmp) / "plain_attention_dropout")
        lora = get_peft_model(
            transformers.AutoModelForCausalLM.from_pretrained(plain, dtype=dtype),
            LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
        )
        with torch.no_grad():
            for param_name, param in lora.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(0, 0.5)
        kinds = {"attention_dropout": (str(Path(tmp) / "plain_attention_dropout"),
                                       {"disable_dropout": True, "model_init_kwargs": {"dtype": dtype}}),
                 "lora_dropout": (lora, {"model_init_kwargs": None})}  # fmt: skip
        for kind, (model, overrides) in kinds.items():
            args = _exactness_config(f"{tmp}/{kind}", device, bf16=device.type == "cuda", **overrides)
            trainer = DGPOTrainer(model, ControlledReward(0.0, 4), args=args, processing_class=tokenizer,
                                  train_dataset=reversal_dataset(64, seed=3))  # fmt: skip
            trainer.train()
            divergence = [
                row["dgpo/divergence/max"] for row in trainer.state.log_history if "dgpo/divergence/max" in row
            ]
            result[f"divergence_{kind}"] = divergence
            if divergence != [0.0]:
                problems.append(f"step-1 dgpo/divergence/max {divergence} with {kind}, not 0")
    _log(f"  {json.dumps(result)}")
    result["targets"] = [dict(target="first-micro-step log ratio exactly 0; step-1 divergence 0 under dropout",
                              measured=dict(result), met=not problems)]  # fmt: skip
    if problems:
        raise SectionFailed("; ".join(problems), result)
    return result


def section_liger(dry: bool, device) -> dict:
    import torch
    from transformers import PreTrainedTokenizerFast

    from dgpo_trl.tiny import build_tiny_model

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result = dict(dtype=str(dtype))
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp) / "model", hidden_size=64 if dry else 128, num_layers=2, num_heads=4, seed=0)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        runs = [("control", False)]
        if device.type == "cuda":
            runs.append(("liger", True))
        else:
            result["liger"] = "skipped: Liger's Triton kernels need a CUDA GPU"
        for name, use_liger in runs:
            try:
                result[name] = _train_one_step(
                    path, tokenizer, use_liger=use_liger, dtype=dtype, device=device, out_dir=f"{tmp}/{name}"
                )
            except Exception as error:  # noqa: BLE001 - recorded; the other run still goes
                result[name] = dict(error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-3000:])
            _log(f"  {name}: {json.dumps(result[name])[:600]}")
    problems = []
    for name, _ in runs:
        run = result[name]
        if "error" in run:
            problems.append(f"{name} run failed: {run['error']}")
        elif run.get("dgpo/divergence/max") is None:
            problems.append(f"{name}: no dgpo/divergence/max logged at step 1")
        elif run["dgpo/divergence/max"] != 0.0:
            problems.append(f"{name}: dgpo/divergence/max at step 1 is {run['dgpo/divergence/max']:.3g}, not 0")
    result["targets"] = [
        dict(
            target=f"step-1 dgpo/divergence/max == 0 ({name})",
            measured=result[name].get("dgpo/divergence/max"),
            met=result[name].get("dgpo/divergence/max") == 0.0,
        )
        for name, _ in runs
    ]
    if problems:
        raise SectionFailed("; ".join(problems), result)
    return result


def section_steps(dry: bool, device, partial_path: Path) -> dict:
    """`bench_steps.py`'s benchmark, its definitions unchanged (shape, batch, lengths, configurations): one process
    per trainer, rounds interleaved. Its runs file lands in the kit's output folder, so whatever finished comes
    back even if the section runs out of time."""
    import bench_steps

    if dry:
        # Both paths, both TRL heads, a zero-advantage fraction and all three variants, at the smallest shape
        argv = [
            "--shape",
            "micro",
            "--configs",
            "aligned:0.5:completion",
            "offpolicy:0:all",
            "--rounds",
            "1",
            "--batch",
            "4",
            "--generations",
            "4",
            "--max-completion-length",
            "4",
            "--timed-cycles",
            '{"aligned": 2, "offpolicy": 1}',
            "--warmup-cycles",
            '{"aligned": 1, "offpolicy": 1}',
        ]
    else:
        # As many rounds as fit in the time the parent gave this section (a round: bench_steps' five default
        # configurations x 3 trainers)
        limit = float(os.environ.get("DGPO_GPU_CHECK_LIMIT_S", SECTION_LIMITS["steps"]))
        argv = ["--shape", "qwen2.5-0.5b", "--rounds", "3", "--budget-s", f"{limit - 30:.0f}"]
    # The kit's output folder, which the parent passes down: whatever finished is kept there
    out = Path(os.environ.get("DGPO_GPU_CHECK_OUT", partial_path.parent)) / "steps"
    argv += ["--device", device.type, "--out", str(out), "--stem", "steps_gpu_check"]
    args = bench_steps.resolve(bench_steps.build_parser().parse_args(argv))

    def progress(summary):
        partial_path.write_text(json.dumps(dict(argv=argv, **summary), default=str))

    with tempfile.TemporaryDirectory(prefix="dgpo_gpu_check_models_") as cache:
        args.cache = Path(cache)
        summary = bench_steps.run_benchmark(args, progress=progress)
    if dry:  # the dry run's tiny shapes measure nothing: its targets are recorded, not judged
        for target in summary["targets"]:
            target["met"] = target["resolved"] = None
    return dict(argv=argv, **summary)


class SectionFailed(Exception):
    """A section that ran but found a problem: its results are kept next to the failure."""

    def __init__(self, message, result):
        super().__init__(message)
        self.result = result


def run_child(sections: list[str], dry: bool, result_path: Path) -> None:
    """Runs `sections` in this process, writing {section: record} to `result_path` after each."""
    _setup_env()
    if dry:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    if dry:
        torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    records = {}
    for name in sections:
        start = time.perf_counter()
        _log(f"\n=== {name} ({'dry run, ' if dry else ''}{device}) ===")
        partial = result_path.with_suffix(f".{name}.partial.json")
        try:
            fn = globals()[f"section_{name}"]
            result = fn(dry, device, partial) if name == "steps" else fn(dry, device)
            record = dict(status="passed", result=result)
        except SectionFailed as failure:
            record = dict(status="failed", error=str(failure), result=failure.result)
        except Exception as error:  # noqa: BLE001 - the kit records and goes on
            record = dict(
                status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-4000:]
            )
            if partial.exists():
                record["result"] = json.loads(partial.read_text())
        record["seconds"] = time.perf_counter() - start
        _log(
            f"=== {name}: {record['status']} in {record['seconds']:.1f}s"
            + (f": {record['error'][:500]}" if "error" in record else "")
        )
        records[name] = record
        result_path.write_text(json.dumps(records, default=str))
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------------
# The parent: installs the carried wheels, runs the sections' processes, writes the JSON and the log


def install_wheels(wheel_dir: Path, target: Path, log) -> dict:
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        return dict(status="skipped", reason=f"no wheels in {wheel_dir}")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-index",
        "--no-deps",
        "--no-compile",
        "--no-cache-dir",
        "--upgrade",
        "--target",
        str(target),
        *map(str, wheels),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log(proc.stdout + proc.stderr)
    return dict(
        status="passed" if proc.returncode == 0 else "failed",
        wheels=[w.name for w in wheels],
        returncode=proc.returncode,
        seconds=time.perf_counter() - start,
        target=str(target),
        **({"error": (proc.stdout + proc.stderr)[-2000:]} if proc.returncode else {}),
    )


def output_dir(out: Path | None, dry_run: bool) -> Path:
    """`--out`, else the results folder; a dry run's tiny-shape numbers go to the temporary folder instead."""
    if out is not None:
        return out
    return Path(tempfile.gettempdir()) / "dgpo_gpu_check_dry" if dry_run else BENCH / "results" / "gpu_check"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no wheel install (seconds)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where the JSON, the log and steps/ go (default: benchmarks/results/gpu_check; dry run: "
        "$TMPDIR/dgpo_gpu_check_dry)",
    )
    parser.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="wheels to install first (GPU runs)")
    parser.add_argument(
        "--site",
        type=Path,
        default=Path(tempfile.gettempdir()) / "dgpo_gpu_site",
        help="where the wheels are installed (put first on PYTHONPATH)",
    )
    parser.add_argument(
        "--install",
        choices=["auto", "yes", "no"],
        default="auto",
        help="install --wheels first (auto: on GPU runs, not on the dry run)",
    )
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole kit's time limit")
    parser.add_argument("--child", nargs="+", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args.dry_run, args.child_result)
        return

    start = time.perf_counter()
    out = output_dir(args.out, args.dry_run)
    out.mkdir(parents=True, exist_ok=True)
    log_path, json_path = out / "gpu_check.log", out / "gpu_check.json"
    log_file = log_path.open("w")

    def log(text):
        log_file.write(text if text.endswith("\n") else text + "\n")
        log_file.flush()

    def say(text):
        print(text, flush=True)
        log(text)

    report = dict(
        kit="dgpo-trl gpu_check",
        dry_run=args.dry_run,
        argv=sys.argv,
        started=time.strftime("%F %T %Z"),
        host=platform.node(),
        python=sys.executable,
        budget_s=args.budget_s,
        sections={},
    )
    env = dict(os.environ, DGPO_GPU_CHECK_OUT=str(out))
    env.setdefault("PYTHONUNBUFFERED", "1")
    pythonpath = [str(ROOT)]
    if args.install == "yes" or (args.install == "auto" and not args.dry_run):
        report["install"] = install_wheels(args.wheels, args.site, log)
        installed = report["install"]
        say(f"install: {installed['status']} {installed.get('wheels', installed.get('reason'))}")
        if report["install"]["status"] == "passed":
            pythonpath.insert(0, str(args.site))
    env["PYTHONPATH"] = os.pathsep.join(pythonpath + [p for p in [env.get("PYTHONPATH")] if p])

    groups = [[s for s in group if s in args.sections] for group in (GROUPS_DRY if args.dry_run else GROUPS_GPU)]
    for group in filter(None, groups):
        remaining = args.budget_s - (time.perf_counter() - start)
        limit = min(remaining, sum(SECTION_LIMITS[s] for s in group))
        if limit < 20:
            for name in group:
                report["sections"][name] = dict(
                    status="skipped", reason=f"the kit's {args.budget_s:.0f}s budget ran out"
                )
            continue
        with tempfile.TemporaryDirectory() as tmp:
            result_path = Path(tmp) / "result.json"
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                *group,
                "--child-result",
                str(result_path),
            ] + (["--dry-run"] if args.dry_run else [])
            t0 = time.perf_counter()
            try:
                # The section's time limit goes down too: the steps section sizes its rounds to it
                proc = subprocess.run(
                    cmd,
                    env=dict(env, DGPO_GPU_CHECK_LIMIT_S=f"{limit:.0f}"),
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    timeout=limit,
                )
                output, returncode, timed_out = proc.stdout, proc.returncode, False
            except subprocess.TimeoutExpired as expired:
                output = expired.stdout or ""
                output = output if isinstance(output, str) else output.decode(errors="replace")
                returncode, timed_out = None, True
            log(output)
            records = json.loads(result_path.read_text()) if result_path.exists() else {}
            for name in group:
                if name in records:
                    report["sections"][name] = records[name]
                    continue
                record = dict(
                    status="failed",
                    seconds=time.perf_counter() - t0,
                    output_tail=output[-3000:],
                    error=f"timed out after {limit:.0f}s"
                    if timed_out
                    else f"the section's process exited with {returncode} before recording it",
                )
                partial = result_path.with_suffix(f".{name}.partial.json")
                if partial.exists():
                    record["result"] = json.loads(partial.read_text())
                report["sections"][name] = record
        json_path.write_text(json.dumps(report, indent=1, default=str))  # after every group: a kill keeps the rest
        for name in group:
            record = report["sections"][name]
            say(
                f"{name}: {record['status']} ({record.get('seconds', 0):.0f}s)"
                + (f" - {record.get('error', record.get('reason', ''))[:300]}" if record["status"] != "passed" else "")
            )

    report["seconds"] = time.perf_counter() - start
    report["summary"] = summarize(report)
    json_path.write_text(json.dumps(report, indent=1, default=str))
    say("\n" + "\n".join(report["summary"]["lines"]))
    say(f"\nwrote {json_path} and {log_path} ({report['seconds']:.0f}s)")
    log_file.close()
    sys.exit(1 if any(r["status"] == "failed" for r in report["sections"].values()) else 0)


def summarize(report: dict) -> dict:
    """The headline numbers of each section, as lines (printed last, so that the output's tail holds them)."""
    lines, targets = [], []
    sections = report["sections"]
    for name, record in sections.items():
        lines.append(
            f"[{record['status']}] {name} ({record.get('seconds', 0):.0f}s)"
            + (f": {record.get('error', record.get('reason', ''))[:200]}" if record["status"] != "passed" else "")
        )
        result = record.get("result") or {}
        targets += result.get("targets", [])
        if name == "environment" and result:
            lines.append(
                f"    {result.get('gpu', 'no GPU')}; "
                + ", ".join(f"{k} {v}" for k, v in result.get("versions", {}).items() if v)
            )
        if name == "parity" and result:
            lines.append(f"    pytest: {result.get('counts')}")
            for row in result.get("numerics", []):
                lines.append(f"    {row['method']} {row['dtype']}: max abs error {row['max_abs_err']:.1e}")
            for row in result.get("kernel_guard", []):
                lines.append(f"    kernel guard {row['dtype']}: {_guard_line(row)}")
        if name == "divergence":
            for row in result.get("summary", []):
                lines.append(
                    f"    {row['method']} H={row['H']}: {row['ratio_min']:.3f}-{row['ratio_max']:.3f} x floor"
                    f", extra memory {row['mem_first_mib']:.1f} -> {row['mem_last_mib']:.1f} MiB "
                    f"(N {row['N_range']})"
                )
        if name == "exactness":
            for key, value in result.items():
                if key != "targets":
                    lines.append(f"    {key}: {value}")
        if name == "liger":
            for run in ("control", "liger"):
                if isinstance(result.get(run), dict):
                    value = result[run].get("dgpo/divergence/max", result[run].get("error"))
                    lines.append(f"    {run}: dgpo/divergence/max at step 1 = {value}")
        if name == "steps":
            for row in result.get("rows", []):
                lines.append(
                    f"    {row['config']:22s} {row['variant']:13s} cycle {row['cycle_ms']:.0f} ms "
                    f"(generation {row['generate_ms'] or 0:.0f}), peak {row['peak_mib']:.0f} MiB, "
                    f"{row['rounds']} round(s), zero-advantage groups {row['frac_reward_zero_std']}"
                )
            for ratio in result.get("ratios", []):
                if ratio["ratio"].startswith("dgpo /"):
                    cycle, peak = ratio["cycle"], ratio.get("peak") or {}
                    lines.append(
                        f"    {ratio['config']:22s} {ratio['ratio']}: cycle {cycle['mean']:.3f} "
                        f"(+- {cycle['ci95']:.3f}, {cycle['n']} rounds), peak memory "
                        f"{peak.get('mean', float('nan')):.3f}"
                    )
    for target in targets:
        verdict = {True: "met", False: "MISSED", None: "not judged (dry run)"}[target["met"]]
        if target.get("resolved") is False:  # the step benchmark's: its 95% interval includes the limit
            verdict += " on the mean, not resolved"
        lines.append(f"target {verdict}: {target['target']} (measured {target['measured']})")
    return dict(lines=lines, targets=targets)


if __name__ == "__main__":
    main()
