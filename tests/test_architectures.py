"""DGPO's token weights on every architecture family the trainer special-cases, recomputed independently.

Each tiny random model (`dgpo_trl.tiny.ARCHITECTURES`) stresses something Llama does not: Qwen2 ties the LM head to
the input embedding and has q/k/v biases, Qwen3 normalises queries and keys, Gemma2 softcaps its final logits (and its
attention logits, with a sliding-window layer), Cohere multiplies its logits by `logit_scale` (tied) and Granite
divides them by `logits_scaling`. A vision-language model (`dgpo_trl.tiny.build_tiny_vlm`, a tiny Qwen2-VL with an
image-only processor) trains on conversational prompts with an image each, in full and with LoRA (its reference: the
policy with the adapter off); its recomputation feeds the same images (and fails by far with the images permuted).

After two optimizer steps (so pi_theta has moved away from pi_ref), a fresh generation batch is scored the way the
trainer scores one, on either path:
- loss time (the default, steps_per_generation == gradient_accumulation_steps): the statistics come from TRL's
  training forward, for the completions with A_i != 0;
- scoring time (steps_per_generation=2 > gradient_accumulation_steps=1, beta > 0): they come from TRL's pi_old
  forward, for every completion, and TRL's old and reference log-probs come out of the same pass.
Then everything is recomputed here from scratch: the trainer's policy and reference through their own Hugging Face
forwards (`model(...).logits`, which apply the softcap or the scale themselves), divided by the sampling temperature,
full-vocabulary float64 softmax, and the DGPO formula written out. Nothing is shared with the trainer's
`logit_transform`, `token_statistics` or `token_weights`. Compared: the squared Hellinger distance and entropy of every
scored token, its weight, the (B, T) advantages TRL's loss receives, and the label log-probs.

Errors measured (max over the compared tokens, all seven architectures, both paths, the VLM full and LoRA): squared
Hellinger 7e-7 absolute, entropy 1.5e-7 relative, weights 3.7e-5 relative (the Hellinger error divided by
tau = 0.02), label log-probs 7e-7. Ignoring the logit transform in the trainer moves the weights by 2% (Gemma2's
softcap), 100% (Cohere) and 500-600% (Granite). The whole module takes ~15-40 s on 2 shared cores (23 s at load 2.3),
of which the four VLM cases ~3-6 s.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import cpu_args

from dgpo_trl import DGPOConfig, DGPOTrainer
from dgpo_trl.rewards import completion_text
from dgpo_trl.tasks import reversal_dataset
from dgpo_trl.tiny import ARCHITECTURES, build_tiny_model, build_tiny_vlm, tiny_vlm_processor
from dgpo_trl.visualize import completions_from_token_weights

TEMPERATURE = 0.7
TAU = 0.02  # small enough that the weights spread after two steps (std 0.04-0.3), large enough for tight tolerances
# float32 (the trainer's tiled online log-sum-exp) against float64 here, from the same float32 forward: ~3x the
# largest error measured. A weight's relative error is about its score's error over tau (3.7e-5 ~ 2 * 7e-7 / 0.02).
HELLINGER_ATOL = 2e-6
ENTROPY_RTOL = 1e-6
WEIGHT_RTOL = 1e-4
LOGP_ATOL = 3e-6
MIN_WEIGHT_STD = 0.02  # far from uniform: a wrong transform or reference, or misaligned rows, shows
PATHS = {
    "loss_time": dict(),
    "scoring_time": dict(steps_per_generation=2, gradient_accumulation_steps=1, beta=0.04),
}
TIED = ("qwen2", "gemma2", "cohere")


def digit_fraction_reward(completions, **kwargs):
    """Varies between a random model's completions, so most groups have nonzero advantages and the policy moves."""
    texts = [completion_text(completion) for completion in completions]  # conversational ones too (the VLM's)
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in texts]


@pytest.fixture(scope="module")
def architecture_path(tmp_path_factory):
    """`architecture_path(name)`: the tiny random model of that architecture, saved once per module."""
    built = {}

    def get(name: str) -> str:
        if name not in built:
            path = tmp_path_factory.mktemp(f"arch_{name}") / "model"
            built[name] = build_tiny_model(path, hidden_size=64, num_layers=2, num_heads=4, seed=0, architecture=name)
        return built[name]

    return get


