"""DGPOTrainer on tiny offline models: drop-in use, equivalences with GRPO, weights, PEFT, resume, robustness."""

import gc
import math
import textwrap

import numpy as np
import pytest
import torch
from conftest import cpu_args
from trl import GRPOConfig, GRPOTrainer

from dgpo_trl import DGPOConfig, DGPOTrainer, token_statistics_reference, token_weights
from dgpo_trl.functional import TokenStatistics
from dgpo_trl.tasks import exact_match_reward


def prompts(rows):
    """The prompt fields of a hand-built batch (TRL's batches always carry them)."""
    return {"prompt_ids": torch.zeros(rows, 2, dtype=torch.long), "prompt_mask": torch.ones(rows, 2, dtype=torch.long)}


def history(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


def train(cls, config_cls, model, dataset, output_dir, peft_config=None, **overrides):
    trainer = cls(
        model,
        exact_match_reward,
        args=config_cls(**cpu_args(output_dir, **overrides)),
        train_dataset=dataset,
        peft_config=peft_config,
    )
    trainer.train()
    return trainer


def test_trl_quickstart_runs_with_only_the_class_names_changed(tiny_model_path, reversal_train_dataset, tmp_path):
    # TRL's GRPO quick-start, with a local tiny model and dataset and CPU settings
    quickstart = textwrap.dedent(
        """
        from trl import GRPOConfig, GRPOTrainer

        training_args = GRPOConfig(output_dir=OUTPUT_DIR, bf16=False, max_steps=2, per_device_train_batch_size=8,
                                   num_generations=4, max_completion_length=8, report_to="none")
        trainer = GRPOTrainer(model=MODEL, reward_funcs=exact_match_reward, args=training_args,
                              train_dataset=dataset)
        trainer.train()
        """
    )
    for source in (quickstart, quickstart.replace("GRPO", "DGPO").replace("from trl import", "from dgpo_trl import")):
        scope = {
            "OUTPUT_DIR": str(tmp_path / "out"),
            "MODEL": tiny_model_path,
            "dataset": reversal_train_dataset,
            "exact_match_reward": exact_match_reward,
        }
        exec(source, scope)
        assert scope["trainer"].state.global_step == 2
    assert type(scope["trainer"]).__name__ == "DGPOTrainer"
    assert "dgpo/tau" in scope["trainer"].state.log_history[0]


def test_parameters_change_and_metrics_are_logged(warm_model_path, reversal_train_dataset, tmp_path):
    trainer = DGPOTrainer(
        warm_model_path,
        exact_match_reward,
        args=DGPOConfig(**cpu_args(tmp_path, max_steps=3)),
        train_dataset=reversal_train_dataset,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert all(not p.requires_grad for p in ref.parameters())
    assert all(torch.equal(p, before[n]) for n, p in ref.named_parameters())  # the reference stays frozen
    logged = trainer.state.log_history[0]
    for key in [
        "dgpo/divergence/mean",
        "dgpo/divergence/max",
        "dgpo/entropy_normalized/mean",
        "dgpo/score/mean",
        "dgpo/weight/max",
        "dgpo/weight/std",
        "dgpo/ess",
        "dgpo/reverse_kl/mean",
        "dgpo/nonfinite_sequences",
        "dgpo/tau",
        "dgpo/scored_fraction",
    ]:
        assert key in logged, key
    # step 1: pi_theta == pi_ref, so d = 0 and the weights are uniform
    assert logged["dgpo/divergence/max"] == 0.0 and logged["dgpo/ess"] == 1.0 and logged["dgpo/weight/max"] == 1.0
    assert max(history(trainer, "dgpo/divergence/max")) > 0.0


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_step_one_equals_grpo_then_reweighting_changes_the_gradient(
    warm_model_path, reversal_train_dataset, tmp_path, gradient_checkpointing
):
    # TRL enables gradient checkpointing by default; DGPO reads the policy's hidden states from that forward
    kw = dict(max_steps=2, gradient_checkpointing=gradient_checkpointing)
    grpo = train(GRPOTrainer, GRPOConfig, warm_model_path, reversal_train_dataset, tmp_path / "g", **kw)
    # Every row trains, as GRPO's (skipped rows give the same update to float32 rounding: test_row_skipping.py)
    dgpo = train(
        DGPOTrainer,
        DGPOConfig,
        warm_model_path,
        reversal_train_dataset,
        tmp_path / "d",
        dgpo_tau=0.02,
        dgpo_skip_zero_advantage=False,
        **kw,
    )
    # Step 1: pi_theta == pi_ref -> w == 1 exactly -> the same loss and gradient as GRPO with beta = 0
    for key in ("loss", "grad_norm", "reward"):
        assert history(dgpo, key)[0] == history(grpo, key)[0], key
    assert history(grpo, "grad_norm")[0] > 0
    # Step 2: same parameters, same completions (identical rewards), but d > 0 now reweights the tokens
    assert history(dgpo, "reward")[1] == history(grpo, "reward")[1]
    assert history(dgpo, "dgpo/weight/std")[1] > 0.01
    assert not math.isclose(history(dgpo, "grad_norm")[1], history(grpo, "grad_norm")[1], rel_tol=1e-4)


def test_uniform_score_reproduces_grpo_without_kl(warm_model_path, reversal_train_dataset, tmp_path):
    kw = dict(max_steps=3)
    grpo = train(GRPOTrainer, GRPOConfig, warm_model_path, reversal_train_dataset, tmp_path / "g", **kw)
    dgpo = train(
        DGPOTrainer,
        DGPOConfig,
        warm_model_path,
        reversal_train_dataset,
        tmp_path / "d",
        dgpo_uniform_weights=True,
        dgpo_skip_zero_advantage=False,
        **kw,
    )
    assert dgpo.ref_model is None  # no reference is loaded for the sanity switch
    for key in ("loss", "grad_norm", "reward"):
        assert history(dgpo, key) == history(grpo, key), key


def test_peft_reference_is_the_adapter_disabled_model(warm_model_path, reversal_train_dataset, tmp_path):
    from peft import LoraConfig
    from transformers import LlamaForCausalLM

    lora = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "up_proj"])
    trainer = train(
        DGPOTrainer,
        DGPOConfig,
        warm_model_path,
        reversal_train_dataset,
        tmp_path,
        peft_config=lora,
        max_steps=3,
        learning_rate=3e-3,
        dgpo_skip_zero_advantage=False,
        gradient_checkpointing=True,
    )
    assert trainer.ref_model is None
    gc.collect()
    assert sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects()) == 1  # no second model in memory
    divergence = history(trainer, "dgpo/divergence/max")
    assert divergence[0] == 0.0  # fresh LoRA (B = 0): the policy equals the base model
    assert divergence[-1] > 0.0  # trained adapter vs disabled adapter


