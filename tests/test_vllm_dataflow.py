"""DGPO's dataflow under TRL's vLLM path, without vLLM (it cannot be installed on these CPU-only machines).

The trainer is built with `use_vllm=False`; then the attributes TRL's vLLM branch reads are switched on
(`use_vllm=True`, `vllm_mode="server"`, importance-sampling correction with a mode and clip values) and
`trainer.vllm_generation` is replaced by a stand-in for `trl.generation.vllm_generation.VLLMGeneration` that returns
what the server returns: prompt ids, completion ids, and per-token sampling log-probs in vLLM's top-1 format (one
`None` included, as vLLM emits for a NaN). So TRL 1.16's own `_generate_single_turn` -> `_generate` ->
`_generate_and_score_completions` run unchanged down the vLLM branch, with its importance-sampling correction:
TRL asks for a policy forward for the old log-probs, which DGPO turns into its joint pass.

Checked: one policy-backbone and one reference-backbone forward per row chunk and no other (no TRL reference pass,
no LM-head module call), old log-probs equal to TRL's own fused-head forward on the same model, the IS ratio equal to
TRL's formula on those log-probs and vLLM's, the token weights (and with beta > 0 TRL's `ref_per_token_logps`)
equal to a naive float64 recomputation against the reference loaded from disk, and a short `train()` through the
vLLM branch (IS-corrected loss on DGPO's per-token advantages).
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

PER_DEVICE = 4
STEPS_PER_GENERATION = 2  # == gradient_accumulation_steps: aligned, so only the IS correction asks for old log-probs
NUM_GENERATIONS = 4
MAX_COMPLETION = 8
TEMPERATURE = 0.8
CLIP_MIN, CLIP_MAX = 0.6, 1.8


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from dgpo_trl.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("vllm") / "tiny", hidden_size=64, num_layers=2, num_heads=4)


def length_reward(completions, **kwargs):
    return [len(c) / MAX_COMPLETION + 0.1 * sum(ch.isdigit() for ch in c) for c in completions]


class FakeVLLMGeneration:
    """Stands in for `VLLMGeneration` (server mode, one process): what `generate` returns, without a server.

    Completions are random tokens (some end with EOS, some hit the length limit); the sampling log-probs are what a
    vLLM engine whose numerics differ from the trainer's would report: near the tiny random model's log(1/V), with a
    spread that puts some importance ratios beyond both clip values, and one token vLLM could not score (None).
    """

    def __init__(self, vocab_size: int, eos_token_id: int, seed: int = 0):
        self.vocab_size, self.eos_token_id = vocab_size, eos_token_id
        self.generator = torch.Generator().manual_seed(seed)
        self.calls = 0
        self.synced = 0

    def sync_weights(self):
        self.synced += 1

    def generate(self, prompts, images, num_generations, profiler=None):
        self.calls += 1
        g = self.generator
        completion_ids, logprobs = [], []
        for i, _ in enumerate(prompts):
            length = int(torch.randint(2, MAX_COMPLETION + 1, (1,), generator=g))
            ids = torch.randint(4, self.vocab_size, (length,), generator=g).tolist()
            if i % 3 != 0:  # the others are truncated at max_completion_length or end early without EOS
                ids[-1] = self.eos_token_id
            completion_ids.append(ids)
            lps = (-math.log(self.vocab_size) + 0.6 * torch.randn(length, generator=g)).tolist()
            logprobs.append([[lp] for lp in lps])
        logprobs[1][0] = [None]
        return [list(p) for p in prompts], completion_ids, logprobs, None


def _make_trainer(model_path, tmp_path, *, beta, mode, max_steps=2):
    from dgpo_trl import DGPOConfig, DGPOTrainer
    from dgpo_trl.tasks import reversal_dataset

    args = DGPOConfig(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=PER_DEVICE,
        gradient_accumulation_steps=STEPS_PER_GENERATION,
        steps_per_generation=STEPS_PER_GENERATION,
        num_generations=NUM_GENERATIONS,
        max_completion_length=MAX_COMPLETION,
        temperature=TEMPERATURE,
        beta=beta,
        dgpo_tau=0.02,
        learning_rate=1e-3,
        max_steps=max_steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        disable_tqdm=True,
        vllm_importance_sampling_correction=True,
        vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_min=CLIP_MIN,
        vllm_importance_sampling_clip_max=CLIP_MAX,
    )
    trainer = DGPOTrainer(model_path, reward_funcs=length_reward, args=args, train_dataset=reversal_dataset(64))
    assert trainer.ref_model is not None
    # Switch on TRL's vLLM branch (server mode) with the stand-in engine
    trainer.use_vllm = True
    trainer.vllm_mode = "server"
    trainer._last_loaded_step = -1
    tokenizer = trainer.processing_class
    trainer.vllm_generation = FakeVLLMGeneration(len(tokenizer), tokenizer.eos_token_id)
    # pi_theta != pi_ref from the first batch on, so the weights are not trivially 1: move the policy only (the
    # reference was loaded from disk, not copied)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    trainer.num_completions_to_show = 10**6
    return trainer


@torch.no_grad()
def _naive(model, ids, attention, width):
    """Float64 full-vocabulary log-softmax of the completion positions (the model's plain HF forward)."""
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -width - 1 : -1]
    return torch.log_softmax(logits.double() / TEMPERATURE, dim=-1)