def _trainer(path: str, output_dir, **overrides) -> DGPOTrainer:
    from transformers import PreTrainedTokenizerFast

    # TRL's AutoProcessor would load Qwen2Tokenizer for the Qwen2 config, which drops whitespace: pass the char one
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    text = "r12 345>\n54,321"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    args = DGPOConfig(
        **cpu_args(
            output_dir,
            per_device_train_batch_size=16,
            num_generations=4,
            learning_rate=1e-2,
            lr_scheduler_type="constant",
            temperature=TEMPERATURE,
            dgpo_tau=TAU,
            **overrides,
        )
    )
    trainer = DGPOTrainer(
        path, digit_fraction_reward, args=args, train_dataset=reversal_dataset(64, seed=3), processing_class=tokenizer
    )
    trainer.num_completions_to_show = 10**6  # keep every scored completion's weights in `last_token_weights`
    return trainer


@torch.no_grad()
def _log_probs(model, ids, attention, width):
    """(B, width, V) float64 log-probs of the completion positions, from the model's own forward and logits."""
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, -width - 1 : -1]
    return torch.log_softmax(logits.double() / TEMPERATURE, dim=-1)


def _expected(log_p, log_q, mask, tau, kappa):
    """Squared Hellinger, entropy and w_t = T_i softmax_t(d_t (H_t / log V) ** kappa / tau), float64, (B, T) each."""
    hellinger = 1.0 - torch.exp(0.5 * (log_p + log_q)).sum(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    scores = hellinger * (entropy / math.log(log_p.size(-1))).clamp(0.0, 1.0) ** kappa
    weights = torch.softmax((scores / tau).masked_fill(~mask, -math.inf), dim=-1).nan_to_num(0.0)
    return hellinger, entropy, weights * mask.sum(-1, keepdim=True)


def _max_error(actual, expected, relative=False):
    error = (actual.double() - expected).abs()
    return (error / expected.abs() if relative else error).max().item()


@pytest.mark.parametrize("path_name", list(PATHS))
@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_weights_match_float64_recomputation(architecture_path, tmp_path, architecture, path_name):
    trainer = _trainer(architecture_path(architecture), tmp_path, **PATHS[path_name])
    trainer.train()  # two optimizer steps: pi_theta moves away from pi_ref
    assert trainer.state.global_step == 2
    policy = trainer.accelerator.unwrap_model(trainer.model)
    reference = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert policy.config.model_type == reference.config.model_type == architecture
    if architecture in TIED:  # one parameter, trained, for the embedding and the LM head; the reference's its own
        assert policy.get_output_embeddings().weight is policy.get_input_embeddings().weight
        assert reference.get_output_embeddings().weight is reference.get_input_embeddings().weight
        assert not torch.equal(policy.get_output_embeddings().weight, reference.get_output_embeddings().weight)

    # A fresh generation batch (4 prompts x 4 completions), scored as the trainer scores one
    dataset = reversal_dataset(4, seed=11)
    batch = [dataset[i // 4] for i in range(16)]
    applied = []
    apply = trainer._apply_token_weights

    def spy(inputs, stats, rows):
        applied.append((rows.clone(), stats, inputs["advantages"].clone()))
        return apply(inputs, stats, rows)

    trainer._apply_token_weights = spy
    output = trainer._generate_and_score_completions(batch)
    if path_name == "scoring_time":
        assert "old_per_token_logps" in output and len(applied) == 1
        rows, stats, sequence_advantages = applied[0]
        assert torch.equal(rows, torch.arange(16))  # every completion: the advantages are not known yet
    else:
        assert output.get("old_per_token_logps") is None and not applied and output["advantages"].dim() == 1
        trainer._compute_loss(trainer.model, output)  # the training forward: statistics and weights, in place
        assert len(applied) == 1
        rows, stats, sequence_advantages = applied[0]
        assert torch.equal(rows, sequence_advantages.nonzero().squeeze(-1))  # only completions with A_i != 0
    assert len(rows) >= 8, "too few completions scored for a meaningful comparison"
    weights = trainer.last_token_weights["weights"]
    assert weights.shape[0] == len(rows) and output["advantages"].dim() == 2

    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    width = output["completion_ids"].size(1)
    mask = output["completion_mask"].bool()
    log_p, log_q = _log_probs(policy, ids, attention, width), _log_probs(reference, ids, attention, width)
    hellinger, entropy, expected = _expected(log_p, log_q, mask, trainer.dgpo.tau, trainer.dgpo.kappa)
    labels = output["completion_ids"].unsqueeze(-1)
    label_logps = {"policy": log_p.gather(-1, labels).squeeze(-1), "ref": log_q.gather(-1, labels).squeeze(-1)}
    assert hellinger[mask].max() > 1e-3, "the policy did not move away from the reference"

    valid = mask[rows]  # the scored completions' valid tokens
    where = f"{architecture} {path_name}"
    errors = {
        "hellinger_abs": _max_error(stats.hellinger[valid], hellinger[rows][valid]),
        "entropy_rel": _max_error(stats.entropy[valid], entropy[rows][valid], relative=True),
        "weight_rel": _max_error(weights[valid], expected[rows][valid], relative=True),
        "policy_logp_abs": _max_error(stats.policy_logps[valid], label_logps["policy"][rows][valid]),
    }
    if path_name == "scoring_time":  # beta > 0: TRL's KL term gets the reference's log-probs from DGPO's forward
        errors["ref_logp_abs"] = _max_error(stats.ref_logps[valid], label_logps["ref"][rows][valid])
    print(f"\n[architectures] {where}: weight std {weights[valid].std():.3f}, "
          + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))  # fmt: skip

    def close(actual, wanted, what, **tolerance):
        torch.testing.assert_close(actual.double(), wanted, **tolerance, msg=lambda m: f"{where}, {what}: {m}")

    close(stats.hellinger[valid], hellinger[rows][valid], "squared Hellinger", atol=HELLINGER_ATOL, rtol=0)
    close(stats.entropy[valid], entropy[rows][valid], "entropy", rtol=ENTROPY_RTOL, atol=0)
    close(weights[valid], expected[rows][valid], "weights", rtol=WEIGHT_RTOL, atol=0)
    assert weights[valid].std() > MIN_WEIGHT_STD, (where, weights[valid].std())
    # The advantages TRL's loss receives: A_i * w_t, 0 on padding and for the unscored completions (A_i = 0)
    token_advantages = sequence_advantages.unsqueeze(1).double() * expected
    close(output["advantages"], token_advantages, "advantages", rtol=WEIGHT_RTOL, atol=1e-7)
    # TRL's label log-probs of pi_old (its training forward, or its scoring-time forward DGPO's pass runs)
    close(stats.policy_logps[valid], label_logps["policy"][rows][valid], "policy log-probs", atol=LOGP_ATOL, rtol=0)
    if path_name == "scoring_time":
        # TRL's old and reference log-probs, from TRL's fused head on the policy's and DGPO's reference forwards
        close(stats.ref_logps[valid], label_logps["ref"][rows][valid], "reference log-probs", atol=LOGP_ATOL, rtol=0)
        for key, model in (("old_per_token_logps", "policy"), ("ref_per_token_logps", "ref")):
            close(output[key][mask], label_logps[model][mask], key, atol=LOGP_ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# A vision-language model: a tiny Qwen2-VL trained on prompts with images


def _image_dataset(n: int, seed: int):
    """Reversal prompts as conversations, each with its own small random PIL image (28x28: one image token)."""
    import numpy as np
    from datasets import Dataset
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": row["prompt"]}],
         "image": Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8))}
        for row in reversal_dataset(n, seed=seed)
    ])  # fmt: skip


