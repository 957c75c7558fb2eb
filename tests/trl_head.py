"""Switches TRL's fused LM head to the positions it projects on a GPU, for tests on CPU.

TRL 1.16's fused LM head (`trl.trainer.utils.add_fused_lm_head`) asks `_use_triton(device)` which positions to
project: where Triton runs (CUDA, XPU) only the labelled ones ("compact"), elsewhere every position. On CPU the suite
would only ever run the every-position path. `compact_lm_head()` answers that question with "compact" while it is
active, so DGPO's exactness can be tested on the path GPU users run. Only that choice changes: the fold kernels read
their own `_use_triton` (in `trl.kernels.chunked_logprob`) and keep the torch tiles on CPU.

Worker processes switch it with the environment variable `DGPO_TEST_COMPACT_LM_HEAD=1` (`switch_from_environment`).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

ENVIRONMENT_VARIABLE = "DGPO_TEST_COMPACT_LM_HEAD"


@contextmanager
def compact_lm_head():
    """Inside the block TRL's fused LM head projects only labelled positions, as on a GPU. Yields the list of devices
    TRL asked about; fails when TRL never asked (its head no longer makes this choice: update this module)."""
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, "_use_triton", None)
    if not callable(original):
        raise AssertionError(
            "trl.trainer.utils._use_triton is gone: TRL's fused LM head chooses its positions otherwise"
        )
    asked = []

    def compact(device):
        asked.append(device)
        return True

    trl_utils._use_triton = compact
    try:
        yield asked
    finally:
        trl_utils._use_triton = original
    if not asked:
        raise AssertionError("TRL's fused LM head never asked _use_triton which positions to project")


def switch_from_environment():
    """In a worker process: enters `compact_lm_head()` for the rest of the process when the environment asks for it.
    Returns the context (exit it to check that TRL asked), or None."""
    if os.environ.get(ENVIRONMENT_VARIABLE, "0") != "1":
        return None
    context = compact_lm_head()
    context.__enter__()
    return context