@pytest.mark.filterwarnings("ignore:beta=0.04 adds TRL's KL penalty")
@pytest.mark.parametrize(("beta", "mode"), [(0.0, "token_truncate"), (0.04, "sequence_mask")])
def test_vllm_importance_sampling_dataflow(tiny_model, tmp_path, beta, mode):
    from transformers import AutoModelForCausalLM
    from trl import GRPOTrainer

    from dgpo_trl.forwards import causal_lm as _causal_lm
    from dgpo_trl.functional import token_weights

    trainer = _make_trainer(tiny_model, tmp_path, beta=beta, mode=mode)
    policy = _causal_lm(trainer._policy())
    reference = _causal_lm(trainer.reference.model)
    assert policy is not reference

    counts = Counter()
    head_positions = []  # sequence positions the reference's lm_head module projects, per call

    def on_ref_head(module, args, output):
        counts.update(["ref_lm_head"])
        head_positions.append(args[0].shape[1])

    handles = [
        policy.base_model.register_forward_hook(lambda *a: counts.update(["policy_backbone"])),
        reference.base_model.register_forward_hook(lambda *a: counts.update(["ref_backbone"])),
        policy.lm_head.register_forward_hook(lambda *a: counts.update(["policy_lm_head"])),
        reference.lm_head.register_forward_hook(on_ref_head),
    ]
    scoring_calls = []
    original_scoring = trainer._get_per_token_logps_and_entropies

    def recording_scoring(model, *args, **kwargs):
        scoring_calls.append(model)
        return original_scoring(model, *args, **kwargs)

    trainer._get_per_token_logps_and_entropies = recording_scoring
    applied = []
    original_apply = trainer._apply_token_weights

    def recording_apply(inputs, stats, rows):
        sequence_advantages = inputs["advantages"].clone()
        original_apply(inputs, stats, rows)
        applied.append((rows.clone(), trainer.last_token_weights["weights"].clone(), sequence_advantages))

    trainer._apply_token_weights = recording_apply

    from dgpo_trl.tasks import reversal_dataset

    rows = PER_DEVICE * STEPS_PER_GENERATION
    batch = [row for row in reversal_dataset(rows // NUM_GENERATIONS, seed=1) for _ in range(NUM_GENERATIONS)]
    trainer.model.train()
    out = trainer._generate_and_score_completions(batch)
    for handle in handles:
        handle.remove()

    # The vLLM branch really ran: completions and sampling log-probs came from the engine
    assert trainer.vllm_generation.calls == 1 and trainer.vllm_generation.synced == 1
    assert "sampling_per_token_logps" in out and "importance_sampling_ratio" in out
    assert trainer.beta == beta

    # Forwards: one policy and one reference backbone forward per row chunk, nothing else. The policy's LM head is
    # only read as weights (TRL's fused head, DGPO's divergence pass), never called as a module (under ZeRO-3 that
    # call would break the next backward); the reference's may run on at most one position per row.
    chunks = math.ceil(rows / PER_DEVICE)
    assert chunks == 2
    assert counts["policy_backbone"] == chunks and counts["ref_backbone"] == chunks, counts
    assert counts["policy_lm_head"] == 0 and counts["ref_lm_head"] <= chunks, counts
    assert all(positions <= 1 for positions in head_positions), head_positions
    # TRL's old-log-prob call, and with beta > 0 its reference call, which DGPO answers without a forward (its own
    # reference forward, counted above, gave those log-probs)
    assert scoring_calls == [trainer.model] + ([trainer.ref_model] if beta else [])
    assert len(applied) == 1 and torch.equal(applied[0][0], torch.arange(rows))  # scored at scoring time, every row

    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
    width = out["completion_ids"].size(1)
    mask = out["completion_mask"].bool()

    # Old log-probs: equal to TRL's own fused-head forward of the same model, and to a naive float64 softmax
    trainer._get_per_token_logps_and_entropies = original_scoring
    fused, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
        trainer, trainer.model, ids, attention, width, batch_size=PER_DEVICE
    )
    old = out["old_per_token_logps"]
    assert torch.equal(old[mask], fused[mask])
    log_p = _naive(trainer.model, ids, attention, width)
    label_logps = log_p.gather(-1, out["completion_ids"].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(old[mask], label_logps[mask].float(), atol=2e-5, rtol=0)

    # The IS ratio is TRL's formula on the training model's log-probs and vLLM's
    sampling = out["sampling_per_token_logps"]
    assert torch.isnan(sampling[1, 0]) and not torch.isnan(sampling[mask & ~torch.isnan(sampling)]).any()
    diff = torch.nan_to_num((label_logps.float() - sampling) * mask, nan=0.0)
    ratio = out["importance_sampling_ratio"]
    if mode == "token_truncate":
        expected = torch.exp(diff).clamp(CLIP_MIN, CLIP_MAX)
        assert ratio.shape == mask.shape
        valid = ratio[mask]
        # not a trivial ratio: clipped at both ends and strictly inside somewhere
        assert (valid == CLIP_MIN).any() and (valid == CLIP_MAX).any()
        assert ((valid > CLIP_MIN) & (valid < CLIP_MAX) & (valid != 1.0)).any()
    else:
        expected = torch.exp(diff.sum(-1, keepdim=True))
        expected = expected.masked_fill((expected < CLIP_MIN) | (expected > CLIP_MAX), 0.0)
        assert ratio.shape == (rows, 1)
        assert (ratio == 0).any() and (ratio != 0).any()
    torch.testing.assert_close(ratio, expected, atol=1e-4, rtol=1e-4)

    # Weights (and with beta > 0 TRL's reference log-probs) against the reference loaded fresh from disk
    naive_reference = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    log_q = _naive(naive_reference, ids, attention, width)
    hellinger = 1.0 - torch.exp(0.5 * (log_p + log_q)).sum(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    weights = token_weights(
        hellinger.float(), entropy.float(), mask, tau=trainer.dgpo.tau, kappa=trainer.dgpo.kappa,
        vocab_size=naive_reference.config.vocab_size,
    )  # fmt: skip
    got = applied[0][1]
    assert got[mask].std() > 0.05  # far from uniform: a wrong reference or row order would show
    torch.testing.assert_close(got, weights, atol=1e-3, rtol=0)
    # TRL's loss receives A_i * w_t
    assert applied[0][2].dim() == 1 and applied[0][2].abs().sum() > 0
    torch.testing.assert_close(out["advantages"], applied[0][2].unsqueeze(1) * weights, atol=1e-3, rtol=0)
    if beta:
        ref_labels = log_q.gather(-1, out["completion_ids"].unsqueeze(-1)).squeeze(-1).float()
        torch.testing.assert_close(out["ref_per_token_logps"][mask], ref_labels[mask], atol=2e-5, rtol=0)
    else:
        assert "ref_per_token_logps" not in out


def test_vllm_branch_trains_with_dgpo_weights(tiny_model, tmp_path):
    """Two optimizer steps through TRL's vLLM branch: the IS-corrected loss takes DGPO's (B, T) advantages."""
    trainer = _make_trainer(tiny_model, tmp_path, beta=0.0, mode="token_truncate", max_steps=2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.vllm_generation.calls == 2  # one generation per optimizer step (steps_per_generation == GA)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert "sampling/importance_sampling_ratio/mean" in h and "dgpo/divergence/mean" in h
        assert h["dgpo/divergence/mean"] > 0 and h["dgpo/weight/std"] > 0
    assert all(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