@pytest.fixture(scope="module")
def vlm_path(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "model", hidden_size=64, num_layers=2, num_heads=4, seed=0)


@torch.no_grad()
def _vlm_log_probs(model, output, width, pixel_values):
    """(B, width, V) float64 log-probs of the completion positions from the VLM's own forward, given the images."""
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    # Which positions hold image tokens: the multimodal rotary positions are computed from it
    image_tokens = (ids == model.config.image_token_id).long()
    logits = model(
        input_ids=ids,
        attention_mask=attention,
        pixel_values=pixel_values,
        mm_token_type_ids=image_tokens,
        image_grid_thw=output["image_grid_thw"],
        use_cache=False,
    ).logits[:, -width - 1 : -1]
    return torch.log_softmax(logits.double() / TEMPERATURE, dim=-1)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("path_name", list(PATHS))
def test_vision_language_model_matches_float64_recomputation(vlm_path, tmp_path, path_name, lora):
    """A tiny Qwen2-VL trains on prompts with images on both paths, in full and with LoRA; its statistics and
    weights match a float64 recomputation through the model's own forward with the same images."""
    from peft import LoraConfig, PeftModel

    args = DGPOConfig(**cpu_args(
        tmp_path, per_device_train_batch_size=16, num_generations=4, learning_rate=5e-2 if lora else 1e-2,
        lr_scheduler_type="constant", temperature=TEMPERATURE, dgpo_tau=TAU, **PATHS[path_name],
    ))  # fmt: skip
    peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]) if lora else None
    trainer = DGPOTrainer(
        vlm_path,
        digit_fraction_reward,
        args=args,
        train_dataset=_image_dataset(64, seed=3),
        processing_class=tiny_vlm_processor(vlm_path),
        peft_config=peft_config,
    )
    trainer.num_completions_to_show = 10**6
    trainer.train()
    assert trainer.state.global_step == 2
    policy = trainer.accelerator.unwrap_model(trainer.model)
    assert isinstance(policy, PeftModel) == lora
    assert policy.config.model_type == "qwen2_vl"

    batch = _image_dataset(4, seed=11)
    batch = [batch[i // 4] for i in range(16)]
    applied = []
    apply = trainer._apply_token_weights

    def spy(inputs, stats, rows):
        applied.append((rows.clone(), stats, inputs["advantages"].clone()))
        return apply(inputs, stats, rows)

    trainer._apply_token_weights = spy
    output = trainer._generate_and_score_completions(batch)
    grids = output["image_grid_thw"]  # one image per completion, its patches in pixel_values
    assert len(grids) == 16 and output["pixel_values"].size(0) == grids.prod(-1).sum()
    if path_name == "scoring_time":  # scored at generation, every completion
        assert "old_per_token_logps" in output and len(applied) == 1 and torch.equal(applied[0][0], torch.arange(16))
    else:  # scored in TRL's training forward, the completions with A_i != 0
        assert not applied and output["advantages"].dim() == 1
        trainer._compute_loss(trainer.model, output)
        assert len(applied) == 1 and torch.equal(applied[0][0], applied[0][2].nonzero().squeeze(-1))
    rows, stats, sequence_advantages = applied[0]
    assert len(rows) >= 8, "too few completions scored for a meaningful comparison"
    weights = trainer.last_token_weights["weights"]

    width = output["completion_ids"].size(1)
    mask = output["completion_mask"].bool()
    log_p = _vlm_log_probs(policy, output, width, output["pixel_values"])
    if lora:  # the reference is the policy with its adapter off
        with policy.disable_adapter():
            log_q = _vlm_log_probs(policy, output, width, output["pixel_values"])
    else:
        log_q = _vlm_log_probs(
            trainer.accelerator.unwrap_model(trainer.ref_model), output, width, output["pixel_values"]
        )
    hellinger, entropy, expected = _expected(log_p, log_q, mask, trainer.dgpo.tau, trainer.dgpo.kappa)
    valid = mask[rows]
    where = f"qwen2_vl {path_name} {'lora' if lora else 'full'}"
    print(f"\n[architectures] {where}: weight std {weights[valid].std():.3f}, hellinger "
          f"{_max_error(stats.hellinger[valid], hellinger[rows][valid]):.1e}, entropy "
          f"{_max_error(stats.entropy[valid], entropy[rows][valid], relative=True):.1e}, weights "
          f"{_max_error(weights[valid], expected[rows][valid], relative=True):.1e}")  # fmt: skip
    assert hellinger[mask].max() > 1e-3, "the policy did not move away from the reference"

    def close(actual, wanted, what, **tolerance):
        torch.testing.assert_close(actual.double(), wanted, **tolerance, msg=lambda m: f"{where}, {what}: {m}")

    close(stats.hellinger[valid], hellinger[rows][valid], "squared Hellinger", atol=HELLINGER_ATOL, rtol=0)
    close(stats.entropy[valid], entropy[rows][valid], "entropy", rtol=ENTROPY_RTOL, atol=0)
    close(weights[valid], expected[rows][valid], "weights", rtol=WEIGHT_RTOL, atol=0)
    assert weights[valid].std() > MIN_WEIGHT_STD, (where, weights[valid].std())
    close(
        output["advantages"],
        sequence_advantages.unsqueeze(1).double() * expected,
        "advantages",
        rtol=WEIGHT_RTOL,
        atol=1e-7,
    )
    labels = output["completion_ids"].unsqueeze(-1)
    label_logps = {"policy": log_p.gather(-1, labels).squeeze(-1), "ref": log_q.gather(-1, labels).squeeze(-1)}
    close(stats.policy_logps[valid], label_logps["policy"][rows][valid], "policy log-probs", atol=LOGP_ATOL, rtol=0)
    if path_name == "scoring_time":  # beta > 0: TRL's KL term gets the reference's log-probs from DGPO's forward
        close(stats.ref_logps[valid], label_logps["ref"][rows][valid], "reference log-probs", atol=LOGP_ATOL, rtol=0)
        for key, model in (("old_per_token_logps", "policy"), ("ref_per_token_logps", "ref")):
            close(output[key][mask], label_logps[model][mask], key, atol=LOGP_ATOL, rtol=0)
    # The images matter: the same recomputation with the batch's image patches in reverse order misses by far more
    other = _vlm_log_probs(policy, output, width, output["pixel_values"].flip(0))
    other_entropy = -(other.exp() * other).sum(-1)
    assert _max_error(stats.entropy[valid], other_entropy[rows][valid], relative=True) > 10 * ENTROPY_RTOL
    # Heatmaps show each row's prompt text (the image's tokens are special: not shown)
    shown = completions_from_token_weights(trainer.last_token_weights, trainer.processing_class.tokenizer)
    assert [c.prompt for c in shown] == [batch[int(i)]["prompt"][0]["content"] for i in rows]