def test_pretrained_adapter_gets_a_frozen_ref_copy_when_beta_is_zero(
    warm_model_path, reversal_train_dataset, tmp_path
):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(warm_model_path), LoraConfig(r=4, init_lora_weights=False)
    )
    args = DGPOConfig(**cpu_args(tmp_path, max_steps=1, dgpo_skip_zero_advantage=False))
    trainer = DGPOTrainer(model, exact_match_reward, args=args, train_dataset=reversal_train_dataset)
    assert "ref" in trainer.model.peft_config  # the initial policy, not the base model, is the reference
    trainer.train()
    assert history(trainer, "dgpo/divergence/max")[0] == 0.0


def test_weights_are_computed_once_and_stay_fixed_across_iterations(warm_model_path, reversal_train_dataset, tmp_path):
    # Loss-time path (aligned: 4 accumulation steps = 2 micro-batches x 2 iterations) and scoring-time path
    for name, kw in {
        "loss_time": dict(num_iterations=2, steps_per_generation=2, gradient_accumulation_steps=4),
        "scoring_time": dict(num_iterations=2, steps_per_generation=2, gradient_accumulation_steps=1, max_steps=4),
    }.items():
        kw.setdefault("max_steps", 2)
        trainer = DGPOTrainer(
            warm_model_path,
            exact_match_reward,
            args=DGPOConfig(**cpu_args(tmp_path / name, per_device_train_batch_size=16, dgpo_tau=0.05, **kw)),
            train_dataset=reversal_train_dataset,
        )
        weighted, seen = [], {}
        apply, compute_loss = trainer._apply_token_weights, trainer._compute_loss

        def spy_apply(inputs, stats, rows, apply=apply):
            weighted.append(id(inputs))
            return apply(inputs, stats, rows)

        def spy_loss(model, inputs, compute_loss=compute_loss):
            loss = compute_loss(model, inputs)
            seen.setdefault(id(inputs), []).append(inputs["advantages"].clone())
            return loss

        trainer._apply_token_weights, trainer._compute_loss = spy_apply, spy_loss
        trainer.train()
        uses = list(seen.values())
        assert all(len(u) == 2 for u in uses), name  # every micro-batch is trained on twice
        for first, second in uses:
            assert first.dim() == 2 and torch.equal(first, second), name
        if name == "loss_time":
            assert len(weighted) == len(uses)  # once per micro-batch, on its first use
        else:
            assert len(weighted) == len(uses) // 2  # once per generation batch (2 micro-batches each)


