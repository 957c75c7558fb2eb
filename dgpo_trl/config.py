"""`DGPOConfig`: TRL's `GRPOConfig` plus DGPO's token-reallocation fields."""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import transformers
from trl import GRPOConfig

from .accelerate_cpu_fsdp import check_cpu_fsdp_launch
from .functional import DEFAULT_CHUNK_SIZE, DIVERGENCES, ENTROPY_GATES

# TRL 1.16's GRPO loss types; each multiplies per-token advantages into a per-token loss.
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
# Loss types whose gradient is A_{i,t} * grad log pi_t even under a sequence-level importance ratio
_TOKEN_GRADIENT_LOSSES = ("cispo", "vespo")


@dataclass
class DGPOConfig(GRPOConfig):
    r"""
    Configuration class for [`DGPOTrainer`].

    Inherits every parameter of TRL's [`~trl.GRPOConfig`]. DGPO ([arXiv 2605.03327](https://arxiv.org/abs/2605.03327))
    replaces GRPO's uniform per-token advantage with A_i * w_t, where w_t = T_i * softmax_t(s_t / tau) and
    s_t = d_t * (H_t / log|V|) ** kappa scores each token by its divergence d_t from the reference model, gated by the
    policy's normalised entropy (or by its entropy in nats, `dgpo_entropy="nats"`). It drops the KL penalty, so `beta`
    keeps TRL's default of `0.0`; a positive `beta` adds TRL's KL term on top of the reallocation (with a warning).

    Parameters:
        dgpo_tau (`float`, *optional*, defaults to `0.5`):
            Reallocation temperature tau of the token softmax. Large values give uniform weights (GRPO); small values
            concentrate the advantage on the highest-scoring tokens. The paper reports its best and stable results for
            tau in [0.5, 1.0] (Section 4.4); 0.5 is inside that range. Must be finite and > 0.
        dgpo_kappa (`float`, *optional*, defaults to `1.0`):
            Entropy-gate exponent kappa. `0` removes the gate (the paper's "no entropy gate" ablation); large values
            suppress every token that is not near maximum entropy. The paper finds a moderate value best (Section 4.4,
            Table 5); 1.0 is the plain product of divergence and entropy of its Eq. 3. Must be finite and >= 0.
        dgpo_entropy (`str`, *optional*, defaults to `"normalized"`):
            Units of the entropy in the gate. The paper writes the gate two ways. `"normalized"`: Eq. 12 (and Sections
            3.3, 4.4, Appendix A), s_t = d_t * (H_t / log|V|) ** kappa with the normalised entropy in [0, 1], so
            s_t is in [0, 1]. `"nats"`: Eq. 3, s_t = d_t * H_t ** kappa with H_t the Shannon entropy in nats (Eq. 3 is
            kappa = 1), so s_t is in [0, log|V|]. The two differ by the factor (log|V|) ** kappa (11.9 for Qwen2.5's
            151,936 tokens): at the same tau the nats gate spreads the weights like the normalized gate at
            tau / (log|V|) ** kappa. Which one the paper's tau range (0.5-1) was tuned with is not stated; see
            `docs/results.md` for what each does at LLM vocabulary sizes.
        dgpo_divergence (`str`, *optional*, defaults to `"hellinger"`):
            Token divergence d_t between the policy and the reference. `"hellinger"`: the squared Hellinger distance,
            bounded in [0, 1] (the paper's method). `"reverse_kl"`: KL(pi_theta || pi_ref), unbounded (the paper's
            ablation).
        dgpo_uniform_weights (`bool`, *optional*, defaults to `False`):
            w_t = 1 for every token instead of DGPO's weights, i.e. GRPO without KL: a sanity switch. No reference
            model is loaded for it.
        dgpo_score (`str` or `None`, *optional*, defaults to `None`):
            Deprecated alias, removed in the next release: `"hellinger"` and `"reverse_kl"` set `dgpo_divergence`,
            `"uniform"` sets `dgpo_uniform_weights=True`, with a `FutureWarning` naming the new field.
        dgpo_chunk_size (`int`, *optional*, defaults to `8192`):
            Vocabulary tile width of the divergence pass. The pass never holds more than one tile of
            (tokens x `dgpo_chunk_size`) logits per model; smaller tiles use less memory, larger tiles fewer kernels.
            Must be >= 1.
        dgpo_target_ess (`float` or `None`, *optional*, defaults to `None`):
            Adaptive tau (beyond the paper, which names tau sensitivity as its limitation and dynamic scheduling as
            future work). When set, `dgpo_tau` is replaced, for each batch of completions DGPO scores together, by the
            tau whose weights reach this mean normalised effective sample size (sum w)^2 / (T sum w^2) over the
            completions with a nonzero advantage, found by bisection and logged as `dgpo/tau`. Where no tau reaches
            it (flat scores, e.g. while pi_theta == pi_ref), `dgpo_tau` is used. Must be in (0, 1); `None` (default)
            keeps `dgpo_tau` fixed.
        dgpo_skip_zero_advantage (`bool`, *optional*, defaults to `True`):
            Score only completions whose sequence advantage is nonzero: the others get A_{i,t} = A_i * w_t = 0
            whatever their weights, so their reference forward and divergence pass are skipped. Applies when the
            statistics are computed at loss time (see [`DGPOTrainer`]) and `beta == 0` (TRL's KL term needs every
            completion's reference log-probs).
    """

    dgpo_tau: float = field(
        default=0.5,
        metadata={
            "help": "Reallocation temperature tau of the token softmax w = T * softmax(s / tau). Large values give "
            "uniform weights (GRPO), small values concentrate the advantage on few tokens. The paper's good range is "
            "[0.5, 1.0]. Must be finite and > 0."
        },
    )
    dgpo_kappa: float = field(
        default=1.0,
        metadata={
            "help": "Entropy-gate exponent kappa in s = d * (H / log V) ** kappa. 0 removes the gate (the paper's "
            "ablation); the paper finds a moderate value best. Must be finite and >= 0."
        },
    )
    dgpo_divergence: str = field(
        default="hellinger",
        metadata={
            "help": "Token divergence d_t: 'hellinger' (squared Hellinger, bounded, the paper's method) or "
            "'reverse_kl' (KL(pi_theta || pi_ref), the paper's ablation).",
            "choices": list(DIVERGENCES),
        },
    )
    dgpo_uniform_weights: bool = field(
        default=False,
        metadata={"help": "w = 1 for every token (GRPO without KL): a sanity switch; loads no reference model."},
    )
    dgpo_score: str | None = field(
        default=None,
        metadata={
            "help": "Deprecated alias: 'hellinger' / 'reverse_kl' set dgpo_divergence, 'uniform' sets "
            "dgpo_uniform_weights=True (with a FutureWarning). Removed in the next release.",
        },
    )
    dgpo_entropy: str = field(
        default="normalized",
        metadata={
            "help": "Entropy units in the gate: 'normalized' (Eq. 12: s = d * (H / log V) ** kappa, in [0, 1]) or "
            "'nats' (Eq. 3: s = d * H ** kappa, H in nats; at the same tau, (log V) ** kappa times sharper).",
            "choices": list(ENTROPY_GATES),
        },
    )
    dgpo_chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE,
        metadata={
            "help": "Vocabulary tile width of the divergence pass: at most one tile of (tokens x chunk) logits per "
            "model exists at a time. Must be >= 1."
        },
    )

    dgpo_target_ess: float | None = field(
        default=None,
        metadata={
            "help": "Adaptive tau: pick tau per scored batch so that the weights' mean normalised effective sample "
            "size over completions with a nonzero advantage equals this value (bisection; logged as dgpo/tau). Falls "
            "back to dgpo_tau where no tau reaches it. Must be in (0, 1); None keeps dgpo_tau fixed."
        },
    )
    dgpo_skip_zero_advantage: bool = field(
        default=True,
        metadata={
            "help": "Skip the reference forward and divergence pass for completions with a zero sequence advantage "
            "(their per-token advantages are 0 anyway). Applies to loss-time scoring with beta == 0."
        },
    )

    def __post_init__(self):
        _apply_deprecated_score(self)
        settings = validate_dgpo_arguments(self)
        # Plain Python numbers from here on (a numpy float32 passed in would not serialize to JSON with the arguments)
        self.dgpo_tau, self.dgpo_kappa, self.dgpo_chunk_size = settings.tau, settings.kappa, settings.chunk_size
        self.dgpo_target_ess, self.dgpo_skip_zero_advantage = settings.target_ess, settings.skip_zero_advantage
        self.dgpo_uniform_weights = settings.uniform_weights
        check_cpu_fsdp_launch(self.use_cpu)  # before super() sets up accelerate's state: CPU FSDP, refused or patched
        super().__post_init__()


