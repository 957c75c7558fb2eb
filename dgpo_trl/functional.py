"""DGPO's math on plain tensors: hidden states -> token statistics -> scores -> weights.

Nothing here imports TRL, so every function can be used (and tested) without a trainer.

Notation (paper, Sections 3.2-3.3): for a completion token at position t with context ctx_t,

    d_t  = 1 - sum_a sqrt(pi_theta(a|ctx_t) * pi_ref(a|ctx_t))      squared Hellinger, in [0, 1]
    H_t  = entropy(pi_theta(.|ctx_t))                                  Shannon entropy, nats
    s_t  = d_t * (H_t / log|V|) ** kappa   ("normalized" gate, Eq. 12; H / log|V| in [0, 1])
      or d_t * H_t ** kappa                ("nats" gate, Eq. 3 with kappa = 1)
    w_t  = T_i * softmax_t(s_t / tau)  over the completion's valid tokens (mean weight exactly 1)

`token_statistics` computes every per-token quantity DGPO and TRL need in one pass over the vocabulary, in tiles of
`token_chunk_size` x `chunk_size` logits, with an online log-sum-exp: neither model's full-vocabulary logits ever
exist for more than one tile. The Bhattacharyya coefficient needs no second pass:

    sum_a sqrt(p_a q_a) = exp(LSE((z_p + z_q) / 2) - (LSE(z_p) + LSE(z_q)) / 2)

`token_statistics_reference` is the naive float64 full-softmax version the tiled one is tested against. On CUDA, when
Triton is installed, `token_statistics` runs the same pass as one fused kernel (`dgpo_trl.kernels`) instead of the
torch tiles; `use_triton=False` or the environment variable `DGPO_TRITON=0` keeps the torch tiles. The kernel is
guarded: its first run for each kind of input in a process is checked against the torch tiles, and where it fails or
disagrees the tiles run instead (see [`token_statistics`]); `last_divergence_path()` says which path ran last.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple

import torch

DIVERGENCES = ("hellinger", "reverse_kl")
"""The token divergences d_t DGPO can score tokens by: the squared Hellinger distance (the paper's) or the reverse KL
(its ablation)."""

ENTROPY_GATES = ("normalized", "nats")
"""Units of the entropy in the gate: `"normalized"` H / log|V| in [0, 1] (the paper's Eq. 12 and Sections 3.3, 4.4),
`"nats"` the Shannon entropy H itself (the paper's Eq. 3)."""

DEFAULT_CHUNK_SIZE = 8192
"""Vocabulary tile width of the divergence pass."""

DEFAULT_TOKEN_CHUNK_SIZE = 1024
"""Tokens per tile of the divergence pass; with `DEFAULT_CHUNK_SIZE` a tile holds 8M fp32 logits per model."""


class TokenStatistics(NamedTuple):
    """Per-token statistics of pi_theta (policy) and pi_ref (reference), each of shape (N,), float32 (float64 from
    float64 inputs).

    `policy_logps`/`ref_logps` are the log-probabilities of the labels (zeros when no labels were given). `entropy`
    is the entropy of pi_theta in nats. `hellinger` is the squared Hellinger distance in [0, 1] and `reverse_kl` is
    KL(pi_theta || pi_ref) >= 0, both over the full vocabulary.
    """

    policy_logps: torch.Tensor
    ref_logps: torch.Tensor
    hellinger: torch.Tensor
    reverse_kl: torch.Tensor
    entropy: torch.Tensor

    def divergence(self, name: str) -> torch.Tensor:
        """The divergence `d_t` called `name`, one of `DIVERGENCES`."""
        if name == "hellinger":
            return self.hellinger
        if name == "reverse_kl":
            return self.reverse_kl
        raise ValueError(f"divergence must be one of {list(DIVERGENCES)}, got {name!r}.")


def _logits(out, hidden, weight, bias, start, end, logit_scale, final_logit_softcapping, temperature):
    """One vocabulary tile of logits, in `out`'s dtype (float32, or float64 for float64 inputs), written into `out` and
    transformed as TRL's fused LM head does."""
    w = weight[start:end]
    if hidden.device.type == "cuda" and hidden.dtype in (torch.float16, torch.bfloat16) and w.dtype == hidden.dtype:
        # Tensor cores with fp32 accumulation and an fp32 result: rounding logits to bf16 would bias the statistics
        torch.mm(hidden, w.t(), out_dtype=torch.float32, out=out)
    else:
        torch.mm(hidden.to(out.dtype), w.to(out.dtype).t(), out=out)
    if bias is not None:
        out += bias[start:end].to(out.dtype)
    if logit_scale != 1.0:
        out *= logit_scale
    if final_logit_softcapping is not None:
        out.div_(final_logit_softcapping).tanh_().mul_(final_logit_softcapping)
    if temperature != 1.0:
        out /= temperature
    return out


class _TileFold:
    """Running sums of one chunk of tokens over vocabulary tiles, rescaled to the running maxima m_p and m_q.

    With e_p = exp(z_p - m_p) and e_q = exp(z_q - m_q):
    `total_p` = sum e_p and `total_q` = sum e_q (the log-sum-exps); `entropy` = sum e_p (z_p - m_p) (kept shifted, so
    a confident distribution's entropy does not cancel catastrophically); `cross` = sum e_p (z_q - m_q) (for
    E_p[z_p - z_q], the reverse KL); `overlap` = sum sqrt(e_p e_q) = sum exp((z_p + z_q) / 2 - (m_p + m_q) / 2), the
    Bhattacharyya sum, shifted by the mean of the two maxima so it needs no maximum of its own and stays <= 1 per term.
    """

    def __init__(self, rows: int, device, dtype=torch.float32):
        self.max_p = torch.full((rows,), -math.inf, device=device, dtype=dtype)
        self.max_q = torch.full((rows,), -math.inf, device=device, dtype=dtype)
        self.total_p, self.total_q, self.entropy, self.cross, self.overlap = torch.zeros(
            5, rows, device=device, dtype=dtype
        )

    @staticmethod
    def _shift(old_max: torch.Tensor, tile: torch.Tensor):
        new_max = torch.maximum(old_max, tile.amax(dim=-1))
        # A row still at -inf shifts by 0, so exp() gives 0 instead of NaN
        safe = torch.where(torch.isfinite(new_max), new_max, 0.0)
        moved = torch.where(torch.isfinite(old_max), old_max - safe, 0.0)
        return new_max, safe, torch.exp(old_max - safe), moved

    def update(self, z_p: torch.Tensor, z_q: torch.Tensor, e_p: torch.Tensor, e_q: torch.Tensor) -> None:
        """Folds one tile in. Overwrites z_p, z_q with the shifted logits and uses e_p, e_q as scratch."""
        self.max_p, safe_p, rescale_p, moved_p = self._shift(self.max_p, z_p)
        self.max_q, safe_q, rescale_q, moved_q = self._shift(self.max_q, z_q)
        s_p, s_q = z_p.sub_(safe_p.unsqueeze(-1)), z_q.sub_(safe_q.unsqueeze(-1))
        torch.exp(s_p, out=e_p)
        torch.exp(s_q, out=e_q)
        # sum e^(z - m')(y - n') = r * (sum e^(z - m)(y - n) + (n - n') * sum e^(z - m)) + the tile's terms
        self.entropy = rescale_p * (self.entropy + moved_p * self.total_p) + torch.einsum("ij,ij->i", e_p, s_p)
        self.cross = rescale_p * (self.cross + moved_q * self.total_p) + torch.einsum("ij,ij->i", e_p, s_q)
        self.total_p = rescale_p * self.total_p + e_p.sum(dim=-1)
        self.total_q = rescale_q * self.total_q + e_q.sum(dim=-1)
        self.overlap = torch.sqrt(rescale_p * rescale_q) * self.overlap + e_p.mul_(e_q).sqrt_().sum(dim=-1)

    def statistics(self) -> dict[str, torch.Tensor]:
        log_total_p, log_total_q = torch.log(self.total_p), torch.log(self.total_q)
        # log BC = log overlap + (m_p + m_q) / 2 - (LSE_p + LSE_q) / 2; -expm1 keeps small distances exact
        log_bc = torch.log(self.overlap) - 0.5 * (log_total_p + log_total_q)
        return {
            "hellinger": (-torch.expm1(log_bc)).clamp(0.0, 1.0),
            # E_p[z_p - z_q] - LSE_p + LSE_q, with the maxima cancelled out
            "reverse_kl": ((self.entropy - self.cross) / self.total_p - log_total_p + log_total_q).clamp_min(0.0),
            "entropy": (log_total_p - self.entropy / self.total_p).clamp_min(0.0),
            "lse_p": self.max_p + log_total_p,
            "lse_q": self.max_q + log_total_q,
        }


_KERNEL_DEVICES = ("cuda",)
"""Device types on which `token_statistics` runs the fused kernel by default (`use_triton=None`)."""

# How far the kernel may differ from the torch tiles, per statistic: |kernel - tiles| <= tolerance * (1 + |tiles|)
# (absolute below 1, relative above: log-probs and the reverse KL grow with the logits). Both paths read the same
# inputs, form the same products (exact in fp32 for bf16/fp16 operands, one rounding for fp32 ones) and accumulate them
# in fp32, in different orders: over the hidden size in each logit, over the vocabulary in each sum. Their difference
# is rounding of order u * sqrt(H) * |z| per logit (u = 2^-24), carried into the statistics with factors of order 1.
# Measured under Triton's interpreter (N 64, V 2000, H 64-896, logit spreads 1-30, logits up to 135), in those units:
# at most 7.1e-6 with fp32 inputs (4.6e-5 absolute in the log-probs, 4.1e-4 in a reverse KL of order 100) and 4.2e-6
# with bf16 inputs (3.1e-5 and 2.1e-4), of the size of either path's own error against float64. At LLM sizes (H 8192,
# V 152k) longer sums grow it by roughly sqrt(size ratio), ~10-30x: 1e-3 keeps a margin, and what a broken kernel
# gives (a lost vocabulary split, a wrong block, NaN) is far beyond it. A d_t error below 1e-3 moves a token's weight
# by under 1% at tau >= 0.1.
# With TF32 allowed for fp32 operands, both paths round the inputs to 10 mantissa bits, possibly in different ways
# (Triton rounds to nearest; cuBLAS does not promise how): up to 2^-10 per product, ~1e-3 * |z| per logit, a few
# hundredths at LLM logits. Not measurable here (the interpreter does not emulate TF32).
_KERNEL_TOLERANCE = 1e-3
_KERNEL_TOLERANCE_TF32 = 3e-2


class KernelCheck(NamedTuple):
    """How the fused kernel's first run for one kind of input compared with the torch tiles on the first token chunk.

    `passed` is False after a compile or launch `error` or a disagreement beyond `tolerance`. `field` is the statistic
    that differed most (relative to 1 + |value|) and `difference` its largest absolute difference from the tiles.
    """

    passed: bool
    field: str | None = None
    difference: float | None = None
    tolerance: float | None = None
    error: str | None = None


_KERNEL_CHECKS: dict[tuple, KernelCheck] = {}
"""The guard's per-process state: one check per key (see `_kernel_key`); a failed key runs the torch tiles."""

_last_path: str | None = None


def last_divergence_path() -> str | None:
    """Which implementation computed the most recent [`token_statistics`] call in this process: `"fused"` (the Triton
    kernel) or `"tiles"` (the torch tiles, also after the kernel failed or disagreed); `None` before any call."""
    return _last_path


def _use_fused_kernel(policy_hidden: torch.Tensor, use_triton: bool | None) -> bool:
    """Whether `token_statistics` dispatches to the fused Triton kernel (see its `use_triton` argument)."""
    if use_triton is None:
        if policy_hidden.device.type not in _KERNEL_DEVICES or os.environ.get("DGPO_TRITON", "1") == "0":
            return False  # without importing Triton (~85 MB) where it does not run by default
        if policy_hidden.dtype == torch.float64:
            return False  # the kernel accumulates in float32; float64 inputs get float64 tiles
    elif not use_triton:
        return False
    from .kernels import divergence

    runnable = divergence.triton_available() and (policy_hidden.is_cuda or divergence.INTERPRETER)
    if use_triton and not runnable:
        raise ValueError(
            "use_triton=True needs Triton and CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
            f"triton installed: {divergence.triton_available()}, device: {policy_hidden.device}."
        )
    return runnable


def _kernel_key(inputs: dict) -> tuple:
    """What the guard checks once: what selects a compiled variant of the kernel and its tiles (the device, the
    operands' dtypes, a bias, labels, a softcap, TF32) and the model pair's shapes (hidden sizes, vocabulary). The
    number of tokens is left out: it changes every call, and checking each would add a tile pass per step."""
    operands = ("policy_hidden", "policy_weight", "ref_hidden", "ref_weight", "labels", "policy_bias", "ref_bias")
    return (
        str(inputs["policy_hidden"].device),
        *(None if inputs[name] is None else inputs[name].dtype for name in operands),
        inputs["policy_hidden"].shape[1],
        inputs["ref_hidden"].shape[1],
        inputs["policy_weight"].shape[0],
        inputs["final_logit_softcapping"] is not None,
        torch.get_float32_matmul_precision(),
    )


def _compare_with_tiles(fused: TokenStatistics, tiles: TokenStatistics) -> tuple[str, float, float]:
    """The statistic where the kernel differs most from the tiles relative to 1 + |value|, its largest absolute
    difference, and that relative difference (inf where only one side is NaN or infinite)."""
    worst = (TokenStatistics._fields[0], 0.0, 0.0)
    for field, f, t in zip(TokenStatistics._fields, fused, tiles):
        same = (f == t) | (f.isnan() & t.isnan())
        gap = torch.where(same, 0.0, (f - t).abs().nan_to_num(nan=math.inf))
        relative = gap / (1.0 + torch.where(torch.isfinite(t), t.abs(), 0.0))
        if relative.numel() and relative.max().item() > worst[2]:
            worst = (field, gap.max().item(), relative.max().item())
    return worst


def _guarded_kernel(inputs: dict, **tiling) -> TokenStatistics | None:
    """The fused kernel's statistics, checked against the torch tiles on the first token chunk the first time `inputs`'
    key runs; None (the caller runs the tiles) for a key whose kernel failed or disagreed."""
    from .kernels import divergence

    key = _kernel_key(inputs)
    if key in _KERNEL_CHECKS:
        return TokenStatistics(*divergence.fused_token_statistics(**inputs)) if _KERNEL_CHECKS[key].passed else None
    dtypes = {inputs[name].dtype for name in ("policy_hidden", "policy_weight", "ref_hidden", "ref_weight")}
    fallback = (
        f"using the torch tiles from now on for these inputs ({inputs['policy_hidden'].device}, "
        f"{'/'.join(sorted(str(d).removeprefix('torch.') for d in dtypes))}; DGPO_TRITON=0 skips the kernel)"
    )
    try:
        fused = TokenStatistics(*divergence.fused_token_statistics(**inputs))
    except torch.OutOfMemoryError:
        raise  # not the kernel's fault, and the tiles need more memory
    except Exception as error:  # noqa: BLE001 - a compile or launch error, whatever Triton or the driver raise
        _KERNEL_CHECKS[key] = KernelCheck(passed=False, error=f"{type(error).__name__}: {error}")
        message = f"The fused Triton kernel of DGPO's divergence pass failed ({type(error).__name__}: {error})"
        warnings.warn(f"{message}; {fallback}.", RuntimeWarning, stacklevel=3)
        return None
    rows = min(tiling["token_chunk_size"], fused.entropy.shape[0])
    if rows == 0:
        return fused  # nothing launched, nothing to compare: a later call checks
    first = {"policy_hidden": inputs["policy_hidden"][:rows], "ref_hidden": inputs["ref_hidden"][:rows]}
    if inputs["labels"] is not None:
        first["labels"] = inputs["labels"][:rows]
    tiles = _tiled_token_statistics(**(inputs | first), **tiling)
    field, difference, relative = _compare_with_tiles(TokenStatistics(*(x[:rows] for x in fused)), tiles)
    tf32 = torch.float32 in dtypes and torch.get_float32_matmul_precision() != "highest"
    tolerance = _KERNEL_TOLERANCE_TF32 if tf32 else _KERNEL_TOLERANCE
    _KERNEL_CHECKS[key] = KernelCheck(relative <= tolerance, field, difference, tolerance)
    if relative <= tolerance:
        return fused
    message = (
        f"The fused Triton kernel of DGPO's divergence pass disagrees with the torch tiles: {field} differs by up to "
        f"{difference:.3g} (tolerance {tolerance:g} x (1 + |value|))"
    )
    warnings.warn(f"{message}; {fallback}.", RuntimeWarning, stacklevel=3)
    return None


def token_statistics(
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
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    token_chunk_size: int = DEFAULT_TOKEN_CHUNK_SIZE,
    use_triton: bool | None = None,
) -> TokenStatistics:
    """Per-token statistics of pi_theta and pi_ref from last hidden states and LM-head weights, in one tiled pass.

    Args:
        policy_hidden, ref_hidden: (N, H_policy) and (N, H_ref) hidden states, one row per scored token.
        policy_weight, ref_weight: (V, H) LM-head weights (both models share the vocabulary).
        labels: optional (N,) token ids whose log-probabilities are returned.
        policy_bias, ref_bias: optional (V,) LM-head biases.
        temperature: logits are divided by it (the sampling temperature, as TRL scores them).
        logit_scale, final_logit_softcapping: the model's output transform, applied before the temperature as TRL's
            fused LM head does: z = softcap * tanh(scale * logits / softcap) / temperature.
        chunk_size: vocabulary tile width. token_chunk_size: tokens per tile.
        use_triton: `None` (default) runs the fused Triton kernel ([`dgpo_trl.kernels.fused_token_statistics`]) on
            CUDA tensors when Triton is installed and `DGPO_TRITON` is not `0`, and the torch tiles otherwise; `False`
            always runs the torch tiles; `True` requires the kernel. The kernel never materialises a logit tile, so
            `chunk_size` and `token_chunk_size` do not apply to it; its extra memory is bounded by its own constants.
            The default dispatch guards the kernel: the first time it runs in this process for a device, dtypes and
            model shapes (hidden sizes, vocabulary, bias, labels, softcap), the first `token_chunk_size` tokens are
            also computed with the torch tiles; on a compile or launch error, or a difference beyond a rounding
            tolerance, it warns once and runs the tiles for those inputs from then on. `True` is not guarded: the
            kernel's own result and errors reach the caller (benchmarks and parity tests measure the kernel itself).
            [`last_divergence_path`] tells which path ran.

    Returns:
        [`TokenStatistics`], each field (N,) float32 (float64 for float64 hidden states). Memory beyond the outputs is
        O(token_chunk_size * chunk_size), independent of N.
    """
    if policy_hidden.shape[0] != ref_hidden.shape[0]:
        raise ValueError(f"policy_hidden has {policy_hidden.shape[0]} rows but ref_hidden has {ref_hidden.shape[0]}.")
    if policy_weight.shape[0] != ref_weight.shape[0]:
        raise ValueError(
            f"policy_weight has {policy_weight.shape[0]} vocabulary rows but ref_weight has {ref_weight.shape[0]}."
        )
    if chunk_size < 1 or token_chunk_size < 1:
        raise ValueError(f"chunk_size and token_chunk_size must be >= 1, got {chunk_size} and {token_chunk_size}.")
    inputs = {
        "policy_hidden": policy_hidden,
        "policy_weight": policy_weight,
        "ref_hidden": ref_hidden,
        "ref_weight": ref_weight,
        "labels": labels,
        "policy_bias": policy_bias,
        "ref_bias": ref_bias,
        "temperature": temperature,
        "logit_scale": logit_scale,
        "final_logit_softcapping": final_logit_softcapping,
    }
    tiling = {"chunk_size": chunk_size, "token_chunk_size": token_chunk_size}
    stats = None
    if _use_fused_kernel(policy_hidden, use_triton):
        if use_triton:
            from .kernels import divergence

            stats = TokenStatistics(*divergence.fused_token_statistics(**inputs))
        else:
            stats = _guarded_kernel(inputs, **tiling)
    global _last_path
    _last_path = "tiles" if stats is None else "fused"
    return _tiled_token_statistics(**inputs, **tiling) if stats is None else stats


def _tiled_token_statistics(
    policy_hidden,
    policy_weight,
    ref_hidden,
    ref_weight,
    labels,
    *,
    policy_bias,
    ref_bias,
    chunk_size,
    token_chunk_size,
    **transform,
) -> TokenStatistics:
    """The torch tiles of [`token_statistics`] (arguments checked there); `transform`: temperature, logit_scale,
    final_logit_softcapping."""
    n_tokens, vocab = policy_hidden.shape[0], policy_weight.shape[0]
    device = policy_hidden.device
    # float32 tiles (bf16 inputs included: rounding the logits would bias the statistics), float64 for float64 inputs
    dtype = torch.float64 if policy_hidden.dtype == torch.float64 else torch.float32
    out = {k: torch.zeros(n_tokens, device=device, dtype=dtype) for k in TokenStatistics._fields}
    # Four tile buffers, reused for every tile: the two models' logits and their exponentials
    buffers = torch.empty(4, min(token_chunk_size, n_tokens), min(chunk_size, vocab), device=device, dtype=dtype)
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for t0 in range(0, n_tokens, token_chunk_size):
            t1 = min(t0 + token_chunk_size, n_tokens)
            h_p, h_q = policy_hidden[t0:t1], ref_hidden[t0:t1]
            fold = _TileFold(t1 - t0, device, dtype)
            label_p = torch.zeros(t1 - t0, device=device, dtype=dtype)
            label_q = torch.zeros(t1 - t0, device=device, dtype=dtype)
            tile_labels = None if labels is None else labels[t0:t1]
            for v0 in range(0, vocab, chunk_size):
                v1 = min(v0 + chunk_size, vocab)
                z_p, z_q, e_p, e_q = buffers[:, : t1 - t0, : v1 - v0]
                _logits(z_p, h_p, policy_weight, policy_bias, v0, v1, **transform)
                _logits(z_q, h_q, ref_weight, ref_bias, v0, v1, **transform)
                if tile_labels is not None:
                    in_tile = (tile_labels >= v0) & (tile_labels < v1)
                    local = (tile_labels - v0).clamp(0, v1 - v0 - 1).unsqueeze(-1)
                    label_p += torch.where(in_tile, z_p.gather(-1, local).squeeze(-1), 0.0)
                    label_q += torch.where(in_tile, z_q.gather(-1, local).squeeze(-1), 0.0)
                fold.update(z_p, z_q, e_p, e_q)
            stats = fold.statistics()
            if tile_labels is not None:
                out["policy_logps"][t0:t1] = label_p - stats["lse_p"]
                out["ref_logps"][t0:t1] = label_q - stats["lse_q"]
            for name in ("hellinger", "reverse_kl", "entropy"):
                out[name][t0:t1] = stats[name]
    return TokenStatistics(**out)


def token_statistics_reference(
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
) -> TokenStatistics:
    """Naive float64 reference of [`token_statistics`]: full-vocabulary softmax, every definition written out."""

    def log_probs(hidden, weight, bias):
        z = hidden.double() @ weight.double().t()
        if bias is not None:
            z = z + bias.double()
        z = z * logit_scale
        if final_logit_softcapping is not None:
            z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
        return torch.log_softmax(z / temperature, dim=-1)

    log_p = log_probs(policy_hidden, policy_weight, policy_bias)
    log_q = log_probs(ref_hidden, ref_weight, ref_bias)
    p, q = log_p.exp(), log_q.exp()
    if labels is None:
        policy_logps = ref_logps = torch.zeros(log_p.shape[0], dtype=torch.float64, device=log_p.device)
    else:
        policy_logps = log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        ref_logps = log_q.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    stats = TokenStatistics(
        policy_logps=policy_logps,
        ref_logps=ref_logps,
        hellinger=1.0 - torch.sqrt(p * q).sum(-1),
        reverse_kl=(p * (log_p - log_q)).sum(-1),
        entropy=-(p * log_p).sum(-1),
    )
    return TokenStatistics(*(x.float() for x in stats))


def token_divergence_and_entropy(
    policy_hidden: torch.Tensor,
    policy_weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    policy_bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    divergence: str = "hellinger",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
    token_chunk_size: int = DEFAULT_TOKEN_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token divergence d_t between pi_theta and pi_ref, and the entropy of pi_theta (nats).

    `divergence="hellinger"` gives the squared Hellinger distance 1 - sum_a sqrt(pi_theta(a) pi_ref(a)) in [0, 1];
    `divergence="reverse_kl"` gives KL(pi_theta || pi_ref) (the paper's ablation). Both over the full vocabulary,
    computed in tiles (see [`token_statistics`]). Returns `(divergence, entropy)`, each (N,) float32.
    """
    stats = token_statistics(
        policy_hidden,
        policy_weight,
        ref_hidden,
        ref_weight,
        policy_bias=policy_bias,
        ref_bias=ref_bias,
        temperature=temperature,
        logit_scale=logit_scale,
        final_logit_softcapping=final_logit_softcapping,
        chunk_size=chunk_size,
        token_chunk_size=token_chunk_size,
    )
    return stats.divergence(divergence), stats.entropy


def token_scores(
    divergence: torch.Tensor,
    entropy: torch.Tensor,
    *,
    kappa: float,
    vocab_size: int,
    entropy_gate: str = "normalized",
) -> torch.Tensor:
    """Entropy-gated scores: s_t = d_t * (entropy_t / log V) ** kappa (`entropy_gate="normalized"`, in [0, 1] for the
    Hellinger distance) or s_t = d_t * entropy_t ** kappa (`"nats"`, in [0, log V]). `kappa=0` ignores the entropy.

    The two gates differ by the factor (log V) ** kappa, so at a fixed tau the nats gate spreads the weights as the
    normalized gate would at tau / (log V) ** kappa.
    """
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 to normalise the entropy by log(vocab_size), got {vocab_size}.")
    if entropy_gate not in ENTROPY_GATES:
        raise ValueError(f"entropy_gate must be one of {list(ENTROPY_GATES)}, got {entropy_gate!r}.")
    entropy = _at_least_float32(entropy).clamp(0.0, math.log(vocab_size))
    if entropy_gate == "normalized":
        entropy = entropy / math.log(vocab_size)
    return _at_least_float32(divergence) * entropy.pow(kappa)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def nonfinite_sequences(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) bool: sequences with a valid token whose score is not finite (NaN/inf from a bf16 overflow, say)."""
    return (~torch.isfinite(scores) & mask.bool()).any(dim=-1)


def weights_from_scores(scores: torch.Tensor, mask: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """w = T_i * softmax over sequence i's valid tokens of s / tau; 0 on invalid tokens and on empty sequences. `tau`
    is a number or a tensor that broadcasts against the scores (e.g. (B, 1), one per sequence).

    Computed in float32, or in float64 for float64 scores. A sequence holding a non-finite score falls back to uniform
    weights (w = 1 on its valid tokens), so NaN never reaches the loss. Finite for every tau > 0: the scores are
    shifted by their sequence's maximum before the division, so s / tau never overflows (a tau so small that it
    would gives the limit, all of a sequence's weight shared by its top-scoring tokens).
    """
    mask = mask.bool()
    scores = scores if scores.dtype == torch.float64 else scores.float()
    usable = mask & ~nonfinite_sequences(scores, mask).unsqueeze(-1)
    row_max = torch.where(usable, scores, -math.inf).amax(dim=-1, keepdim=True)
    gaps = torch.where(usable, scores - torch.where(torch.isfinite(row_max), row_max, 0.0), 0.0)  # <= 0
    # A zero gap stays 0 even where tau rounds to 0 in the scores' dtype (0 / 0 would be NaN); the others go to -inf
    logits = torch.where(gaps == 0, 0.0, gaps / tau).masked_fill(~mask, -math.inf)
    e = torch.exp(logits)  # in [0, 1], exactly 1 at each sequence's maximum, exactly 0 on invalid tokens
    lengths = mask.sum(dim=-1, keepdim=True).to(scores.dtype)
    return lengths * e / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


def token_weights(
    divergence: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau: float,
    kappa: float,
    vocab_size: int,
    entropy_gate: str = "normalized",
) -> torch.Tensor:
    """DGPO token weights w = T_i * softmax over valid tokens of s / tau (s from [`token_scores`]), of `mask`'s shape.

    Positive on valid tokens (mask = 1), 0 elsewhere, mean exactly 1 over each non-empty sequence; a sequence with
    no valid token gets all-zero weights. See [`weights_from_scores`] for the non-finite fallback.
    """
    scores = token_scores(divergence, entropy, kappa=kappa, vocab_size=vocab_size, entropy_gate=entropy_gate)
    return weights_from_scores(scores, mask, tau)


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64 for statistics that must resolve small spreads, except on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def sequence_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) mean and variance of each sequence's valid values, in float64 (see [`wide_dtype`]); NaN for empty ones.

    The variance is the mean squared deviation from the sequence's own mean, never E[x^2] - E[x]^2: DGPO's weights sit
    near 1 with spreads down to 1e-6, where that difference cancels (in float32 a true std of 5.7e-5 reads as 0).
    """
    mask = mask.bool()
    dtype = wide_dtype(x.device)
    x = torch.where(mask, x.to(dtype), 0.0)
    lengths = mask.sum(dim=-1).to(dtype)
    mean = x.sum(-1) / lengths
    deviations = torch.where(mask, x - mean.unsqueeze(-1), 0.0)
    return mean, deviations.square().sum(-1) / lengths


def effective_sample_size(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) normalised effective sample size (sum w)^2 / (T sum w^2) in (0, 1]; NaN for empty sequences.

    Evaluated as 1 / (1 + var / mean^2) from the deviations (see [`sequence_moments`]), so a spread of 1e-6 gives
    1 - 1e-12 rather than a cancelled 1 (or a value above 1). Returned in float64 for float64 weights, else float32.
    """
    mean, variance = sequence_moments(weights, mask)
    ess = 1.0 / (1.0 + variance / mean.square())
    return ess if weights.dtype == torch.float64 else ess.float()


def tau_for_target_ess(
    scores: torch.Tensor,
    mask: torch.Tensor,
    target_ess: float,
    *,
    fallback: float,
    lower: float = 1e-4,
    upper: float = 1e4,
    iterations: int = 40,
    reduce=None,
) -> float:
    """The tau whose weights have mean effective sample size `target_ess` over the non-empty sequences.

    Bisection on log(tau): ESS grows monotonically with tau (softmax's collision probability falls as its temperature
    rises), from ~1/T at tau -> 0 to 1 at tau -> inf. When even `lower` leaves the ESS at or above the target (flat
    scores, e.g. at step 1 where pi_theta == pi_ref, or an empty batch) no tau reaches it and `fallback` is returned;
    the result is always finite and in [lower, upper] or `fallback`.

    `reduce`, if given, sums a small tensor across processes, so that every rank bisects on the global mean ESS and
    gets the same tau; it is called exactly `iterations + 2` times whatever the data.
    """
    if not 0.0 < target_ess < 1.0:
        raise ValueError(f"target_ess must be in (0, 1), got {target_ess!r}.")
    mask = mask.bool()
    rows = mask.any(dim=-1)
    scores, mask = scores[rows], mask[rows]
    reduce = reduce or (lambda x: x)

    def mean_ess(log_tau: float) -> float:
        weights = weights_from_scores(scores, mask, math.exp(log_tau))
        # One dtype on every process, whatever its scores' (a process with nothing to score has an empty float32 batch)
        wide = wide_dtype(scores.device)
        local = torch.stack(
            [effective_sample_size(weights, mask).sum().to(wide), torch.tensor(float(len(scores)), dtype=wide)]
        )
        total, count = reduce(local.to(scores.device)).tolist()
        return total / count if count else 1.0

    lo, hi = math.log(lower), math.log(upper)
    # Every branch makes the same calls, so ranks sharing `reduce` stay in step
    ess_at_lower, ess_at_upper = mean_ess(lo), mean_ess(hi)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if mean_ess(mid) < target_ess:
            lo = mid
        else:
            hi = mid
    if ess_at_lower >= target_ess:
        return float(fallback)
    if ess_at_upper < target_ess:
        return float(upper)
    return math.exp(0.5 * (lo + hi))
