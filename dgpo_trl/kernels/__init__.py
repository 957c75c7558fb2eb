"""GPU kernels for DGPO's divergence pass. Importing this package never fails: without Triton it exposes
`triton_available() == False` and `dgpo_trl.functional.token_statistics` keeps its torch tiles."""

from .divergence import (
    DEFAULT_CONFIG,
    TOKEN_CHUNK_SIZE,
    KernelConfig,
    fused_token_statistics,
    triton_available,
)

__all__ = ["DEFAULT_CONFIG", "TOKEN_CHUNK_SIZE", "KernelConfig", "fused_token_statistics", "triton_available"]
