"""Test harness only: lets accelerate's FSDP plugin run on CPU ranks (gloo), for the FSDP2 launches of the suite.

Put this directory on PYTHONPATH of an `accelerate launch --config_file accelerate_configs/cpu_fsdp2.yaml ...`; the
interpreter of every rank imports it at start-up (Python's `sitecustomize` hook), before the script runs.

Why (accelerate 1.15.0, `accelerate/state.py`): on a host without an accelerator, `PartialState._prepare_backend`
returns `DistributedType.NO` unless `cpu=True` (no branch of its `LOCAL_RANK` block matches, and its MULTI_CPU
fallback needs `cpu`), yet `ddp_backend="gloo"` still makes it initialise a 2-rank process group. Then
`AcceleratorState.__init__` upgrades to `DistributedType.FSDP` only from a GPU-like distributed type (MULTI_GPU, XPU,
NPU, ...; never MULTI_CPU), so FSDP is never enabled: the models are not sharded, and `accelerate.utils.gather`, a
no-op under `NO`, returns each rank's own rewards. TRL then slices rank 1's part out of a tensor that holds rank 0's
only, and rank 1 fails with an empty batch (`IndexError` in `shuffle_sequence_dict`). With `use_cpu=True` the type is
MULTI_CPU and accelerate silently runs DDP instead.

The patch does on CPU what accelerate does on GPUs: the distributed type is MULTI_CPU (as with `cpu=True`: gloo, CPU
device), and AcceleratorState upgrades it to FSDP with the launch's FSDP plugin. Nothing in `dgpo_trl` depends on it.
"""

import os


if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and os.environ.get("LOCAL_RANK") is not None:
    import torch

    if not torch.cuda.is_available():
        from accelerate.state import AcceleratorState, PartialState
        from accelerate.utils import DistributedType

        _prepare_backend = PartialState._prepare_backend

        def _cpu_backend(self, cpu=False, sagemaker_dp=False, backend=None):
            backend, distributed_type = _prepare_backend(self, cpu, sagemaker_dp, backend)
            if distributed_type == DistributedType.NO:
                return backend or "gloo", DistributedType.MULTI_CPU
            return backend, distributed_type

        _accelerator_state_init = AcceleratorState.__init__

        def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
            _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
            if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
                self.distributed_type = DistributedType.FSDP
                if self._mixed_precision != "no":
                    fsdp_plugin.set_mixed_precision(self._mixed_precision)
                self.fsdp_plugin = fsdp_plugin
                # as AcceleratorState.__init__ itself ends: every later PartialState/AcceleratorState() reads it there
                PartialState._shared_state["distributed_type"] = self.distributed_type

        PartialState._prepare_backend = _cpu_backend
        AcceleratorState.__init__ = _fsdp_on_cpu
