"""FSDP launches on a host without an accelerator: an accelerate defect, refused early or worked around on request.

**The defect** (accelerate 1.15 and 1.16, `accelerate/state.py`): accelerate enables FSDP only on
top of an accelerator's distributed type.
1. `PartialState._prepare_backend` sets a distributed type in its `LOCAL_RANK` block only for an accelerator (CUDA,
   XPU, NPU, MLU, MUSA, SDAA, HPU, Neuron), or MULTI_CPU with `cpu=True`. On a CPU host without `use_cpu` the type is
   `DistributedType.NO`, yet `ddp_backend="gloo"` still makes `PartialState.__init__` initialise a process group of
   all the ranks.
2. `AcceleratorState.__init__` upgrades the type to `FSDP` only from an accelerator's type, never from MULTI_CPU or NO.
So an `accelerate launch` with an FSDP config (`accelerate_configs/cpu_fsdp2.yaml`) on CPU ranks shards nothing, and
under `NO` `accelerate.utils.gather` returns each rank's own tensor: TRL slices rank 1's rewards out of rank 0's alone,
rank 1 fails (TRL's `shuffle_sequence_dict`: "IndexError: index is out of bounds"; DGPO's token weights: "The size of
tensor a (0) must match the size of tensor b (16)"), and rank 0 logs metrics averaged with nothing (`dgpo/tau`
halved). With `use_cpu=True` the type is MULTI_CPU and accelerate silently trains with DDP instead.

**What dgpo-trl does.** `DGPOConfig.__post_init__` calls `check_cpu_fsdp_launch` on every rank, before accelerate sets
up its state. On such a launch it raises, naming the defect and the fix, unless the launch opted in with
`DGPO_PATCH_ACCELERATE_CPU_FSDP=1` in its environment: then `patch_accelerate_cpu_fsdp` does on CPU what accelerate
does on GPUs (the type is MULTI_CPU with gloo, as with `cpu=True`, and `AcceleratorState` upgrades it to FSDP with the
launch's FSDP plugin and mixed precision). On a host with an accelerator both do nothing.

A script that builds a plain `GRPOConfig` (no `DGPOConfig`) calls `check_cpu_fsdp_launch()` itself, before it creates
the config.
"""

from __future__ import annotations

import os

PATCH_VARIABLE = "DGPO_PATCH_ACCELERATE_CPU_FSDP"
_PATCHED = "_dgpo_cpu_fsdp_patch"  # marks accelerate's patched methods (the patch is applied once per process)


def _fsdp_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _accelerate_enables_fsdp(use_cpu: bool) -> bool:
    """Whether accelerate, unpatched, would run this launch under FSDP: its own backend choice (a pure function of
    the environment) is an accelerator's type, from which `AcceleratorState` upgrades to FSDP."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    prepare_backend = getattr(PartialState._prepare_backend, "__wrapped__", PartialState._prepare_backend)
    _, distributed_type = prepare_backend(object.__new__(PartialState), cpu=use_cpu)
    return distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU)


def patch_accelerate_cpu_fsdp() -> None:
    """Lets accelerate's FSDP plugin run on CPU ranks (gloo): the workaround for the defect in this module's docstring.

    Patches `PartialState._prepare_backend` (an FSDP launch's `DistributedType.NO` becomes MULTI_CPU with gloo) and
    `AcceleratorState.__init__` (MULTI_CPU with an FSDP plugin becomes FSDP, with the launch's mixed precision). Call
    it before anything creates accelerate's state (a `TrainingArguments`, `GRPOConfig` or `Accelerator`); applying it
    twice changes nothing. Launches on an accelerator are unaffected.
    """
    import functools

    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if getattr(PartialState._prepare_backend, _PATCHED, False):
        return
    if PartialState._shared_state.get("distributed_type") in (DistributedType.NO, DistributedType.MULTI_CPU) and (
        _fsdp_requested() and _world_size() > 1
    ):
        raise RuntimeError(
            "patch_accelerate_cpu_fsdp() came too late: accelerate's state was already set up without FSDP in this "
            "process (a TrainingArguments, GRPOConfig or Accelerator was created before it). Apply it first: set "
            f"{PATCH_VARIABLE}=1 and create the DGPOConfig first, or call patch_accelerate_cpu_fsdp() at the top of "
            "the script."
        )
    prepare_backend = PartialState._prepare_backend
    accelerator_state_init = AcceleratorState.__init__

    @functools.wraps(prepare_backend)
    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        backend, distributed_type = prepare_backend(self, cpu, sagemaker_dp, backend)
        if distributed_type == DistributedType.NO and _fsdp_requested() and _world_size() > 1:
            return backend or "gloo", DistributedType.MULTI_CPU
        return backend, distributed_type

    @functools.wraps(accelerator_state_init)
    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None and _fsdp_requested():
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            # As AcceleratorState.__init__ itself ends: every later PartialState/AcceleratorState() reads it there
            PartialState._shared_state["distributed_type"] = self.distributed_type

    setattr(_prepare_backend, _PATCHED, True)
    setattr(__init__, _PATCHED, True)
    PartialState._prepare_backend = _prepare_backend
    AcceleratorState.__init__ = __init__


def check_cpu_fsdp_launch(use_cpu: bool = False) -> None:
    """On a multi-process FSDP launch that accelerate would not run under FSDP (a host without an accelerator):
    applies `patch_accelerate_cpu_fsdp` when the launch opted in (`DGPO_PATCH_ACCELERATE_CPU_FSDP=1`), and raises
    otherwise, on every rank, before any process group or model exists. Does nothing on any other launch."""
    if not (_fsdp_requested() and _world_size() > 1):
        return
    if os.environ.get(PATCH_VARIABLE, "0").lower() in ("1", "true", "yes"):
        patch_accelerate_cpu_fsdp()
        return
    if _accelerate_enables_fsdp(use_cpu):
        return
    import accelerate

    consequence = (
        "it would silently train with DDP, unsharded"
        if use_cpu
        else "nothing would be sharded and each rank would see only its own rewards: every rank but the first "
        "would fail, and the first would train alone"
    )
    raise RuntimeError(
        f"Rank {os.environ.get('RANK', '?')} of an FSDP launch (ACCELERATE_USE_FSDP=true, {_world_size()} "
        f"processes) on a host without an accelerator, where accelerate {accelerate.__version__} never enables FSDP "
        f"(a defect in accelerate/state.py: PartialState picks DistributedType.{'MULTI_CPU' if use_cpu else 'NO'}, "
        f"and AcceleratorState upgrades only an accelerator's type to FSDP); {consequence}. Fix: set "
        f"{PATCH_VARIABLE}=1 in the launch's environment (dgpo_trl.accelerate_cpu_fsdp then enables FSDP over gloo "
        'on every rank, as accelerate does on GPUs; docs/distributed.md, "FSDP2"), or launch with a CPU config '
        "without FSDP (accelerate_configs/cpu_zero3.yaml, cpu_ddp.yaml)."
    )
