"""dgpo-trl: Distribution-Guided Policy Optimization (arXiv 2605.03327) for Hugging Face TRL.

`DGPOTrainer`/`DGPOConfig` are drop-in replacements for TRL's `GRPOTrainer`/`GRPOConfig`. The math lives in
`dgpo_trl.functional` and works on plain tensors; importing it (or this package) does not import TRL.
"""

from .functional import (
    SCORES,
    TokenStatistics,
    effective_sample_size,
    token_divergence_and_entropy,
    token_scores,
    token_statistics,
    token_statistics_reference,
    token_weights,
    weights_from_scores,
)


__version__ = "0.1.0"

__all__ = [
    "SCORES",
    "DGPOConfig",
    "DGPOTrainer",
    "TokenStatistics",
    "effective_sample_size",
    "token_divergence_and_entropy",
    "token_scores",
    "token_statistics",
    "token_statistics_reference",
    "token_weights",
    "weights_from_scores",
]


def __getattr__(name):
    # TRL takes seconds to import; only the trainer side needs it
    if name == "DGPOConfig":
        from .config import DGPOConfig

        return DGPOConfig
    if name == "DGPOTrainer":
        from .trainer import DGPOTrainer

        return DGPOTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
