"""Training only the completions that carry signal (`dgpo_skip_zero_advantage`, `dgpo_trl.skipping`).

With a reward that makes 40% of the groups zero-advantage, three optimizer steps with gradient accumulation 2 give
the same parameters whether the zero-advantage rows are forwarded and back-propagated or skipped: to float32 rounding
in float32, and in float64 to 2.2e-16 (1e-8 where TRL's LM-head backward rounds to float32), for every loss type of
TRL 1.16, on the aligned path (statistics from the training forward) and the off-policy path (scoring-time
statistics). Each setting under which a zero-advantage row changes the update turns the skipping off (the update is
then the same as without it, bit for bit); a micro-batch with nothing to train trains nothing.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import cpu_args

from dgpo_trl import DGPOConfig, DGPOTrainer
from dgpo_trl.tasks import reversal_dataset

LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
PATHS = {"aligned": {}, "offpolicy": {"steps_per_generation": 4}}  # > gradient_accumulation_steps = 2
# float32: a few units of float32 rounding of the parameters (largest measured 5.4e-7, parameters up to ~1.5).
# float64: at most 2.2e-16, except where TRL's fused LM head shows through: its backward accumulates the head's
# gradient in float32 whatever the model's dtype (`ChunkedLogProbFunction.backward`), so summing over the kept rows
# instead of all rows (the others' terms exactly 0) rounds differently there: 9.5e-9 for sapo off-policy
TOLERANCE = {torch.float32: 1e-6, torch.float64: 2e-8}


class ZeroGroups:
    """A reward that makes exactly a fraction `zero` of the groups zero-advantage, whatever is generated: group g
    (counted over calls) is constant when floor((g + 1) zero) > floor(g zero); the others get distinct pseudo-random
    rewards seeded by g. Depends on the group index only, so every run sees the same rewards."""

    __name__ = "zero_groups"

    def __init__(self, zero: float, group: int):
        self.zero, self.group, self.groups_seen = zero, group, 0

    def __call__(self, completions, **kwargs):
        rewards = []
        for _ in range(len(completions) // self.group):
            g, self.groups_seen = self.groups_seen, self.groups_seen + 1
            constant = math.floor((g + 1) * self.zero) > math.floor(g * self.zero)
            rng = random.Random(g)
            rewards += [0.0] * self.group if constant else [rng.random() for _ in range(self.group)]
        return rewards


def history(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


def run(model_path, tmp_path, skip, dtype=torch.float32, zero=0.4, max_steps=3, **overrides):
    settings = dict(
        per_device_train_batch_size=10, num_generations=5, gradient_accumulation_steps=2, max_steps=max_steps,
        learning_rate=3e-3, lr_scheduler_type="constant", dgpo_tau=0.05, dgpo_skip_zero_advantage=skip,
        model_init_kwargs={"dtype": dtype},
    )  # fmt: skip
    settings.update(overrides)
    trainer = DGPOTrainer(model_path, ZeroGroups(zero, settings["num_generations"]),
                          args=DGPOConfig(**cpu_args(tmp_path / f"skip{skip}", **settings)),
                          train_dataset=reversal_dataset(200, seed=3))  # fmt: skip
    trainer.train()
    return trainer, {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_skipping_zero_advantage_rows_leaves_the_update_as_it_was(warm_model_path, tmp_path, loss_type, path, dtype):
    overrides = dict(loss_type=loss_type, **PATHS[path])
    skipped, skipped_params = run(warm_model_path, tmp_path, True, dtype, **overrides)
    full, full_params = run(warm_model_path, tmp_path, False, dtype, **overrides)
    fractions = history(skipped, "dgpo/trained_fraction")
    assert fractions and min(fractions) < 1.0  # rows were skipped
    assert history(full, "dgpo/trained_fraction") == [1.0] * len(fractions)
    difference = largest_difference(skipped_params, full_params)
    moved = largest_difference(full_params, run_initial(warm_model_path, dtype))
    print(
        f"\n[skipping] {loss_type} {path} {dtype}: largest parameter difference {difference:.1e} (moved {moved:.1e})"
    )
    assert moved > 1e-3 and difference <= TOLERANCE[dtype], (difference, moved)
    # The loss and TRL's clip-ratio metrics are the full batch's, to rounding; the trained fraction says what trained
    for key in ("loss", "clip_ratio/region_mean", "clip_ratio/low_min", "cispo_clip_ratio"):
        torch.testing.assert_close(torch.tensor(history(skipped, key)), torch.tensor(history(full, key)),
                                   rtol=1e-4, atol=1e-6, msg=key)  # fmt: skip


_INITIAL = {}


def run_initial(path, dtype):
    if (path, dtype) not in _INITIAL:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        _INITIAL[(path, dtype)] = {name: p.detach().clone() for name, p in model.named_parameters()}
    return _INITIAL[(path, dtype)]


def test_the_trained_fraction_is_the_nonzero_advantage_fraction(warm_model_path, tmp_path):
    """60% of the groups carry signal; every completion of those groups has a nonzero (distinct) reward."""
    trainer, _ = run(warm_model_path, tmp_path, True, zero=0.4, max_steps=2, gradient_accumulation_steps=1,
                     per_device_train_batch_size=25, logging_steps=1)  # fmt: skip
    assert history(trainer, "dgpo/trained_fraction") == [0.6, 0.6]


def test_a_micro_batch_with_nothing_to_train_trains_nothing(warm_model_path, tmp_path):
    """Every group constant: every micro-batch runs one row with its loss multiplied by 0 (a process still runs a
    forward and a backward, as collective engines need), and the parameters do not move."""
    trainer, params = run(warm_model_path, tmp_path, True, zero=1.0, max_steps=2, weight_decay=0.0)
    assert history(trainer, "dgpo/trained_fraction") == [0.0, 0.0]
    assert history(trainer, "loss") == [0.0, 0.0]
    assert largest_difference(params, run_initial(warm_model_path, torch.float32)) == 0.0


def _tiny_moe(path):
    """A tiny Qwen2-MoE: TRL adds its router load-balancing loss to the training loss (it asks for the router logits
    in its training forward; generation runs without them)."""
    import transformers

    from dgpo_trl.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = transformers.Qwen2MoeConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        num_experts=4, num_experts_per_tok=2, output_router_logits=False, router_aux_loss_coef=0.01,
        max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


BLOCKERS = {
    "beta": ({"beta": 0.04}, "beta=0.04"),
    "entropy_coef": ({"entropy_coef": 0.01}, "an entropy bonus"),
    "adaptive_entropy": ({"use_adaptive_entropy": True}, "an entropy bonus"),
    "top_entropy_quantile": ({"top_entropy_quantile": 0.5}, "top_entropy_quantile=0.5"),
    "router_aux_loss": ({}, "a router auxiliary loss"),
}


@pytest.mark.filterwarnings("ignore:beta=0.04 adds TRL's KL penalty")
@pytest.mark.parametrize("condition", list(BLOCKERS))
def test_each_setting_that_needs_every_row_turns_skipping_off(warm_model_path, tmp_path, condition, caplog):
    """Under each, a zero-advantage row changes the update: every row trains (dgpo/trained_fraction 1), the update is
    the one without skipping, bit for bit, and the warning names the condition."""
    import logging

    overrides, named = BLOCKERS[condition]
    model = _tiny_moe(tmp_path / "moe") if condition == "router_aux_loss" else warm_model_path
    with caplog.at_level(logging.WARNING, logger="dgpo_trl.skipping"):
        skipped, skipped_params = run(model, tmp_path, True, max_steps=2, **overrides)
    assert any(named in record.getMessage() and "every completion trains" in record.getMessage()
               for record in caplog.records), [r.getMessage() for r in caplog.records]  # fmt: skip
    assert history(skipped, "dgpo/trained_fraction") == [1.0, 1.0]
    _, full_params = run(model, tmp_path, False, max_steps=2, **overrides)
    assert largest_difference(skipped_params, full_params) == 0.0


def test_images_turn_skipping_off(tmp_path):
    """A batch with images cannot be split by completion (TRL's image tensors are not one row per completion)."""
    from test_architectures import _image_dataset

    from dgpo_trl.tiny import build_tiny_vlm, tiny_vlm_processor

    path = build_tiny_vlm(tmp_path / "vlm")
    dataset = _image_dataset(8, seed=0)
    args = DGPOConfig(**cpu_args(tmp_path / "out", per_device_train_batch_size=8, num_generations=4, max_steps=1,
                                 max_completion_length=4))  # fmt: skip
    trainer = DGPOTrainer(path, ZeroGroups(0.5, 4), args=args, train_dataset=dataset,
                          processing_class=tiny_vlm_processor(path))  # fmt: skip
    trainer.train()
    assert history(trainer, "dgpo/trained_fraction") == [1.0]