@pytest.mark.parametrize("entropy_gate", ["normalized", "nats"])
def test_scoring_time_pass_returns_trls_old_logps_and_reference_logps(
    warm_model_path, reversal_train_dataset, tmp_path, monkeypatch, entropy_gate
):
    import trl.trainer.utils

    trainer = DGPOTrainer(
        warm_model_path,
        exact_match_reward,
        args=DGPOConfig(
            **cpu_args(tmp_path, steps_per_generation=2, beta=0.04, max_steps=1, dgpo_entropy=entropy_gate)
        ),
        train_dataset=reversal_train_dataset,
    )
    trainer.train()  # one step moves the policy away from the reference
    batch = [reversal_train_dataset[i // 8] for i in range(32)]
    # TRL's fused LM head computes every log-prob TRL receives: its pi_old forward, and DGPO's reference forward
    # (beta > 0), one chunk of 32 rows each
    projections = []
    fused = trl.trainer.utils._ChunkedLogProbFunction
    monkeypatch.setattr(fused, "apply", lambda *args, apply=fused.apply: projections.append(1) or apply(*args))
    output = trainer._generate_and_score_completions(batch)
    assert projections == [1, 1]
    monkeypatch.undo()
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    width = output["completion_ids"].size(1)
    mask = output["completion_mask"].bool()
    with torch.no_grad():
        policy_logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.model, ids, attention, width
        )
        ref_logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, trainer.ref_model, ids, attention, width
        )
    assert torch.equal(output["old_per_token_logps"][mask], policy_logps[mask])
    assert torch.equal(output["ref_per_token_logps"][mask], ref_logps[mask])
    assert (policy_logps - ref_logps)[mask].abs().max() > 1e-3
    # The weights are DGPO's, from full-vocabulary distributions of the two models
    assert output["advantages"].shape == mask.shape
    policy = trainer.accelerator.unwrap_model(trainer.model)
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    with torch.no_grad():
        hp = policy.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, -width - 1 : -1]
        hq = ref.model(input_ids=ids, attention_mask=attention).last_hidden_state[:, -width - 1 : -1]
    naive = token_statistics_reference(
        hp.reshape(-1, hp.size(-1)),
        policy.lm_head.weight,
        hq.reshape(-1, hq.size(-1)),
        ref.lm_head.weight,
        temperature=trainer.temperature,
    )
    w = token_weights(
        naive.hellinger.view(mask.shape),
        naive.entropy.view(mask.shape),
        mask,
        tau=0.5,
        kappa=1.0,
        vocab_size=policy.config.vocab_size,
        entropy_gate=entropy_gate,
    )
    informative = output["advantages"].abs().sum(-1) > 0
    sequence_advantage = output["advantages"].sum(-1) / mask.sum(-1)  # mean weight 1 recovers A_i
    expected = sequence_advantage.unsqueeze(1) * w
    torch.testing.assert_close(output["advantages"][informative], expected[informative], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
def test_every_trl_loss_type_trains(warm_model_path, reversal_train_dataset, tmp_path, loss_type):
    trainer = train(
        DGPOTrainer,
        DGPOConfig,
        warm_model_path,
        reversal_train_dataset,
        tmp_path,
        loss_type=loss_type,
        max_steps=2,
        dgpo_tau=0.05,
    )
    losses = history(trainer, "loss")
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert history(trainer, "dgpo/weight/std")[1] > 0


def test_reverse_kl_ablation_and_adaptive_tau(warm_model_path, reversal_train_dataset, tmp_path):
    rkl = train(
        DGPOTrainer,
        DGPOConfig,
        warm_model_path,
        reversal_train_dataset,
        tmp_path / "rkl",
        dgpo_divergence="reverse_kl",
        max_steps=2,
    )
    # the score is the exact reverse KL, which the Hellinger run logs only for monitoring
    assert history(rkl, "dgpo/divergence/mean")[1] == history(rkl, "dgpo/reverse_kl/mean")[1] > 0
    taus_by_gate = {}
    for gate in ("normalized", "nats"):
        adaptive = train(
            DGPOTrainer,
            DGPOConfig,
            warm_model_path,
            reversal_train_dataset,
            tmp_path / gate,
            dgpo_target_ess=0.7,
            max_steps=3,
            dgpo_entropy=gate,
        )
        taus = taus_by_gate[gate] = history(adaptive, "dgpo/tau")
        assert taus[0] == 0.5  # step 1: flat scores (d = 0), no tau reaches the target: the fixed tau is used
        assert all(math.isfinite(t) and t > 0 for t in taus) and taus[-1] != 0.5
        assert history(adaptive, "dgpo/ess")[-1] == pytest.approx(0.7, abs=0.05)
    # Same target, scores (log V) times larger in nats (kappa = 1): tau follows, up to the batch's own numerics
    ratio = taus_by_gate["nats"][-1] / taus_by_gate["normalized"][-1]
    assert ratio == pytest.approx(math.log(adaptive._vocab_size), rel=0.1)


@pytest.mark.parametrize("path", ["loss_time", "scoring_time"])
def test_the_entropy_mask_gets_each_completions_whole_weight(warm_model_path, reversal_train_dataset, tmp_path, path):
    # TRL's top_entropy_quantile trains only the highest-entropy tokens (here the top half); DGPO puts each
    # completion's weight on those: w_t = K_i * softmax over the K_i kept tokens (DGPO's weights renormalised there), 0
    # elsewhere. A completion with one kept token gets weight 1 there whatever DGPO's scores, exactly GRPO's: with the
    # top 20% of these 4-7-token completions that was every completion of a step on some CPUs, so the test keeps half
    kw = dict(top_entropy_quantile=0.5, max_steps=2, gradient_checkpointing=False)
    if path == "scoring_time":  # old log-probs at generation time; the second generation batch is at step 3
        kw.update(steps_per_generation=2, max_steps=3)
    grpo = train(GRPOTrainer, GRPOConfig, warm_model_path, reversal_train_dataset, tmp_path / "g", **kw)
    trainer = DGPOTrainer(
        warm_model_path,
        exact_match_reward,
        train_dataset=reversal_train_dataset,
        args=DGPOConfig(**cpu_args(tmp_path / "d", dgpo_tau=0.01, dgpo_kappa=0.0, **kw)),
    )
    records, current = [], {}
    compute_loss, high_entropy_mask = trainer._compute_loss, trainer.get_high_entropy_mask

    def spy_loss(model, inputs):
        current["inputs"] = inputs
        return compute_loss(model, inputs)

    def spy_mask(entropies, mask, threshold):
        inputs = current["inputs"]
        dgpo_advantages = inputs["advantages"].clone()  # A_i * w_t, w averaging 1 over the valid tokens
        sequence_advantages = dgpo_advantages.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)
        kept = high_entropy_mask(entropies, mask, threshold)
        # DGPO's weights, and those TRL's loss reads right after the mask
        records.append(
            (
                trainer.state.global_step,
                kept,
                mask.bool(),
                dgpo_advantages / sequence_advantages,
                inputs["advantages"] / sequence_advantages,
            )
        )
        return kept

    trainer._compute_loss, trainer.get_high_entropy_mask = spy_loss, spy_mask
    trainer.train()
    # Step 1: pi_theta == pi_ref, uniform weights: exactly GRPO under the same mask
    for key in ("loss", "grad_norm"):
        assert history(trainer, key)[0] == history(grpo, key)[0], key
    reallocated = checked = 0
    for step, kept, valid, before, after in records:
        for i in range(len(kept)):
            if not kept[i].any() or not torch.isfinite(after[i]).all():  # A_i = 0: no weight to place
                continue
            checked += 1
            assert (after[i][~kept[i]] == 0).all()  # masked tokens: no weight, so the largest is a kept token
            assert after[i][kept[i]].mean().item() == pytest.approx(1.0, abs=1e-5)  # K_i in all: GRPO's mass
            # DGPO's own weights, renormalised over the kept tokens
            ratio = after[i][kept[i]] / before[i][kept[i]]
            torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-4, atol=0)
            reallocated += step > 0 and bool(after[i][kept[i]].std() > 0.05)  # unequal weights on >= 2 kept tokens
    assert checked >= 10 and reallocated >= 3  # weights that were really reallocated, not only uniform ones
    assert history(trainer, "grad_norm")[-1] != history(grpo, "grad_norm")[-1]


