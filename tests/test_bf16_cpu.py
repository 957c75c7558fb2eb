"""bf16 on a machine without a GPU: TRL's `bf16=True` default is refused unless `use_cpu=True`, which trains with bf16
autocast on the CPU (and with bf16 weights when the model is loaded so), for DGPOTrainer as for GRPOTrainer."""

import math

import pytest
import torch
from conftest import cpu_args
from toolkit_fixtures import length_reward
from trl import GRPOConfig, GRPOTrainer

from dgpo_trl import DGPOConfig, DGPOTrainer
from dgpo_trl.tasks import exact_match_reward, reversal_dataset


@pytest.mark.skipif(torch.cuda.is_available(), reason="bf16 without use_cpu is refused only where no GPU is found")
@pytest.mark.parametrize("config_class", [DGPOConfig, GRPOConfig])
def test_bf16_without_use_cpu_is_refused_without_a_gpu(tmp_path, config_class):
    with pytest.raises(ValueError, match="use_cpu"):
        config_class(**cpu_args(tmp_path, bf16=True))


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
@pytest.mark.parametrize("trainer_class", [DGPOTrainer, GRPOTrainer])
def test_bf16_with_use_cpu_trains_on_the_cpu(tiny_model_path, tmp_path, trainer_class, weights):
    config_class = DGPOConfig if trainer_class is DGPOTrainer else GRPOConfig
    args = config_class(**cpu_args(tmp_path, max_steps=2, bf16=True, use_cpu=True, learning_rate=1e-2,
                                   model_init_kwargs={"dtype": weights}))  # fmt: skip
    trainer = trainer_class(
        tiny_model_path, [length_reward, exact_match_reward], args=args, train_dataset=reversal_dataset(64)
    )
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.accelerator.mixed_precision == "bf16"
    assert next(trainer.model.parameters()).device.type == "cpu"
    assert next(trainer.model.parameters()).dtype == getattr(torch, weights)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) and math.isfinite(entry["grad_norm"]) for entry in logs)
    if trainer_class is DGPOTrainer:  # step 2's weights (after one update): finite, mean 1 per completion, not all 1
        shown = trainer.last_token_weights
        mask = shown["mask"].bool()
        assert torch.isfinite(shown["weights"][mask]).all() and logs[-1]["dgpo/weight/max"] > 1.0
        means = (shown["weights"] * mask).sum(-1) / mask.sum(-1)
        torch.testing.assert_close(means, torch.ones_like(means), rtol=0, atol=1e-5)
