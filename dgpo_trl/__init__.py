"""dgpo-trl: Distribution-Guided Policy Optimization (arXiv 2605.03327) for Hugging Face TRL.

`DGPOTrainer`/`DGPOConfig` are drop-in replacements for TRL's `GRPOTrainer`/`GRPOConfig`. The math lives in
`dgpo_trl.functional` and works on plain tensors; importing it (or this package) does not import TRL.
"""

import re
from importlib.metadata import PackageNotFoundError, version

SUPPORTED_TRL = "1.16"
"""The TRL release (major.minor) whose private `GRPOTrainer` methods `DGPOTrainer` overrides; as in pyproject.toml,
which says why 1.15 is not admitted."""
TRL_REQUIREMENT = "trl>=1.16.0,<1.17"


def _check_trl_version() -> None:
    # DGPOTrainer overrides GRPOTrainer internals that change between TRL releases: another release would fail deep
    # inside training, or silently compute something else. Read from the package metadata: TRL is not imported.
    try:
        installed = version("trl")
    except PackageNotFoundError:
        return  # the math needs no TRL; importing DGPOTrainer then says what is missing
    release = re.match(r"(\d+)\.(\d+)", installed)
    if release is None or f"{release[1]}.{release[2]}" != SUPPORTED_TRL:
        raise ImportError(
            f"dgpo-trl supports trl {SUPPORTED_TRL}.x (DGPOTrainer overrides private methods of that release's "
            f"GRPOTrainer), but trl {installed} is installed. Install a supported release: "
            f'pip install "{TRL_REQUIREMENT}".'
        )


_check_trl_version()

from .functional import (  # noqa: E402
    DIVERGENCES,
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
    "DIVERGENCES",
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