def test_eval_dataset_is_scored_with_dgpo(warm_model_path, reversal_train_dataset, tmp_path):
    trainer = DGPOTrainer(
        warm_model_path,
        exact_match_reward,
        args=DGPOConfig(
            **cpu_args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=16)
        ),
        train_dataset=reversal_train_dataset,
        eval_dataset=reversal_train_dataset.select(range(8)),
    )
    trainer.train()
    evaluated = [row for row in trainer.state.log_history if "eval_loss" in row]
    assert evaluated and math.isfinite(evaluated[0]["eval_loss"]) and "eval_dgpo/tau" in evaluated[0]


def test_checkpoint_resume_gives_the_same_next_step(warm_model_path, reversal_train_dataset, tmp_path):
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, dgpo_tau=0.05)
    full = train(DGPOTrainer, DGPOConfig, warm_model_path, reversal_train_dataset, tmp_path / "full", **kw)
    resumed = DGPOTrainer(
        warm_model_path,
        exact_match_reward,
        args=DGPOConfig(**cpu_args(tmp_path / "resumed", **kw)),
        train_dataset=reversal_train_dataset,
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))

    def after_resume(trainer, key):
        return [row[key] for row in trainer.state.log_history if key in row and row["step"] > 2]

    assert len(after_resume(full, "loss")) == 2
    assert max(map(abs, after_resume(full, "loss") + after_resume(full, "grad_norm"))) > 0  # the steps do something
    for key in ("loss", "grad_norm", "reward", "dgpo/weight/std"):
        assert after_resume(resumed, key) == pytest.approx(after_resume(full, key), rel=1e-6, abs=1e-9), key


def test_nonfinite_statistics_never_reach_the_loss(warm_model_path, reversal_train_dataset, tmp_path, monkeypatch):
    import dgpo_trl.scoring as scoring_module

    real = scoring_module.token_statistics

    def poisoned(*args, **kwargs):
        stats = real(*args, **kwargs)
        hellinger = stats.hellinger.clone()
        hellinger[0] = float("nan")  # e.g. a bf16 overflow in one logit tile
        return stats._replace(hellinger=hellinger)

    monkeypatch.setattr(scoring_module, "token_statistics", poisoned)
    trainer = train(DGPOTrainer, DGPOConfig, warm_model_path, reversal_train_dataset, tmp_path, max_steps=2)
    assert all(math.isfinite(x) for x in history(trainer, "loss") + history(trainer, "grad_norm"))
    assert all(n >= 1 for n in history(trainer, "dgpo/nonfinite_sequences")[1:])