class DGPOArguments(NamedTuple):
    """The validated DGPO settings a trainer runs with."""

    tau: float
    kappa: float
    divergence: str
    entropy: str
    chunk_size: int
    target_ess: float | None
    skip_zero_advantage: bool
    uniform_weights: bool


def _apply_deprecated_score(args) -> None:
    """Maps the deprecated `dgpo_score` onto `dgpo_divergence` / `dgpo_uniform_weights`, with a warning, once."""
    score = getattr(args, "dgpo_score", None)
    if score is None:
        return
    if score == "uniform":
        replacement = "dgpo_uniform_weights=True"
        args.dgpo_uniform_weights = True
    elif score in DIVERGENCES:
        replacement = f"dgpo_divergence={score!r}"
        args.dgpo_divergence = score
    else:
        raise ValueError(
            f"dgpo_score (deprecated: use dgpo_divergence, one of {list(DIVERGENCES)}, or dgpo_uniform_weights=True) "
            f"must be one of {[*DIVERGENCES, 'uniform']}, got {_shown(score)}."
        )
    args.dgpo_score = None
    warnings.warn(
        f"dgpo_score is deprecated and will be removed in the next release: use {replacement} instead.",
        FutureWarning,
        stacklevel=_caller_stacklevel(),
    )


def validate_dgpo_arguments(args, warn: bool = True, fixed_uniform_weights: bool | None = None) -> DGPOArguments:
    """Checks DGPO's fields (and the TRL fields DGPO constrains) on a `DGPOConfig` or a plain `GRPOConfig`.

    A `GRPOConfig` has no `dgpo_*` fields and gets `DGPOConfig`'s defaults. Raises `ValueError` naming the field and
    its allowed values; warns when `beta > 0` keeps TRL's KL penalty on top of DGPO. `fixed_uniform_weights`: the
    value a built trainer fixed (it loaded a reference model or none), which `dgpo_uniform_weights` may no longer
    change.
    """
    _apply_deprecated_score(args)  # also when a callback sets it during training
    tau = getattr(args, "dgpo_tau", DGPOConfig.dgpo_tau)
    kappa = getattr(args, "dgpo_kappa", DGPOConfig.dgpo_kappa)
    divergence = getattr(args, "dgpo_divergence", DGPOConfig.dgpo_divergence)
    uniform_weights = getattr(args, "dgpo_uniform_weights", DGPOConfig.dgpo_uniform_weights)
    entropy = getattr(args, "dgpo_entropy", DGPOConfig.dgpo_entropy)
    chunk_size = getattr(args, "dgpo_chunk_size", DGPOConfig.dgpo_chunk_size)
    target_ess = getattr(args, "dgpo_target_ess", DGPOConfig.dgpo_target_ess)
    skip_zero_advantage = getattr(args, "dgpo_skip_zero_advantage", DGPOConfig.dgpo_skip_zero_advantage)
    if not _is_number(tau) or not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"dgpo_tau must be a finite number > 0, got {_shown(tau)}.")
    if not _is_number(kappa) or not (math.isfinite(kappa) and kappa >= 0):
        raise ValueError(f"dgpo_kappa must be a finite number >= 0, got {_shown(kappa)}.")
    if divergence not in DIVERGENCES:
        raise ValueError(f"dgpo_divergence must be one of {list(DIVERGENCES)}, got {_shown(divergence)}.")
    if not isinstance(uniform_weights, (bool, np.bool_)):
        raise ValueError(f"dgpo_uniform_weights must be True or False, got {_shown(uniform_weights)}.")
    if fixed_uniform_weights is not None and bool(uniform_weights) != fixed_uniform_weights:
        raise ValueError(
            f"dgpo_uniform_weights cannot change after the trainer is built (it loaded "
            f"{'no' if fixed_uniform_weights else 'a'} reference model for it), got {uniform_weights}. Build a new "
            "trainer instead."
        )
    if entropy not in ENTROPY_GATES:
        raise ValueError(f"dgpo_entropy must be one of {list(ENTROPY_GATES)}, got {_shown(entropy)}.")
    if not _is_integer(chunk_size) or chunk_size < 1:
        raise ValueError(f"dgpo_chunk_size must be an integer >= 1, got {_shown(chunk_size)}.")
    if target_ess is not None and not (_is_number(target_ess) and 0.0 < target_ess < 1.0):
        raise ValueError(f"dgpo_target_ess must be None or a number in (0, 1), got {_shown(target_ess)}.")
    if not isinstance(skip_zero_advantage, (bool, np.bool_)):
        raise ValueError(f"dgpo_skip_zero_advantage must be True or False, got {_shown(skip_zero_advantage)}.")
    if args.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {list(LOSS_TYPES)}, got {args.loss_type!r}.")
    weighted = not uniform_weights
    if weighted and args.importance_sampling_level == "sequence" and args.loss_type not in _TOKEN_GRADIENT_LOSSES:
        # With one ratio per sequence the loss is sum_t w_t * f(ratio_i, A_i) = T_i * f(ratio_i, A_i): the token
        # weights cancel, and DGPO would silently train exactly like its sequence-level baseline.
        raise ValueError(
            f"importance_sampling_level='sequence' with loss_type={args.loss_type!r} cancels DGPO's token weights "
            "(one importance ratio per sequence makes sum_t w_t * loss_i = T_i * loss_i). Use "
            "importance_sampling_level='token' (TRL's default) with a token-level loss such as loss_type='grpo', or "
            "dgpo_uniform_weights=True to train at sequence level without DGPO's weights."
        )
    if warn and args.beta != 0.0 and weighted:
        warnings.warn(
            f"beta={args.beta} adds TRL's KL penalty on top of DGPO's token reallocation. The DGPO paper drops the KL "
            "term (beta=0); keep beta > 0 only if you want both.",
            UserWarning,
            stacklevel=_caller_stacklevel(),
        )
    return DGPOArguments(
        float(tau),
        float(kappa),
        divergence,
        entropy,
        int(chunk_size),
        None if target_ess is None else float(target_ess),
        bool(skip_zero_advantage),
        bool(uniform_weights),
    )


# Frames a warning passes through on its way from the user's line: this package, the dataclass-generated __init__
# (file "<string>"), and the TRL/transformers layers a config or trainer is built through (HfArgumentParser, Trainer)
_LIBRARY_DIRS = tuple(
    os.path.dirname(module.__file__) + os.sep
    for module in (sys.modules[__package__], sys.modules["trl"], transformers)
)


def _caller_stacklevel() -> int:
    """The `stacklevel` that makes a warning raised by this module's caller point at the user's own line: the first
    frame outside dgpo_trl, TRL, transformers and generated dataclass code. Python 3.12's `skip_file_prefixes` does
    this, but the package supports 3.10."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        frame.f_code.co_filename.startswith(_LIBRARY_DIRS) or frame.f_code.co_filename == "<string>"
    ):
        frame, level = frame.f_back, level + 1
    return level


def _is_number(x) -> bool:
    # Any real number (numpy's float32 and int64 included), but not a bool, which Python counts as an int
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_integer(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _shown(x) -> str:
    """A value as an error message shows it: with its type when that is what is wrong (e.g. the string '0.5')."""
    if _is_number(x) or x is None or isinstance(x, (bool, np.bool_)):
        return repr(x)
    return f"{x!r} of type {type(x).__name__}"
