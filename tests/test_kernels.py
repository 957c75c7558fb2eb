"""Parity of the fused Triton divergence kernel (`dgpo_trl.kernels`) with the float64 reference and the torch tiles.

Where each part runs:
- CUDA tests: only on a CUDA device with Triton installed; skipped otherwise (never faked).
- Interpreter test: when Triton is importable, the same parity cases run on CPU tensors under Triton's interpreter in
  a subprocess (TRITON_INTERPRET=1 must be set before Triton is imported, so it cannot share this process).
- Kernel-guard tests: the guard around the kernel in `token_statistics`' default dispatch, with the kernel under
  Triton's interpreter in one subprocess (the default dispatch made to pick the kernel on CPU tensors there).
- The split-merge and dispatch tests need neither.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import pytest
import torch

from dgpo_trl import functional
from dgpo_trl.functional import TokenStatistics, _use_fused_kernel, token_statistics, token_statistics_reference
from dgpo_trl.kernels import divergence

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

requires_cuda_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA device and Triton"
)


def _inputs(
    n, vocab, h_p, h_q, *, dtype=torch.float32, weight_dtype=None, device="cpu", bias=False, spread=1.0, seed=0
):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, dtype=dtype):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    # Weights scaled so that logits have std ~ spread: realistic (not flat, not one-hot) distributions
    args = dict(
        policy_hidden=randn(n, h_p),
        policy_weight=randn(vocab, h_p, scale=spread / math.sqrt(h_p), dtype=weight_dtype or dtype),
        ref_hidden=randn(n, h_q),
        ref_weight=randn(vocab, h_q, scale=spread / math.sqrt(h_q), dtype=weight_dtype or dtype),
        labels=torch.randint(0, vocab, (n,), generator=g).to(device),
    )
    if bias:
        args["policy_bias"] = randn(vocab, scale=0.5)
        args["ref_bias"] = randn(vocab, scale=0.5)
    return args


# (name, input kwargs, statistics kwargs, kernel kwargs). Shapes are deliberately not multiples of any block size
PARITY_CASES = [
    ("plain", dict(n=37, vocab=301, h_p=40, h_q=24), {}, {}),
    (
        "transform_and_bias",
        dict(n=21, vocab=203, h_p=32, h_q=32, bias=True, spread=3.0),
        dict(temperature=0.7, logit_scale=1.3, final_logit_softcapping=5.0),
        {},
    ),
    ("bf16_inputs", dict(n=19, vocab=150, h_p=48, h_q=48, dtype=torch.bfloat16), {}, {}),
    # bf16 hidden states with fp32 LM heads (cast_lm_head_to_fp32, or fp32 master weights): upcast in the kernel
    ("mixed_dtypes", dict(n=19, vocab=150, h_p=48, h_q=48, dtype=torch.bfloat16, weight_dtype=torch.float32), {}, {}),
    # Confident rows (logit std 30): entropy near 0 and large maxima test the shifted sums and the rescaling
    ("confident", dict(n=17, vocab=257, h_p=32, h_q=32, spread=30.0), {}, {}),
    # Several token chunks and a single vocabulary split, then one split per vocabulary block
    ("token_chunks_one_split", dict(n=45, vocab=130, h_p=16, h_q=16), {}, dict(token_chunk_size=16, num_splits=1)),
    ("one_split_per_block", dict(n=9, vocab=130, h_p=16, h_q=16), {}, dict(num_splits=1000)),
]


def check_parity(device: str) -> list[str]:
    """Runs every case through the fused kernel and asserts it matches the float64 reference; returns a summary."""
    summary = []
    for name, input_kwargs, stat_kwargs, kernel_kwargs in PARITY_CASES:
        args = _inputs(device=device, **input_kwargs)
        got = divergence.fused_token_statistics(**args, **stat_kwargs, **kernel_kwargs)
        want = token_statistics_reference(**args, **stat_kwargs)
        worst = {}
        for field, g, w in zip(TokenStatistics._fields, got, want):
            assert g.shape == w.shape and g.dtype == torch.float32, (name, field, g.shape, g.dtype)
            assert torch.isfinite(g).all(), (name, field)
            # fp32 accumulation over <= 64 hidden units and <= 301 classes: errors of a few ulps of the logits
            torch.testing.assert_close(g.cpu(), w.cpu(), atol=2e-5, rtol=1e-5, msg=f"{name}: {field}")
            worst[field] = (g.cpu() - w.cpu()).abs().max().item()
        summary.append(f"{name}: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    # No tokens: zeros, no launch
    empty = _inputs(n=0, vocab=50, h_p=16, h_q=16, device=device)
    for field in divergence.fused_token_statistics(**empty):
        assert field.shape == (0,)
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# Without Triton


def test_combine_partials_matches_full_vocabulary():
    """The split merge (the kernel's only torch-side math) on partials computed per vocabulary split in torch."""
    torch.manual_seed(0)
    n, vocab, splits = 11, 97, 4
    z_p, z_q = torch.randn(n, vocab) * 4, torch.randn(n, vocab) * 4
    labels = torch.randint(0, vocab, (n,))
    fields = {k: [] for k in divergence._PARTIAL_FIELDS}
    for cols in torch.arange(vocab).tensor_split(splits):
        p, q = z_p[:, cols], z_q[:, cols]
        m = 0.5 * (p + q)
        max_p = p.amax(-1)
        e_p = torch.exp(p - max_p[:, None])
        fields["max_p"].append(max_p)
        fields["sum_p"].append(e_p.sum(-1))
        fields["shifted_p"].append((e_p * (p - max_p[:, None])).sum(-1))
        fields["gap_p"].append((e_p * (p - q)).sum(-1))
        for key, z in (("q", q), ("m", m)):
            top = z.amax(-1)
            fields[f"max_{key}"].append(top)
            fields[f"sum_{key}"].append(torch.exp(z - top[:, None]).sum(-1))
        hit = cols[None, :] == labels[:, None]
        fields["label_p"].append(torch.where(hit, p, 0.0).sum(-1))
        fields["label_q"].append(torch.where(hit, q, 0.0).sum(-1))
    partial = torch.stack([torch.stack(fields[k]) for k in divergence._PARTIAL_FIELDS])
    merged = divergence._combine_partials(partial)

    log_p, log_q = z_p.double().log_softmax(-1), z_q.double().log_softmax(-1)
    p = log_p.exp()
    torch.testing.assert_close(merged["lse_p"].double(), z_p.double().logsumexp(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(merged["lse_q"].double(), z_q.double().logsumexp(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(merged["lse_m"].double(), (0.5 * (z_p + z_q)).double().logsumexp(-1), atol=1e-5, rtol=0)
    entropy = torch.log(merged["sum_p"]) - merged["shifted_p"] / merged["sum_p"]
    torch.testing.assert_close(entropy.double(), -(p * log_p).sum(-1), atol=1e-5, rtol=0)
    kl = merged["gap_p"] / merged["sum_p"] - merged["lse_p"] + merged["lse_q"]
    torch.testing.assert_close(kl.double(), (p * (log_p - log_q)).sum(-1), atol=2e-5, rtol=0)
    torch.testing.assert_close(merged["label_p"], z_p.gather(-1, labels[:, None]).squeeze(-1))
    torch.testing.assert_close(merged["label_q"], z_q.gather(-1, labels[:, None]).squeeze(-1))


def test_cpu_tensors_keep_the_torch_tiles():
    x = torch.zeros(2, 4)
    assert not _use_fused_kernel(x, None)
    assert not _use_fused_kernel(x, False)
    if not divergence.INTERPRETER:
        with pytest.raises(ValueError, match="use_triton=True"):
            token_statistics(x, torch.zeros(5, 4), x, torch.zeros(5, 4), use_triton=True)


# ---------------------------------------------------------------------------------------------------------------------
# Triton's interpreter on CPU


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_fused_kernel_parity_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--interpreter"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parity ok" in result.stdout, result.stdout


# ---------------------------------------------------------------------------------------------------------------------
# The kernel guard (default dispatch), under Triton's interpreter in a subprocess: the cases below run there, each
# with a fresh guard state, and report "ok" or their traceback; one test per case reads its report.

GUARD_INPUTS = dict(n=37, vocab=150, h_p=24, h_q=16, bias=True, spread=3.0)
GUARD_TILING = dict(token_chunk_size=16)  # the check covers the first 16 of 37 tokens


class _Calls:
    """Wraps `owner.name`, recording the number of rows (the first argument's length) of each call."""

    def __init__(self, monkeypatch, owner, name, transform=None):
        self.rows, self.original, self.transform = [], getattr(owner, name), transform
        monkeypatch.setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["policy_hidden"]
        self.rows.append(hidden.shape[0])
        out = self.original(*args, **kwargs)
        return out if self.transform is None else self.transform(out)


class _FailingLaunch:
    """Stands in for the compiled kernel: every launch raises what Triton raises when a kernel needs more shared
    memory than the GPU has."""

    def __init__(self):
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.runtime.errors import OutOfResources

            self.launches += 1
            raise OutOfResources(232448, 101376, "shared memory")

        return launch


def _guard_warnings(caught) -> list[str]:
    # The interpreter's numpy emits RuntimeWarnings of its own (inf - inf on padded columns): only the guard's count
    return [str(w.message) for w in caught if "fused Triton kernel" in str(w.message)]


def _assert_same(got: TokenStatistics, want: TokenStatistics):
    for field, g, w in zip(TokenStatistics._fields, got, want):
        assert torch.equal(g, w), field


def _guard_case_launch_raises(monkeypatch):
    args = _inputs(**GUARD_INPUTS)
    failing = _FailingLaunch()
    monkeypatch.setattr(divergence, "_kernel", failing)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = token_statistics(**args, **GUARD_TILING)
        messages = _guard_warnings(caught)
        assert len(messages) == 1 and "OutOfResources" in messages[0] and "shared memory" in messages[0], messages
        assert failing.launches == 1 and functional.last_divergence_path() == "tiles"
        _assert_same(got, token_statistics(**args, **GUARD_TILING, use_triton=False))
        check = functional._KERNEL_CHECKS[
            functional._kernel_key(dict(args, temperature=1.0, logit_scale=1.0, final_logit_softcapping=None))
        ]
        assert not check.passed and check.error.startswith("OutOfResources"), check
        # Later calls with the same key (any number of tokens) run the tiles without launching or warning again
        fewer = {k: v[:23] if k in ("policy_hidden", "ref_hidden", "labels") else v for k, v in args.items()}
        got = token_statistics(**fewer, **GUARD_TILING)
        assert failing.launches == 1 and len(_guard_warnings(caught)) == 1
        assert functional.last_divergence_path() == "tiles"
        _assert_same(got, token_statistics(**fewer, **GUARD_TILING, use_triton=False))
        # An explicit use_triton=True is not guarded: the kernel's error reaches the caller
        from triton.runtime.errors import OutOfResources

        with pytest.raises(OutOfResources):
            token_statistics(**args, use_triton=True)


def _perturbed(delta):
    def perturb(out):  # one token of the first chunk: its Hellinger distance off by delta
        hellinger = out[2].clone()
        hellinger[3] += delta
        return (*out[:2], hellinger, *out[3:])

    return perturb


def _guard_case_disagrees(monkeypatch):
    tolerance = functional._KERNEL_TOLERANCE
    # Within the tolerance (|value| <= 1 there, so the limit is between 1x and 2x the tolerance): the kernel's result
    kernel = _Calls(monkeypatch, divergence, "fused_token_statistics", transform=_perturbed(0.5 * tolerance))
    args = _inputs(**GUARD_INPUTS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = token_statistics(**args, **GUARD_TILING)
        assert not _guard_warnings(caught) and functional.last_divergence_path() == "fused"
        assert got.hellinger[3] == token_statistics(**args, use_triton=True).hellinger[3]  # perturbed, kept
    # Beyond it, for another key (another vocabulary): one warning with the field and the largest difference
    kernel.transform = _perturbed(3 * tolerance)
    args = _inputs(**dict(GUARD_INPUTS, vocab=151))
    tiles = token_statistics(**args, **GUARD_TILING, use_triton=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = token_statistics(**args, **GUARD_TILING)
        messages = _guard_warnings(caught)
        assert len(messages) == 1 and "hellinger differs by up to" in messages[0], messages
        reported = float(re.search(r"differs by up to ([0-9.e+-]+)", messages[0]).group(1))
        assert reported == pytest.approx(3 * tolerance, rel=1e-2), messages  # the perturbation, plus rounding
        assert functional.last_divergence_path() == "tiles"
        _assert_same(got, tiles)
        calls = len(kernel.rows)
        got = token_statistics(**args, **GUARD_TILING)
        assert len(kernel.rows) == calls and len(_guard_warnings(caught)) == 1  # tiles from then on, no re-check
        assert functional.last_divergence_path() == "tiles"
        _assert_same(got, tiles)


def _guard_case_agrees(monkeypatch):
    kernel = _Calls(monkeypatch, divergence, "fused_token_statistics")
    tiles = _Calls(monkeypatch, functional, "_tiled_token_statistics")
    args = _inputs(**GUARD_INPUTS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = token_statistics(**args, **GUARD_TILING)
        assert functional.last_divergence_path() == "fused"
        assert kernel.rows == [37] and tiles.rows == [16]  # the kernel on every token, the tiles on the first chunk
        _assert_same(got, token_statistics(**args, use_triton=True))
        want = token_statistics(**args, **GUARD_TILING, use_triton=False)
        for field, g, w in zip(TokenStatistics._fields, got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=field)
        kernel.rows.clear()
        tiles.rows.clear()
        # Checked once per key: the same key with other tokens runs the kernel alone
        fewer = {k: v[:23] if k in ("policy_hidden", "ref_hidden", "labels") else v for k, v in args.items()}
        token_statistics(**fewer, **GUARD_TILING)
        assert kernel.rows == [23] and tiles.rows == []
        assert functional.last_divergence_path() == "fused"
        # Another key (bf16 inputs) is checked again
        half = {k: v.bfloat16() if v.is_floating_point() else v for k, v in args.items()}
        token_statistics(**half, **GUARD_TILING)
        assert kernel.rows == [23, 37] and tiles.rows == [16]
        assert functional.last_divergence_path() == "fused"
        assert not _guard_warnings(caught)
    checks = list(functional._KERNEL_CHECKS.values())
    assert len(checks) == 2 and all(c.passed and c.difference <= c.tolerance for c in checks), checks


def _guard_case_disabled(monkeypatch):
    monkeypatch.setenv("DGPO_TRITON", "0")
    kernel = _Calls(monkeypatch, divergence, "fused_token_statistics")
    tiles = _Calls(monkeypatch, functional, "_tiled_token_statistics")
    args = _inputs(**GUARD_INPUTS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = token_statistics(**args, **GUARD_TILING)
        assert kernel.rows == [] and tiles.rows == [37] and functional._KERNEL_CHECKS == {}
        assert functional.last_divergence_path() == "tiles" and not _guard_warnings(caught)
    _assert_same(got, token_statistics(**args, **GUARD_TILING, use_triton=False))


GUARD_CASES = {
    "launch_raises": _guard_case_launch_raises,
    "disagrees": _guard_case_disagrees,
    "agrees": _guard_case_agrees,
    "disabled": _guard_case_disabled,
}


def run_guard_cases() -> dict:
    """Runs every guard case with a fresh guard state and the default dispatch picking the kernel on CPU tensors."""
    report = {"path_before_any_call": functional.last_divergence_path(), "cases": {}}
    for name, case in GUARD_CASES.items():
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(functional, "_KERNEL_DEVICES", ("cuda", "cpu"))
            monkeypatch.setattr(functional, "_KERNEL_CHECKS", {})
            monkeypatch.delenv("DGPO_TRITON", raising=False)
            try:
                case(monkeypatch)
                report["cases"][name] = "ok"
            except Exception:  # noqa: BLE001 - reported to the test that reads this case
                report["cases"][name] = traceback.format_exc()
    return report


@pytest.fixture(scope="module")
def kernel_guard_report():
    if not HAS_TRITON:
        pytest.skip("Triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("DGPO_TRITON", None)
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--kernel-guard"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_kernel_guard_falls_back_once_when_the_launch_raises(kernel_guard_report):
    """A launch that raises: one warning naming the error, the tiles' result, the tiles from then on without another
    launch or warning; `use_triton=True` still lets the error through."""
    assert kernel_guard_report["cases"]["launch_raises"] == "ok", kernel_guard_report["cases"]["launch_raises"]


def test_kernel_guard_falls_back_once_when_the_kernel_disagrees(kernel_guard_report):
    """A result perturbed by half the tolerance is kept; by 3x, one warning naming the field and the difference, the
    tiles' result, the tiles from then on."""
    assert kernel_guard_report["cases"]["disagrees"] == "ok", kernel_guard_report["cases"]["disagrees"]


def test_kernel_guard_checks_an_agreeing_kernel_once_per_key(kernel_guard_report):
    """An agreeing kernel: no warning, the tiles run on the first chunk once per key, `last_divergence_path()` is
    "fused" (and None in a process that has not run the pass yet)."""
    assert kernel_guard_report["path_before_any_call"] is None
    assert kernel_guard_report["cases"]["agrees"] == "ok", kernel_guard_report["cases"]["agrees"]


def test_kernel_guard_is_skipped_with_dgpo_triton_0(kernel_guard_report):
    """DGPO_TRITON=0: the tiles, no kernel launch and no check."""
    assert kernel_guard_report["cases"]["disabled"] == "ok", kernel_guard_report["cases"]["disabled"]


# ---------------------------------------------------------------------------------------------------------------------
# CUDA


@requires_cuda_triton
def test_fused_kernel_parity_cuda():
    check_parity("cuda")


@requires_cuda_triton
def test_token_statistics_dispatches_to_kernel_on_cuda(monkeypatch):
    args = _inputs(n=300, vocab=5003, h_p=128, h_q=96, device="cuda", bias=True, spread=4.0)
    kwargs = dict(temperature=0.9, final_logit_softcapping=30.0)
    assert _use_fused_kernel(args["policy_hidden"], None)
    monkeypatch.setenv("DGPO_TRITON", "0")
    assert not _use_fused_kernel(args["policy_hidden"], None)
    monkeypatch.delenv("DGPO_TRITON")
    fused = token_statistics(**args, **kwargs)
    tiles = token_statistics(**args, **kwargs, use_triton=False)
    want = token_statistics_reference(**args, **kwargs)
    for field, f, t, w in zip(TokenStatistics._fields, fused, tiles, want):
        torch.testing.assert_close(f, w, atol=5e-5, rtol=1e-5, msg=f"fused {field}")
        torch.testing.assert_close(f, t, atol=5e-5, rtol=1e-5, msg=f"fused vs tiles {field}")


@requires_cuda_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_kernel_half_precision_llm_sizes_cuda(dtype):
    # LM-like shapes with the GPU tile configuration: a vocabulary that is not a multiple of 128, several token chunks
    args = _inputs(n=1500, vocab=32003, h_p=896, h_q=896, device="cuda", dtype=dtype, spread=6.0)
    fused = divergence.fused_token_statistics(**args, temperature=0.8, token_chunk_size=512)
    want = token_statistics_reference(**args, temperature=0.8)
    for field, f, w in zip(TokenStatistics._fields, fused, want):
        # Both accumulate the same half-precision products in fp32, in different orders
        torch.testing.assert_close(f, w, atol=3e-4, rtol=1e-4, msg=field)


def test_the_kernel_package_is_a_leaf():
    # dgpo_trl.functional imports the kernels; the kernels import nothing of dgpo_trl, so no import cycle can form
    import ast

    package = Path(divergence.__file__).parent
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1 and not (node.module or "").startswith("dgpo_trl"), (source.name, node.module)
            elif isinstance(node, ast.Import):
                assert not any(alias.name.startswith("dgpo_trl") for alias in node.names), source.name
    assert divergence.FIELDS == TokenStatistics._fields  # the tuple the kernel returns is TokenStatistics' order


if __name__ == "__main__":
    if "--interpreter" in sys.argv:
        assert divergence.INTERPRETER, "run with TRITON_INTERPRET=1"
        for line in check_parity("cpu"):
            print(line)
        print("parity ok")
    if "--kernel-guard" in sys.argv:
        assert divergence.INTERPRETER, "run with TRITON_INTERPRET=1"
        print(json.dumps(run_guard_cases()))