def test_tool_tokens_get_no_weight_and_do_not_count(warm_model_path, reversal_train_dataset, tmp_path):
    trainer = DGPOTrainer(
        warm_model_path,
        exact_match_reward,
        args=DGPOConfig(**cpu_args(tmp_path, dgpo_tau=0.1)),
        train_dataset=reversal_train_dataset,
    )
    g = torch.Generator().manual_seed(0)
    shape = (3, 6)
    stats = TokenStatistics(*(torch.rand(shape, generator=g) * 3 for _ in TokenStatistics._fields))
    inputs = {
        **prompts(3),
        "completion_ids": torch.zeros(shape, dtype=torch.long),
        "completion_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]),
        "tool_mask": torch.tensor([[1, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]),
        "advantages": torch.tensor([2.0, -1.0, 0.5]),
    }
    trainer._apply_token_weights(inputs, stats, torch.arange(3))
    per_token = inputs["advantages"]
    valid = torch.tensor([[1, 0, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]).bool()
    assert (per_token[~valid] == 0).all()
    # T_i counts the model's own tokens only: 3 in row 0, so the mean weight over them is exactly 1
    assert per_token[0][valid[0]].sum().item() == pytest.approx(2.0 * 3)
    assert per_token[1][valid[1]].sum().item() == pytest.approx(-1.0 * 3)
    assert torch.isfinite(per_token).all()


def _in_memory_model(path, kind):
    """A model object that differs from what its config's path holds, as a user's SFT or merge before RL leaves it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind == "noised":
        model = AutoModelForCausalLM.from_pretrained(path)
        torch.manual_seed(1)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
        return model
    torch.manual_seed(2)  # "fresh": a random model built from the saved config, which still names the path
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


@pytest.mark.filterwarnings("ignore:beta=0.04 adds TRL's KL penalty")
@pytest.mark.parametrize(("kind", "beta"), [("noised", 0.0), ("fresh", 0.0), ("noised", 0.04)])
def test_the_reference_of_a_model_passed_as_an_object_is_a_copy_of_it(
    warm_model_path, reversal_train_dataset, tmp_path, kind, beta
):
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    model = _in_memory_model(warm_model_path, kind)
    passed = {name: param.detach().clone() for name, param in model.named_parameters()}
    trainer = DGPOTrainer(
        model,
        exact_match_reward,
        train_dataset=reversal_train_dataset,
        args=DGPOConfig(**cpu_args(tmp_path, max_steps=1, beta=beta, dgpo_skip_zero_advantage=False)),
        processing_class=PreTrainedTokenizerFast.from_pretrained(warm_model_path),
    )
    reference = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert reference is not trainer.accelerator.unwrap_model(trainer.model)
    assert all(torch.equal(param, passed[name]) for name, param in reference.named_parameters())
    gc.collect()
    assert sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects()) == 2  # the policy and one copy
    trainer.train()
    # Step 1: pi_theta == pi_ref exactly, so d = 0 and the weights are uniform (reloading the path gave d ~ 0.006-0.03)
    assert history(trainer, "dgpo/divergence/max") == [0.0]
    assert history(trainer, "dgpo/weight/std") == [0.0]
    if beta:
        assert history(trainer, "kl")[0] < 1e-9  # TRL's KL term uses DGPO's reference too


def test_a_model_that_cannot_be_copied_gets_a_clear_error(tiny_model_path, reversal_train_dataset, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_model_path)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model_path))
    quantized = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    quantized.is_loaded_in_4bit = True  # what bitsandbytes sets on a 4-bit model
    for model, message in [(meta, "meta device"), (quantized, "quantized model cannot be copied.*peft_config")]:
        with pytest.raises(ValueError, match=message):
            DGPOTrainer(
                model,
                exact_match_reward,
                args=DGPOConfig(**cpu_args(tmp_path)),
                train_dataset=reversal_train_dataset,
                processing_class=tokenizer,
            )


def test_a_dataset_without_a_prompt_column_fails_at_construction(tiny_model_path, tmp_path):
    from datasets import Dataset

    questions = Dataset.from_dict({"question": ["r12>"] * 4, "answer": ["21"] * 4})
    with pytest.raises(ValueError, match=r"train_dataset has no 'prompt' column.*\['question', 'answer'\]"):
        DGPOTrainer(
            tiny_model_path, exact_match_reward, args=DGPOConfig(**cpu_args(tmp_path)), train_dataset=questions
        )
    prompts = questions.rename_column("question", "prompt")
    with pytest.raises(ValueError, match=r"eval_dataset\['held_out'\] has no 'prompt' column"):
        DGPOTrainer(
            tiny_model_path,
            exact_match_reward,
            args=DGPOConfig(**cpu_args(tmp_path)),
            train_dataset=prompts,
            eval_dataset={"held_out": questions},
        )


def test_an_empty_dataset_is_called_empty(tiny_model_path, reversal_train_dataset, tmp_path):
    from datasets import Dataset

    # GRPOTrainer would train zero steps (or evaluate nothing) without a word; a filter that removed every row
    for empty in (Dataset.from_list([]), Dataset.from_dict({"prompt": [], "answer": []})):
        with pytest.raises(ValueError, match=r"^train_dataset is empty \(0 rows\): there is nothing to train on"):
            DGPOTrainer(
                tiny_model_path, exact_match_reward, args=DGPOConfig(**cpu_args(tmp_path)), train_dataset=empty
            )
        with pytest.raises(ValueError, match=r"^eval_dataset\['held_out'\] is empty \(0 rows\)"):
            DGPOTrainer(
                tiny_model_path,
                exact_match_reward,
                args=DGPOConfig(**cpu_args(tmp_path)),
                train_dataset=reversal_train_dataset,
                eval_dataset={"held_out": empty},
            )


class _ScoredEnvironment:  # owns its reward
    def reset(self, **kwargs): ...

    def act(self, x: int) -> int:
        """
        Act.

        Args:
            x: A value.

        Returns:
            The value.
        """
        return x

    def get_reward(self) -> float:
        return 1.0


class _PlainEnvironment:  # no `get_reward`; scored by `reward_funcs`
    def reset(self, **kwargs): ...

    def play(self, x: int) -> int:
        """
        Play.

        Args:
            x: A value.

        Returns:
            The value.
        """
        return x


def _length_mod_3(completions, **kwargs):
    return [float(len(str(completion)) % 3) for completion in completions]


@pytest.mark.parametrize("trainer_cls", [GRPOTrainer, DGPOTrainer])
def test_trls_environment_owned_reward_mixed_environments_case(tiny_model_path, tmp_path, trainer_cls):
    # TRL 1.16's tests/test_grpo_trainer.py::test_environment_owned_reward_mixed_environments, on a local tiny model
    # (whose tokenizer gets TRL's Qwen3 chat template, which renders tool calls), then trained for two steps: the
    # dataset has only an `environment` column, and each rollout's environment builds the prompt.
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast
    from trl.chat_template_utils import qwen3_chat_template

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_model_path)
    tokenizer.chat_template = qwen3_chat_template
    dataset = Dataset.from_dict({"environment": ["scored", "scored2", "plain"]})
    config_cls = GRPOConfig if trainer_cls is GRPOTrainer else DGPOConfig
    trainer = trainer_cls(
        model=tiny_model_path,
        reward_funcs=_length_mod_3,
        args=config_cls(**cpu_args(tmp_path, per_device_train_batch_size=3, num_generations=3)),
        train_dataset=dataset,
        processing_class=tokenizer,
        # `scored` and `scored2` both build `_ScoredEnvironment`, so they must collapse to a single reward column
        environment_factory={"scored": _ScoredEnvironment, "scored2": _ScoredEnvironment, "plain": _PlainEnvironment},
    )
    assert trainer.reward_func_names == ["_length_mod_3", "_ScoredEnvironment"]
    assert trainer.reward_weights.tolist() == [1.0, 1.0]
    env_reward_func = trainer.reward_funcs[-1]
    assert env_reward_func(environments=[_ScoredEnvironment(), _PlainEnvironment()]) == [1.0, None]
    trainer.train()
    assert trainer.state.global_step == 2 and all(math.isfinite(x) for x in history(trainer, "loss"))
    if trainer_cls is DGPOTrainer:
        assert history(trainer, "dgpo/tau") == [0.5, 0.5]


def _weights_with_spread(spread, rows=6, length=24, seed=0):
    """TokenStatistics whose kappa = 0 scores give token weights of about `spread` std at tau = 0.5."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(rows, length, generator=g)
    divergence = 0.2 + spread * 0.5 * noise / noise.std()
    zeros = torch.zeros(rows, length)
    return TokenStatistics(zeros, zeros, divergence, divergence, torch.rand(rows, length, generator=g))


@pytest.mark.parametrize("spread", [1e-6, 1e-5, 5.7e-5, 1.7e-4, 1e-3, 1e-2, 1e-1])
def test_logged_weight_spread_matches_float64(tiny_model_path, reversal_train_dataset, tmp_path, spread):
    trainer = DGPOTrainer(
        tiny_model_path,
        exact_match_reward,
        train_dataset=reversal_train_dataset,
        args=DGPOConfig(**cpu_args(tmp_path, dgpo_kappa=0.0)),
    )
    stats = _weights_with_spread(spread)
    mask = torch.ones(stats.hellinger.shape, dtype=torch.long)
    mask[2, 15:] = 0
    inputs = {
        **prompts(len(mask)),
        "completion_ids": torch.zeros_like(mask),
        "completion_mask": mask,
        "advantages": torch.linspace(-1, 1, len(mask)),
    }
    trainer.model.train()
    trainer._apply_token_weights(inputs, stats, torch.arange(len(mask)))
    logged = {key: values[-1] for key, values in trainer._metrics["train"].items()}
    # float64 from the same scores: w = T softmax(d / tau) over each sequence's tokens
    valid = mask.bool()
    w = torch.where(valid, stats.hellinger.double() / 0.5, -math.inf).softmax(-1) * valid.sum(-1, keepdim=True)
    w = torch.where(valid, w, 0.0)
    std = torch.where(valid, w - 1, 0.0).square().sum().div(valid.sum()).sqrt().item()
    ess = (w.sum(-1).square() / (valid.sum(-1) * w.square().sum(-1))).mean().item()
    assert std == pytest.approx(spread, rel=0.2)
    assert logged["dgpo/weight/std"] == pytest.approx(std, rel=1e-6)
    assert logged["dgpo/ess"] == pytest.approx(ess, rel=0, abs=1e-12) and logged["dgpo/ess"] < 1.0
    assert logged["dgpo/weight/max"] == pytest.approx(w.max().item(), rel=1e-12) and logged["dgpo/weight/max"] > 1.0
    score = torch.where(valid, stats.hellinger.double(), 0.0)
    centred = torch.where(valid, score - score.sum(-1, keepdim=True) / valid.sum(-1, keepdim=True), 0.0)
    assert logged["dgpo/score/std"] == pytest.approx(centred.square().sum().div(valid.sum()).sqrt().item(), rel=1e-5)


def test_last_token_weights_keep_the_latest_batch_that_scored_any(tiny_model_path, reversal_train_dataset, tmp_path):
    trainer = DGPOTrainer(
        tiny_model_path,
        exact_match_reward,
        train_dataset=reversal_train_dataset,
        args=DGPOConfig(**cpu_args(tmp_path, dgpo_tau=0.01)),
    )
    stats = _weights_with_spread(0.05, rows=3)
    mask = torch.ones(3, 24, dtype=torch.long)
    scored = {
        **prompts(3),
        "completion_ids": torch.arange(72).view(3, 24),
        "completion_mask": mask,
        "advantages": torch.tensor([1.0, -1.0, 0.5]),
    }
    trainer.model.train()
    trainer._apply_token_weights(scored, stats, torch.arange(3))
    kept = trainer.last_token_weights
    assert kept["weights"].shape == (3, 24) and kept["weights"].std() > 0
    assert torch.equal(kept["completion_ids"], scored["completion_ids"])
    # a batch whose completions all have A_i = 0 scores nothing: the heatmap data of the last scored batch stays
    unscored = {
        **prompts(3),
        "completion_ids": torch.zeros(3, 24, dtype=torch.long),
        "completion_mask": mask,
        "advantages": torch.zeros(3),
    }
    empty = TokenStatistics(*(torch.zeros(0, 24) for _ in TokenStatistics._fields))
    trainer._apply_token_weights(unscored, empty, torch.zeros(0, dtype=torch.long))
    assert trainer.last_token_weights is kept
    # an evaluation batch keeps its own, and leaves the training batch's alone
    assert trainer.last_eval_token_weights is None
    trainer.model.eval()
    evaluated = {
        **prompts(3),
        "completion_ids": 100 + torch.arange(72).view(3, 24),
        "completion_mask": mask,
        "advantages": torch.tensor([0.5, -0.5, 1.0]),
    }
    trainer._apply_token_weights(evaluated, stats, torch.arange(3))
    assert trainer.last_token_weights is kept
    assert torch.equal(trainer.last_eval_token_weights["completion_ids"], evaluated["completion_ids"])


def test_a_callback_can_schedule_tau(warm_model_path, reversal_train_dataset, tmp_path):
    from transformers import TrainerCallback

    schedule = [0.5, 0.2, 0.05]

    class AnnealTau(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            args.dgpo_tau = schedule[state.global_step]

    trainer = DGPOTrainer(
        warm_model_path,
        exact_match_reward,
        train_dataset=reversal_train_dataset,
        args=DGPOConfig(**cpu_args(tmp_path, max_steps=3)),
        callbacks=[AnnealTau()],
    )
    trainer.train()
    assert history(trainer, "dgpo/tau") == schedule


def test_the_weights_use_the_tau_of_the_moment(tiny_model_path, reversal_train_dataset, tmp_path):
    trainer = DGPOTrainer(
        tiny_model_path,
        exact_match_reward,
        train_dataset=reversal_train_dataset,
        args=DGPOConfig(**cpu_args(tmp_path, dgpo_kappa=0.0)),
    )
    stats = _weights_with_spread(0.05, rows=3)
    mask = torch.ones(3, 24, dtype=torch.long)
    trainer.model.train()
    for tau in (0.5, 0.05, np.float32(0.01)):
        trainer.args.dgpo_tau = tau
        inputs = {
            **prompts(3),
            "completion_ids": torch.zeros_like(mask),
            "completion_mask": mask,
            "advantages": torch.tensor([1.0, -1.0, 0.5]),
        }
        trainer._apply_token_weights(inputs, stats, torch.arange(3))
        expected = (stats.hellinger.double() / float(tau)).softmax(-1) * 24
        torch.testing.assert_close(trainer.last_token_weights["weights"].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("dgpo_tau", -3.0, r"dgpo_tau must be a finite number > 0, got -3.0\."),
        ("dgpo_kappa", float("nan"), r"dgpo_kappa must be a finite number >= 0, got nan\."),
        ("dgpo_uniform_weights", True, r"dgpo_uniform_weights cannot change after the trainer is built"),
    ],
)
def test_a_value_set_after_construction_is_validated_when_used(
    tiny_model_path, reversal_train_dataset, tmp_path, field, value, message
):
    trainer = DGPOTrainer(
        tiny_model_path,
        exact_match_reward,
        train_dataset=reversal_train_dataset,
        args=DGPOConfig(**cpu_args(tmp_path)),
    )
    setattr(trainer.args, field, value)
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert trainer.state.global_step == 0  # refused at the first batch, before any update


def _module_kernels(model):
    """Each submodule's class and the function its forward runs (Liger patches instances' forwards)."""
    return {
        name: (type(module).__name__, getattr(module.forward, "__func__", module.forward).__qualname__)
        for name, module in model.named_modules()
    }


def test_liger_kernels_reach_the_reference(warm_model_path, reversal_train_dataset, tmp_path, monkeypatch):
    pytest.importorskip("liger_kernel")
    from transformers import TrainerCallback
    from transformers.models.llama import modeling_llama

    # Liger also patches modeling_llama's functions and classes for the whole process: undo that after the test
    for name, value in list(vars(modeling_llama).items()):
        monkeypatch.setattr(modeling_llama, name, value)
    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "forward", modeling_llama.LlamaForCausalLM.forward)

    class StopBeforeTheFirstStep(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            raise KeyboardInterrupt  # Liger's kernels need a GPU: look at the patching only

    trainer = DGPOTrainer(
        warm_model_path,
        exact_match_reward,
        train_dataset=reversal_train_dataset,
        args=DGPOConfig(**cpu_args(tmp_path, use_liger_kernel=True)),
    )
    policy = trainer.accelerator.unwrap_model(trainer.model)
    reference = trainer.accelerator.unwrap_model(trainer.ref_model)
    before = _module_kernels(reference)
    assert before == _module_kernels(policy)
    trainer.add_callback(StopBeforeTheFirstStep())
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    patched = _module_kernels(policy)
    assert patched != before  # transformers applied Liger's kernels to the policy
    assert any("Liger" in forward for _, forward in patched.values())
    assert _module_kernels(reference) == patched


def test_sync_ref_model_works_without_kl(warm_model_path, reversal_train_dataset, tmp_path):
    # TRL only allows syncing with beta > 0 (it loads no reference otherwise); DGPO always has one
    synced = train(
        DGPOTrainer,
        DGPOConfig,
        warm_model_path,
        reversal_train_dataset,
        tmp_path / "s",
        max_steps=3,
        sync_ref_model=True,
        ref_model_sync_steps=1,
        ref_model_mixup_alpha=1.0,
        dgpo_skip_zero_advantage=False,
    )
    policy = synced.accelerator.unwrap_model(synced.model)
    ref = synced.accelerator.unwrap_model(synced.ref_model)
    assert all(torch.equal(p, q) for p, q in zip(policy.parameters(), ref.parameters()))
    assert history(synced, "dgpo/divergence/max") == [0.0, 0.0, 0.0]  # the reference follows the policy
    frozen = train(
        DGPOTrainer,
        DGPOConfig,
        warm_model_path,
        reversal_train_dataset,
        tmp_path / "f",
        max_steps=3,
        dgpo_skip_zero_advantage=False,
    )
    assert history(frozen, "dgpo/divergence/max")[-1] > 0.0


@pytest.mark.parametrize("tau", [1e-8, 1e-310])
def test_any_accepted_tau_gives_finite_weights_with_mean_one(warm_model_path, reversal_train_dataset, tmp_path, tau):
    """dgpo_tau=1e-310 passed validation and overflowed s / tau: NaN weights, NaN parameters, a crash at step 3.
    Now every tau > 0 gives the softmax's limit: finite weights, each sequence's mean exactly 1."""
    trainer = train(DGPOTrainer, DGPOConfig, warm_model_path, reversal_train_dataset, tmp_path, max_steps=3,
                    dgpo_tau=tau, learning_rate=1e-3)  # fmt: skip
    assert trainer.state.global_step == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert all(math.isfinite(x) for x in history(trainer, "grad_norm") + history(trainer, "dgpo/weight/max"))
    kept = trainer.last_token_weights
    weights, mask = kept["weights"], kept["mask"]
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(-1) / mask.sum(-1), torch.ones(len(weights)))
    assert history(trainer, "dgpo/weight/max")[-1] > 1.5  # concentrated: the limit of a tiny tau


def test_dgpo_maxima_are_the_logging_windows_maxima(warm_model_path, reversal_train_dataset, tmp_path, monkeypatch):
    """logging_steps=2 with gradient accumulation 2: `dgpo/weight/max` logged the mean of four micro-batch maxima;
    it is now their maximum (means stay means)."""
    import dgpo_trl.trainer as trainer_module

    reduced = []
    real = trainer_module.dgpo_metrics
    monkeypatch.setattr(trainer_module, "dgpo_metrics", lambda *a, **k: reduced.append(real(*a, **k)) or reduced[-1])
    trainer = train(DGPOTrainer, DGPOConfig, warm_model_path, reversal_train_dataset, tmp_path, max_steps=4,
                    logging_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=16, dgpo_tau=0.01,
                    learning_rate=3e-3, dgpo_skip_zero_advantage=False)  # fmt: skip
    logged = history(trainer, "dgpo/weight/max")
    windows = [reduced[i : i + 4] for i in range(0, len(reduced), 4)]
    assert len(logged) == len(windows) == 2
    assert logged == [max(m["dgpo/weight/max"] for m in window) for window in windows]
    assert len({m["dgpo/weight/max"] for m in windows[1]}) > 1  # the maxima differ: a mean would not equal the max
    means = history(trainer, "dgpo/divergence/mean")
    assert means[1] == pytest.approx(sum(m["dgpo/divergence/mean"] for m in windows[1]) / 4)


def test_a_streaming_dataset_without_a_prompt_column_is_refused(tiny_model_path, tmp_path):
    from datasets import Features, IterableDataset, Value

    def rows():
        yield {"question": "r123>"}

    dataset = IterableDataset.from_generator(rows, features=Features({"question": Value("string")}))
    assert dataset.column_names == ["question"]
    with pytest.raises(ValueError, match="train_dataset has no 'prompt' column.*\\['question'\\]"):
        DGPOTrainer(tiny_model_path, exact_match_reward, args=DGPOConfig(**cpu_args(tmp_path, max_steps=1)),
                    train_dataset=dataset)  # fmt: skip


@pytest.mark.parametrize("path", ["tiles", "fused"])
def test_kernel_guard_path_is_logged(warm_model_path, reversal_train_dataset, tmp_path, monkeypatch, path):
    """`dgpo/kernel` says which divergence pass ran: 0 for the torch tiles (CPU, or after the fused kernel failed its
    first-call check), 1 for the fused Triton kernel (its dispatch itself is tested in test_kernels.py)."""
    import dgpo_trl.trainer as trainer_module

    if path == "fused":
        monkeypatch.setattr(trainer_module, "last_divergence_path", lambda: "fused")
    trainer = train(DGPOTrainer, DGPOConfig, warm_model_path, reversal_train_dataset, tmp_path, max_steps=2)
    assert history(trainer, "dgpo/kernel") == [1.0 if path == "fused" else 0.0] * 2
