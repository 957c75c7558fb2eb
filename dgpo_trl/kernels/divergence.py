"""The divergence pass as one fused Triton kernel: LM-head projections, logit transform and online folds together.

`dgpo_trl.functional.token_statistics` computes DGPO's per-token statistics in (tokens x vocabulary) tiles: for each
tile it runs two matmuls (policy and reference LM heads), writes two fp32 logit tiles to memory, and folds them into
running log-sum-exps with a handful of elementwise kernels. On a GPU the fold's memory traffic is the problem: the
two fp32 tiles are written and re-read several times (8 bytes per logit per pass), which at hidden size 896 costs
about as much as the matmuls themselves. This kernel keeps each (BLOCK_N x BLOCK_V) block of both models' logits in
registers: it computes them with `tl.dot` (fp32 accumulation), applies TRL's logit transform, and folds them into
per-row running statistics before moving to the next vocabulary block. No logit is ever written to memory; the only
extra memory is a small buffer of partial statistics, bounded independently of the number of tokens.

Work split. The grid is (row blocks of one token chunk) x (vocabulary splits); each program sweeps its rows over its
split's vocabulary blocks and writes 10 partial statistics per row, which `_combine_partials` merges in torch (a few
(splits x rows) ops). Row blocks vary fastest in launch order, so programs running at the same time share both the
hidden-state panels (same rows, other splits) and the weight panels (same split, other rows) through L2, as the
grouped ordering of a GEMM does.

Per row, over the vocabulary (z_p, z_q: transformed policy/reference logits; z_m = (z_p + z_q) / 2):
    m_x, s_x = running max and sum exp(z_x - m_x)                 for x in {p, q, m}: log-sum-exps
    e_p      = sum exp(z_p - m_p) * (z_p - m_p)                   entropy, kept shifted (no cancellation)
    g_p      = sum exp(z_p - m_p) * (z_p - z_q)                   E_p[z_p - z_q], the reverse KL
    l_p, l_q = the label's logits
from which:
    hellinger = -expm1(LSE_m - (LSE_p + LSE_q) / 2),  reverse_kl = g_p / s_p - LSE_p + LSE_q,
    entropy = log s_p - e_p / s_p,  logps = l - LSE.
(The torch path computes the same quantities but shifts the geometric mean by (m_p + m_q) / 2, reusing the two
exponentials, because on CPU each elementwise pass over a tile costs; here the exponentials are register work.)

On CPU tensors the same kernel runs under Triton's interpreter (slow; for tests only).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

try:  # Triton ships with CUDA builds of torch on Linux; CPU-only installs have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised by the CPU CI, where Triton is absent
    triton = None
    tl = None


# Tokens per launch. The partial-statistics buffer is 10 floats x splits x rows of one launch, and splits x row
# blocks is about 8 x the GPU's SM count (see `_num_splits`): under ~3 MiB on an H100 whatever the number of tokens.
TOKEN_CHUNK_SIZE = 4096

# Partial statistics per row and split, in the order the kernel stores them
_PARTIAL_FIELDS = ("max_p", "sum_p", "shifted_p", "gap_p", "max_q", "sum_q", "max_m", "sum_m", "label_p", "label_q")


def triton_available() -> bool:
    """Whether Triton can be imported (it still needs CUDA tensors, or TRITON_INTERPRET=1, to run)."""
    return triton is not None


class KernelConfig(NamedTuple):
    """Tile shape and launch parameters of the fused kernel."""

    block_n: int  # rows (tokens) per program
    block_v: int  # vocabulary entries per block of logits
    block_k: int  # hidden dimension per `tl.dot` step
    num_warps: int
    num_stages: int


# Two (BLOCK_N x BLOCK_V) fp32 accumulators, and the fold's temporaries of the same shape, live in registers at once
# (the fold needs z_p and z_q together), so the tile is half a plain GEMM's 128 x 128. Not tuned on hardware yet:
# `benchmarks/bench_divergence.py --sweep-configs` times the alternatives on a GPU.
DEFAULT_CONFIG = KernelConfig(block_n=64, block_v=128, block_k=64, num_warps=8, num_stages=3)
FP32_CONFIG = KernelConfig(block_n=64, block_v=64, block_k=32, num_warps=4, num_stages=2)
# Under the interpreter every program is a numpy loop: small blocks keep the tests fast while still covering partial
# row and vocabulary blocks, several K steps and several splits
INTERPRETER_CONFIG = KernelConfig(block_n=16, block_v=32, block_k=16, num_warps=1, num_stages=1)


def _fused_statistics_kernel(
    hp_ptr,
    hq_ptr,
    wp_ptr,
    wq_ptr,
    bp_ptr,
    bq_ptr,
    labels_ptr,
    partial_ptr,
    n_rows,
    vocab,
    hidden_p,
    hidden_q,
    stride_hp,
    stride_hq,
    stride_wp,
    stride_wq,
    field_stride,
    blocks_per_split,
    logit_scale,
    softcap,
    inv_temperature,
    HAS_BIAS_P: tl.constexpr,
    HAS_BIAS_Q: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Everything is inlined (no nested @triton.jit helpers) so that the interpreter can run the same function
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    # Python floats may arrive as fp64; keep the math in fp32 like the torch path
    logit_scale = tl.cast(logit_scale, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    inv_temperature = tl.cast(inv_temperature, tl.float32)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    if HAS_LABELS:
        labels = tl.load(labels_ptr + rows64, mask=row_ok, other=-1)

    neg_inf = float("-inf")
    max_p = tl.full((BLOCK_N,), neg_inf, tl.float32)
    sum_p = tl.zeros((BLOCK_N,), tl.float32)
    shifted_p = tl.zeros((BLOCK_N,), tl.float32)
    gap_p = tl.zeros((BLOCK_N,), tl.float32)
    max_q = tl.full((BLOCK_N,), neg_inf, tl.float32)
    sum_q = tl.zeros((BLOCK_N,), tl.float32)
    max_m = tl.full((BLOCK_N,), neg_inf, tl.float32)
    sum_m = tl.zeros((BLOCK_N,), tl.float32)
    label_p = tl.zeros((BLOCK_N,), tl.float32)
    label_q = tl.zeros((BLOCK_N,), tl.float32)

    n_vblocks = tl.cdiv(vocab, BLOCK_V)
    first_block = pid_s * blocks_per_split
    last_block = tl.minimum(first_block + blocks_per_split, n_vblocks)
    for vb in range(first_block, last_block):
        cols = vb * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab
        cols64 = cols.to(tl.int64)

        # Policy logits of this block: hidden (BLOCK_N x K) @ weight^T (K x BLOCK_V), fp32 accumulation
        acc_p = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for k0 in range(0, hidden_p, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < hidden_p
            a_mask = row_ok[:, None] & k_ok[None, :]
            b_mask = col_ok[None, :] & k_ok[:, None]
            a = tl.load(hp_ptr + rows64[:, None] * stride_hp + ks[None, :], mask=a_mask, other=0.0)
            b = tl.load(wp_ptr + cols64[None, :] * stride_wp + ks[:, None], mask=b_mask, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc_p = tl.dot(a, b, acc_p, input_precision=INPUT_PRECISION)
        # Reference logits of the same block
        acc_q = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        for k0 in range(0, hidden_q, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < hidden_q
            a_mask = row_ok[:, None] & k_ok[None, :]
            b_mask = col_ok[None, :] & k_ok[:, None]
            a = tl.load(hq_ptr + rows64[:, None] * stride_hq + ks[None, :], mask=a_mask, other=0.0)
            b = tl.load(wq_ptr + cols64[None, :] * stride_wq + ks[:, None], mask=b_mask, other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc_q = tl.dot(a, b, acc_q, input_precision=INPUT_PRECISION)

        # TRL's fused-head transform: z = softcap * tanh(scale * (x + bias) / softcap) / temperature
        if HAS_BIAS_P:
            acc_p += tl.load(bp_ptr + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS_Q:
            acc_q += tl.load(bq_ptr + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_p = acc_p * logit_scale
        acc_q = acc_q * logit_scale
        if HAS_SOFTCAP:
            # tanh(x) = 2 sigmoid(2x) - 1 (tl has no tanh)
            acc_p = softcap * (2.0 * tl.sigmoid(2.0 * acc_p / softcap) - 1.0)
            acc_q = softcap * (2.0 * tl.sigmoid(2.0 * acc_q / softcap) - 1.0)
        z_p = tl.where(col_ok[None, :], acc_p * inv_temperature, neg_inf)
        z_q = tl.where(col_ok[None, :], acc_q * inv_temperature, neg_inf)
        z_m = 0.5 * (z_p + z_q)

        if HAS_LABELS:
            hit = cols[None, :] == labels[:, None]
            label_p += tl.sum(tl.where(hit, z_p, 0.0), axis=1)
            label_q += tl.sum(tl.where(hit, z_q, 0.0), axis=1)

        # Online folds. Every block holds at least one valid column, so the new maxima are finite; on the first block
        # the old max is -inf and its sums are 0, so the rescale is exp(-inf) = 0 and the shift term is skipped.
        new_max_p = tl.maximum(max_p, tl.max(z_p, axis=1))
        rescale_p = tl.exp(max_p - new_max_p)
        moved_p = tl.where(max_p > neg_inf, max_p - new_max_p, 0.0)
        shifted_z_p = z_p - new_max_p[:, None]
        e_p = tl.exp(shifted_z_p)  # exactly 0 on padded columns
        # Padded columns hold 0 * (-inf) and -inf - (-inf): masked out before summing
        shifted_terms = tl.where(col_ok[None, :], e_p * shifted_z_p, 0.0)
        gap_terms = tl.where(col_ok[None, :], e_p * (z_p - z_q), 0.0)
        shifted_p = rescale_p * (shifted_p + moved_p * sum_p) + tl.sum(shifted_terms, axis=1)
        gap_p = rescale_p * gap_p + tl.sum(gap_terms, axis=1)
        sum_p = rescale_p * sum_p + tl.sum(e_p, axis=1)
        max_p = new_max_p

        new_max_q = tl.maximum(max_q, tl.max(z_q, axis=1))
        sum_q = tl.exp(max_q - new_max_q) * sum_q + tl.sum(tl.exp(z_q - new_max_q[:, None]), axis=1)
        max_q = new_max_q

        new_max_m = tl.maximum(max_m, tl.max(z_m, axis=1))
        sum_m = tl.exp(max_m - new_max_m) * sum_m + tl.sum(tl.exp(z_m - new_max_m[:, None]), axis=1)
        max_m = new_max_m

    # partial[field, split, row]: rows contiguous, so the stores coalesce
    # field_stride = splits * n_rows, passed in (an int argument equal to 1 is specialised to a constant)
    out = partial_ptr + pid_s.to(tl.int64) * n_rows + rows64
    field = field_stride
    tl.store(out + 0 * field, max_p, mask=row_ok)
    tl.store(out + 1 * field, sum_p, mask=row_ok)
    tl.store(out + 2 * field, shifted_p, mask=row_ok)
    tl.store(out + 3 * field, gap_p, mask=row_ok)
    tl.store(out + 4 * field, max_q, mask=row_ok)
    tl.store(out + 5 * field, sum_q, mask=row_ok)
    tl.store(out + 6 * field, max_m, mask=row_ok)
    tl.store(out + 7 * field, sum_m, mask=row_ok)
    tl.store(out + 8 * field, label_p, mask=row_ok)
    tl.store(out + 9 * field, label_q, mask=row_ok)


# `triton.jit` returns an interpreted kernel when TRITON_INTERPRET=1 was set before Triton was imported (Triton's own
# library functions, tl.zeros and the like, are decorated at that import too, so it cannot be switched on later)
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
_kernel = triton.jit(_fused_statistics_kernel) if triton is not None else None


def _combine_partials(partial: torch.Tensor) -> dict[str, torch.Tensor]:
    """Merges the splits' partial statistics, (10, splits, rows) -> the torch path's per-row sums, each (rows,)."""
    f = dict(zip(_PARTIAL_FIELDS, partial.unbind(0)))

    def merge(max_, *sums):
        top = max_.amax(dim=0)  # finite: every split holds at least one vocabulary block
        scale = torch.exp(max_ - top)
        return top, [(scale * s).sum(dim=0) for s in sums], scale

    max_p, (sum_p, gap_p), scale_p = merge(f["max_p"], f["sum_p"], f["gap_p"])
    # Over a split: sum e^(z - M)(z - M) = r * (shifted + (m - M) * sum), its shifted sum moved to the global max M
    shifted_p = (scale_p * (f["shifted_p"] + (f["max_p"] - max_p) * f["sum_p"])).sum(dim=0)
    max_q, (sum_q,), _ = merge(f["max_q"], f["sum_q"])
    max_m, (sum_m,), _ = merge(f["max_m"], f["sum_m"])
    return {
        "lse_p": max_p + torch.log(sum_p),
        "lse_q": max_q + torch.log(sum_q),
        "lse_m": max_m + torch.log(sum_m),
        "sum_p": sum_p,
        "shifted_p": shifted_p,
        "gap_p": gap_p,
        "label_p": f["label_p"].sum(dim=0),  # only the split holding the label contributes
        "label_q": f["label_q"].sum(dim=0),
    }


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul precision setting (TF32 only where the user allowed it for torch.mm too)
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _num_splits(row_blocks: int, vocab_blocks: int, device: torch.device) -> int:
    """Vocabulary splits per row block: enough programs for ~8 waves of the GPU (so the last, partial wave costs
    little), as few as that allows (each split adds 40 bytes of partials per row)."""
    if device.type == "cuda":
        target = 8 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # interpreter: several splits, so that the combine is exercised
    return max(1, min(vocab_blocks, math.ceil(target / row_blocks)))


FIELDS = ("policy_logps", "ref_logps", "hellinger", "reverse_kl", "entropy")
"""What `fused_token_statistics` returns, in order."""


def fused_token_statistics(
    policy_hidden: torch.Tensor,
    policy_weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    policy_bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    token_chunk_size: int = TOKEN_CHUNK_SIZE,
    config: KernelConfig | None = None,
    num_splits: int | None = None,
):
    """[`dgpo_trl.functional.token_statistics`] with the fused Triton kernel; same arguments.

    Runs on CUDA tensors, or on CPU tensors in a process started with TRITON_INTERPRET=1 (Triton's interpreter;
    slow, for tests). `config` overrides the tile shape, `num_splits` the number of vocabulary splits (both for tuning
    and tests). Returns the five (N,) float32 statistics named by `FIELDS`, in that order (the fields of
    `dgpo_trl.functional.TokenStatistics`, which wraps them: this package imports nothing else of dgpo_trl).
    """
    if triton is None:
        raise RuntimeError("fused_token_statistics needs Triton (`pip install triton`), which is not installed.")
    if policy_hidden.shape[0] != ref_hidden.shape[0]:
        raise ValueError(f"policy_hidden has {policy_hidden.shape[0]} rows but ref_hidden has {ref_hidden.shape[0]}.")
    if policy_weight.shape[0] != ref_weight.shape[0]:
        raise ValueError(
            f"policy_weight has {policy_weight.shape[0]} vocabulary rows but ref_weight has {ref_weight.shape[0]}."
        )
    if token_chunk_size < 1:
        raise ValueError(f"token_chunk_size must be >= 1, got {token_chunk_size}.")
    device = policy_hidden.device
    interpret = INTERPRETER
    if device.type != "cuda" and not interpret:
        raise ValueError(
            f"fused_token_statistics runs on CUDA tensors (got {device.type}); on CPU only under Triton's interpreter "
            "(TRITON_INTERPRET=1 set before importing Triton)."
        )

    n_tokens, vocab = policy_hidden.shape[0], policy_weight.shape[0]
    # All four operands bf16 (or all fp16) run on tensor cores; otherwise each tile is converted to fp32 in registers
    # after loading (UPCAST), never by copying a whole weight matrix
    dtypes = {policy_hidden.dtype, policy_weight.dtype, ref_hidden.dtype, ref_weight.dtype}
    half = len(dtypes) == 1 and dtypes <= {torch.bfloat16, torch.float16}
    if config is None:
        config = INTERPRETER_CONFIG if interpret else (DEFAULT_CONFIG if half else FP32_CONFIG)

    def contiguous_rows(x):
        return x if x.stride(-1) == 1 else x.contiguous()

    h_p, h_q = contiguous_rows(policy_hidden), contiguous_rows(ref_hidden)
    w_p, w_q = contiguous_rows(policy_weight), contiguous_rows(ref_weight)
    out = {k: torch.zeros(n_tokens, device=device) for k in FIELDS}
    if n_tokens == 0:
        return tuple(out.values())

    vocab_blocks = triton.cdiv(vocab, config.block_v)
    dummy = torch.empty(1, device=device)
    chunk_rows = min(token_chunk_size, n_tokens)
    row_blocks_max = triton.cdiv(chunk_rows, config.block_n)
    splits = num_splits or _num_splits(row_blocks_max, vocab_blocks, device)
    blocks_per_split = triton.cdiv(vocab_blocks, splits)
    splits = triton.cdiv(vocab_blocks, blocks_per_split)  # no empty split: every partial max is finite
    partial = torch.empty(len(_PARTIAL_FIELDS) * splits * chunk_rows, device=device, dtype=torch.float32)
    launch = {} if interpret else {"num_warps": config.num_warps, "num_stages": config.num_stages}
    with torch.no_grad():
        for t0 in range(0, n_tokens, token_chunk_size):
            t1 = min(t0 + token_chunk_size, n_tokens)
            rows = t1 - t0
            part = partial[: len(_PARTIAL_FIELDS) * splits * rows].view(len(_PARTIAL_FIELDS), splits, rows)
            grid = (triton.cdiv(rows, config.block_n), splits)
            _kernel[grid](
                h_p[t0:t1],
                h_q[t0:t1],
                w_p,
                w_q,
                dummy if policy_bias is None else policy_bias,
                dummy if ref_bias is None else ref_bias,
                dummy if labels is None else labels[t0:t1],
                part,
                rows,
                vocab,
                h_p.shape[1],
                h_q.shape[1],
                h_p.stride(0),
                h_q.stride(0),
                w_p.stride(0),
                w_q.stride(0),
                splits * rows,
                blocks_per_split,
                float(logit_scale),
                float(final_logit_softcapping or 1.0),
                1.0 / float(temperature),
                HAS_BIAS_P=policy_bias is not None,
                HAS_BIAS_Q=ref_bias is not None,
                HAS_SOFTCAP=final_logit_softcapping is not None,
                HAS_LABELS=labels is not None,
                UPCAST=not half or interpret,  # also under the interpreter: numpy has no bf16 matmul
                INPUT_PRECISION=_input_precision(torch.float32 if not half else h_p.dtype),
                BLOCK_N=config.block_n,
                BLOCK_V=config.block_v,
                BLOCK_K=config.block_k,
                **launch,
            )
            s = _combine_partials(part)
            if labels is not None:
                out["policy_logps"][t0:t1] = s["label_p"] - s["lse_p"]
                out["ref_logps"][t0:t1] = s["label_q"] - s["lse_q"]
            # The same closing formulas (and clamps) as the torch path
            out["hellinger"][t0:t1] = (-torch.expm1(s["lse_m"] - 0.5 * (s["lse_p"] + s["lse_q"]))).clamp(0.0, 1.0)
            out["reverse_kl"][t0:t1] = (s["gap_p"] / s["sum_p"] - s["lse_p"] + s["lse_q"]).clamp_min(0.0)
            out["entropy"][t0:t1] = (torch.log(s["sum_p"]) - s["shifted_p"] / s["sum_p"]).clamp_min(0.0)
    return tuple(out.values())
