"""What DGPOTrainer assumes of TRL's GRPOTrainer internals, one test per assumption, on TRL's own class.

DGPOTrainer overrides or wraps four private GRPOTrainer methods (`__init__`, `_generate_and_score_completions`,
`_get_per_token_logps_and_entropies`, `_compute_loss`) and `get_high_entropy_mask`, and imports a few of TRL's helpers.
A TRL release that changes one of these should fail here, in a test whose message names the assumption that broke,
before the equivalence tests in test_trainer.py fail somewhere deep in training.
"""

import inspect
from types import SimpleNamespace

import pytest
import torch
import trl
from conftest import cpu_args
from trl import GRPOConfig, GRPOTrainer

from dgpo_trl.tasks import exact_match_reward, reversal_dataset


def require(condition, assumption: str) -> None:
    if not condition:
        pytest.fail(f"TRL {trl.__version__} broke an assumption of DGPOTrainer: {assumption}", pytrace=False)


def parameters(function) -> list[str]:
    return list(inspect.signature(function).parameters)


@pytest.fixture(scope="module")
def grpo(tiny_model_path, tmp_path_factory):
    trainer = GRPOTrainer(
        tiny_model_path,
        exact_match_reward,
        train_dataset=reversal_dataset(16),
        args=GRPOConfig(
            **cpu_args(
                tmp_path_factory.mktemp("contract"),
                per_device_train_batch_size=8,
                num_generations=4,
                max_completion_length=6,
                loss_type="grpo",
            )
        ),
    )
    trainer.model.eval()  # `_compute_loss` then normalizes by 1, not by the accumulation steps of a training loop
    return trainer


def completion_batch(trainer, rows=4, prompt_length=3, completion_length=5, seed=0):
    """The micro-batch layout `_compute_loss` takes, with a few padded completion positions."""
    g = torch.Generator().manual_seed(seed)
    vocab = trainer.model.config.vocab_size
    completion_mask = torch.ones(rows, completion_length, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_mask[2, 1:] = 0
    return {
        "prompt_ids": torch.randint(4, vocab, (rows, prompt_length), generator=g),
        "prompt_mask": torch.ones(rows, prompt_length, dtype=torch.long),
        "completion_ids": torch.randint(4, vocab, (rows, completion_length), generator=g),
        "completion_mask": completion_mask,
        "advantages": torch.zeros(rows),
        "num_items_in_batch": completion_mask.sum(),
    }


def grpo_loss(advantages, mask, kept=None):
    """`loss_type="grpo"` at an importance ratio of 1 (old log-probs = these log-probs), no KL: per sequence,
    -sum_t A_{i,t} m_t / sum_t m_t, averaged; `kept` is TRL's entropy mask, which multiplies the per-token loss."""
    per_token = -advantages * (mask if kept is None else mask * kept)
    return (per_token.sum(-1) / mask.sum(-1)).mean()


def test_init_takes_the_arguments_dgpo_binds_by_name():
    names = parameters(GRPOTrainer.__init__)
    require(
        names[:4] == ["self", "model", "reward_funcs", "args"],
        "GRPOTrainer.__init__ starts with (model, reward_funcs, args): DGPOTrainer passes them positionally.",
    )
    for name in ("train_dataset", "eval_dataset", "peft_config", "quantization_config", "environment_factory"):
        require(
            name in names,
            f"GRPOTrainer.__init__ takes `{name}`: DGPOTrainer binds the call to its signature "
            f"and reads `{name}` by name.",
        )


def test_init_loads_no_reference_with_beta_zero(grpo):
    require(
        grpo.ref_model is None and grpo.beta == 0.0,
        "GRPOTrainer.__init__ loads no reference model when args.beta == 0 (and sync_ref_model is off): "
        "DGPOTrainer hides beta and sync_ref_model while it runs, then installs its own reference.",
    )


def test_the_attributes_dgpo_reads_exist(grpo):
    for name in ("temperature", "beta", "top_entropy_quantile", "num_iterations", "accelerator", "processing_class"):
        require(hasattr(grpo, name), f"GRPOTrainer sets `self.{name}`, which DGPOTrainer reads.")
    require(
        isinstance(grpo._metrics, dict)
        and {"train", "eval"} <= set(grpo._metrics)
        and grpo._metrics["train"]["dgpo/anything"] == [],
        "GRPOTrainer._metrics is {'train': defaultdict(list), 'eval': ...}, which log() averages: DGPO appends "
        "its dgpo/* metrics there.",
    )
    require(
        isinstance(getattr(grpo, "_logs", None), dict) and {"completion", "images"} <= set(grpo._logs),
        "GRPOTrainer._logs holds the completions table's 'completion' and 'images' columns, where "
        "TokenWeightHeatmapCallback puts each heatmap (it falls back to one image if not).",
    )


def test_the_logprob_method_takes_model_inputs_and_three_options():
    names = parameters(GRPOTrainer._get_per_token_logps_and_entropies)
    require(
        names[:5] == ["self", "model", "input_ids", "attention_mask", "logits_to_keep"],
        "_get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, ...): DGPOTrainer "
        "calls it with these positionally.",
    )
    from dgpo_trl.trainer import _SCORING_OPTIONS

    require(
        names[5:8] == list(_SCORING_OPTIONS),
        f"_get_per_token_logps_and_entropies's options are {list(_SCORING_OPTIONS)} and every other keyword is a "
        f"model input (DGPO's `_SCORING_OPTIONS`); its keywords are now {names[5:]}.",
    )


def test_the_logprob_method_calls_the_model_as_dgpos_joint_pass_expects(grpo):
    calls = []
    rows, length, keep = 5, 7, 3

    def model(**kwargs):
        calls.append(kwargs)
        n = kwargs["input_ids"].size(0)
        return SimpleNamespace(
            log_probs=torch.arange(n * length, dtype=torch.float).view(n, length),
            entropy=-torch.ones(n, length),
            aux_loss=None,
        )

    input_ids = torch.arange(rows * length).view(rows, length) + 4
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    attention_mask[0, :2] = 0
    logps, entropy, aux = GRPOTrainer._get_per_token_logps_and_entropies(
        grpo, model, input_ids, attention_mask, keep, batch_size=2, compute_entropy=True
    )
    require(
        len(calls) == 3 and [c["input_ids"].size(0) for c in calls] == [2, 2, 1],
        "_get_per_token_logps_and_entropies calls `model` once per chunk of `batch_size` rows: DGPO's joint pass "
        "stands in for the model and counts the rows it is given.",
    )
    require(
        all(
            set(c) == {"input_ids", "attention_mask", "labels", "fused_lm_head"} and c["fused_lm_head"] is True
            for c in calls
        ),
        "_get_per_token_logps_and_entropies calls model(input_ids=, attention_mask=, labels=, fused_lm_head=True) "
        "for a text model: DGPO's joint pass takes exactly these.",
    )
    labels = torch.cat([c["labels"] for c in calls])
    expected = input_ids.masked_fill(attention_mask == 0, -100)
    expected[:, :-keep] = -100
    require(
        torch.equal(labels, expected),
        "the labels are the input ids on the last `logits_to_keep` positions and -100 elsewhere: DGPO scores the "
        "positions whose label is not -100.",
    )
    outputs = torch.arange(rows * length, dtype=torch.float).view(rows, length)
    outputs = torch.cat([outputs[:2], outputs[:2], outputs[:1]])  # each chunk's stub output restarts at 0
    require(
        torch.equal(logps, outputs[:, -keep:]) and torch.equal(entropy, -torch.ones(rows, keep)) and aux is None,
        "_get_per_token_logps_and_entropies returns (outputs.log_probs, outputs.entropy, aux) over the last "
        "`logits_to_keep` positions: DGPO's joint pass returns its own statistics that way.",
    )


def test_scoring_calls_the_logprob_method_with_the_policy_and_reads_beta_then(grpo, monkeypatch):
    calls = []
    original = grpo._get_per_token_logps_and_entropies

    def spy(model, *args, **kwargs):
        result = original(model, *args, **kwargs)
        calls.append((model, result[0]))
        return result

    monkeypatch.setattr(grpo, "_get_per_token_logps_and_entropies", spy)
    # pi_old log-probs are needed when generation and optimizer steps are misaligned
    monkeypatch.setattr(grpo.args, "steps_per_generation", 2)
    monkeypatch.setattr(grpo, "ref_model", grpo.model)  # a stand-in reference, for the beta != 0 branch
    batch = [row for row in reversal_dataset(2, seed=3) for _ in range(4)]
    grpo.model.train()
    try:
        with torch.no_grad():
            output = grpo._generate_and_score_completions(batch)
            policy_calls = len(calls)
            monkeypatch.setattr(grpo, "beta", 0.04)
            with_beta = grpo._generate_and_score_completions(batch)
    finally:
        grpo.model.eval()
    require(
        policy_calls == 1 and calls[0][0] is grpo.model and torch.equal(output["old_per_token_logps"], calls[0][1]),
        "_generate_and_score_completions gets pi_old log-probs from "
        "self._get_per_token_logps_and_entropies(self.model, ...): DGPO answers that call with its joint pass.",
    )
    require(
        "ref_per_token_logps" not in output
        and len(calls) == 3
        and calls[2][0] is grpo.ref_model
        and torch.equal(with_beta["ref_per_token_logps"], calls[2][1]),
        "_generate_and_score_completions runs the reference forward, through "
        "self._get_per_token_logps_and_entropies(self.ref_model, ...), only when self.beta != 0, and stores what it "
        "returns as ref_per_token_logps: DGPO answers that call (its own reference forward gives those log-probs) "
        "and writes them before the loss reads them.",
    )


def test_generate_and_score_returns_the_keys_dgpo_reads(grpo):
    batch = [row for row in reversal_dataset(2, seed=4) for _ in range(4)]
    grpo.model.train()
    try:
        with torch.no_grad():
            output = grpo._generate_and_score_completions(batch)
    finally:
        grpo.model.eval()
    for key in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages"):
        require(key in output, f"_generate_and_score_completions returns `{key}`, which DGPOTrainer reads.")
    rows, length = output["completion_ids"].shape
    require(
        output["completion_mask"].shape == (rows, length) and output["advantages"].shape == (rows,),
        "_generate_and_score_completions returns one sequence advantage per completion, (B,), and a (B, T) "
        "completion mask: DGPO turns them into (B, T) per-token advantages.",
    )


def test_compute_loss_reads_advantages_after_its_logprob_call(grpo, monkeypatch):
    inputs = completion_batch(grpo)
    mask = inputs["completion_mask"].float()
    per_token = torch.linspace(-2, 3, mask.numel()).view(mask.shape)
    original = grpo._get_per_token_logps_and_entropies

    def weigh_during_the_forward(*args, **kwargs):
        result = original(*args, **kwargs)
        inputs["advantages"] = per_token  # as DGPO's loss-time path does, from the forward's hidden states
        return result

    monkeypatch.setattr(grpo, "_get_per_token_logps_and_entropies", weigh_during_the_forward)
    loss = grpo._compute_loss(grpo.model, inputs)
    require(
        torch.allclose(loss, grpo_loss(per_token, mask), atol=1e-6) and loss.abs() > 0.1,
        "_compute_loss reads inputs['advantages'] after its _get_per_token_logps_and_entropies call: DGPO computes "
        "the weights inside that call, from the training forward.",
    )


def test_compute_loss_reads_reference_logps_after_its_logprob_call(grpo, monkeypatch):
    inputs = completion_batch(grpo)
    mask = inputs["completion_mask"].float()
    inputs["advantages"] = torch.tensor([1.0, -0.5, 2.0, 0.25])
    inputs["ref_per_token_logps"] = torch.full(mask.shape, -30.0)  # a KL term far from 0, if this were read
    original = grpo._get_per_token_logps_and_entropies

    def reference_during_the_forward(*args, **kwargs):
        result = original(*args, **kwargs)
        inputs["ref_per_token_logps"] = result[0].detach()  # KL = 0
        return result

    monkeypatch.setattr(grpo, "_get_per_token_logps_and_entropies", reference_during_the_forward)
    monkeypatch.setattr(grpo, "beta", 0.04)
    loss = grpo._compute_loss(grpo.model, inputs)
    require(
        torch.allclose(loss, grpo_loss(inputs["advantages"].unsqueeze(1).expand_as(mask), mask), atol=1e-6),
        "_compute_loss reads inputs['ref_per_token_logps'] (beta != 0) after its _get_per_token_logps_and_entropies "
        "call: DGPO fills it from its own reference forward inside that call.",
    )


def test_compute_loss_takes_per_token_advantages(grpo):
    inputs = completion_batch(grpo)
    mask = inputs["completion_mask"].float()
    sequence = torch.tensor([1.0, -0.5, 2.0, 0.25])
    inputs["advantages"] = sequence
    flat = grpo._compute_loss(grpo.model, inputs)
    inputs["advantages"] = sequence.unsqueeze(1).expand_as(mask).clone()
    broadcast = grpo._compute_loss(grpo.model, inputs)
    weights = torch.linspace(0.2, 2.5, mask.numel()).view(mask.shape)
    inputs["advantages"] = sequence.unsqueeze(1) * weights
    weighted = grpo._compute_loss(grpo.model, inputs)
    require(
        torch.equal(flat, broadcast) and torch.allclose(weighted, grpo_loss(inputs["advantages"], mask), atol=1e-6),
        "_compute_loss takes (B, T) advantages as well as (B,) ones, each token's advantage multiplying its own "
        "loss term: DGPO's per-token advantages A_i * w_t.",
    )


def test_compute_loss_masks_entropy_before_reading_advantages(grpo, monkeypatch):
    inputs = completion_batch(grpo)
    mask = inputs["completion_mask"].float()
    per_token = torch.linspace(-2, 3, mask.numel()).view(mask.shape)
    original, kept = grpo.get_high_entropy_mask, []
    require(
        parameters(GRPOTrainer.get_high_entropy_mask) == ["self", "entropies", "mask", "threshold"],
        "GRPOTrainer.get_high_entropy_mask(entropies, mask, threshold), which DGPOTrainer overrides.",
    )

    def reallocate_under_the_mask(entropies, token_mask, threshold):
        kept.append(original(entropies, token_mask, threshold))
        inputs["advantages"] = per_token  # as DGPO moves the weights onto the kept tokens
        return kept[-1]

    monkeypatch.setattr(grpo, "get_high_entropy_mask", reallocate_under_the_mask)
    monkeypatch.setattr(grpo, "top_entropy_quantile", 0.5)
    loss = grpo._compute_loss(grpo.model, inputs)
    require(
        len(kept) == 1 and kept[0].dtype == torch.bool and kept[0].shape == mask.shape,
        "with top_entropy_quantile < 1, _compute_loss calls self.get_high_entropy_mask once, for a (B, T) bool mask.",
    )
    require(
        torch.allclose(loss, grpo_loss(per_token, mask, kept[0].float()), atol=1e-6),
        "_compute_loss reads inputs['advantages'] after get_high_entropy_mask and multiplies the per-token loss by "
        "that mask: DGPO moves each completion's weight onto the kept tokens there.",
    )


def test_the_generation_batch_is_split_and_shuffled_row_by_row(grpo, monkeypatch):
    rows, length = 8, 5
    row_id = torch.arange(rows, dtype=torch.float)
    batch = {
        "prompt_ids": row_id.long().unsqueeze(1).repeat(1, 3),
        "advantages": row_id.unsqueeze(1).repeat(1, length),  # DGPO's (B, T) advantages
        "dgpo_sequence_advantages": row_id.clone(),  # and the extra keys it may add
        "dgpo_weight_logits": row_id.unsqueeze(1).repeat(1, length),
        "num_items_in_batch": torch.tensor(40),
    }
    monkeypatch.setattr(grpo, "_generate_and_score_completions", lambda generation_batch: dict(batch))
    monkeypatch.setattr(grpo.args, "steps_per_generation", 2)
    monkeypatch.setattr(grpo, "_step", 0)
    monkeypatch.setattr(grpo, "_buffered_inputs", None)
    grpo.model.train()
    try:
        parts = [grpo._prepare_inputs([{}] * rows)]
        monkeypatch.setattr(grpo, "_step", 1)
        parts.append(grpo._prepare_inputs([{}] * rows))
    finally:
        grpo.model.eval()
    ids = torch.cat([part["prompt_ids"][:, 0] for part in parts]).float()
    aligned = all(
        torch.equal(part["advantages"], part["prompt_ids"][:, :1].float().expand(-1, length))
        and torch.equal(part["dgpo_sequence_advantages"], part["prompt_ids"][:, 0].float())
        and torch.equal(part["dgpo_weight_logits"], part["advantages"])
        for part in parts
    )
    require(
        sorted(ids.tolist()) == row_id.tolist() and aligned and int(parts[1]["num_items_in_batch"]) == 40,
        "_prepare_inputs shuffles and splits every tensor of the generation batch along dim 0, extra keys "
        "included, and keeps 0-d ones whole: DGPO's (B, T) advantages and its extra keys stay with their rows.",
    )


def test_the_helpers_dgpo_imports_take_the_arguments_it_passes():
    from trl.models import prepare_deepspeed, prepare_fsdp
    from trl.trainer.callbacks import SyncRefModelCallback
    from trl.trainer.utils import (
        add_fused_lm_head,
        create_model_from_path,
        disable_dropout_in_model,
        get_config_model_id,
        maybe_gather_lm_head_ctx,
        use_adapter,
    )

    calls = {
        add_fused_lm_head: ((None,), {"temperature": 1.0, "cast_lm_head_to_fp32": False}),
        create_model_from_path: (("path",), {"dtype": None, "attn_implementation": None}),
        disable_dropout_in_model: ((None,), {}),
        get_config_model_id: ((None,), {}),
        maybe_gather_lm_head_ctx: ((None, None, None, None), {}),
        use_adapter: ((None,), {"adapter_name": None}),
        prepare_deepspeed: ((None, None), {}),
        prepare_fsdp: ((None, None), {}),
        SyncRefModelCallback: ((), {"ref_model": None, "accelerator": None}),
    }
    for function, (args, kwargs) in calls.items():
        try:
            inspect.signature(function).bind(*args, **kwargs)
        except TypeError as error:
            require(
                False,
                f"{function.__module__}.{function.__qualname__} takes the arguments DGPOTrainer passes ({error}).",
            )


def test_the_peft_reference_call_is_recognisable_by_the_adapter_state(tiny_model_path):
    """TRL's reference forward of a PEFT policy is a call with the policy itself, inside
    `use_adapter(model, "ref" if "ref" in model.peft_config else None)`; DGPO recognises it by the PeftModel's
    state."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import use_adapter

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_path),
        LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"),
    )
    with use_adapter(model, adapter_name=None):
        disabled = model._adapters_disabled
    require(
        disabled and not model._adapters_disabled,
        "trl.trainer.utils.use_adapter(model, None) disables the adapters through PeftModel.disable_adapter, "
        "which sets PeftModel._adapters_disabled while it is active: DGPO answers TRL's reference call by it.",
    )
    model.add_adapter("ref", LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with use_adapter(model, adapter_name="ref"):
        active = model.active_adapter
    require(
        active == "ref" and model.active_adapter == "default",
        "trl.trainer.utils.use_adapter(model, 'ref') makes 'ref' the active adapter while it is active.",
    )


LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_normalizer_is_the_one_row_skipping_rescales(grpo, monkeypatch, loss_type):
    """DGPO trains only the rows with a nonzero advantage and rescales TRL's loss by `loss_scale`: row count for
    grpo/sapo/dr_grpo/luspo, valid tokens for bnpo, num_items_in_batch (unchanged) for dapo/cispo/vespo."""
    from dgpo_trl.skipping import loss_scale, take_rows

    monkeypatch.setattr(grpo, "loss_type", loss_type)
    inputs = completion_batch(grpo, rows=4)
    inputs["advantages"] = torch.tensor([1.0, 0.0, -0.5, 0.0])
    rows = torch.tensor([0, 2])
    with torch.no_grad():
        full = grpo._compute_loss(grpo.model, inputs)
        part = grpo._compute_loss(grpo.model, take_rows(inputs, rows))
    scaled = part * loss_scale(loss_type, inputs["completion_mask"].bool(), rows)
    require(
        full.abs() > 0 and torch.allclose(scaled, full, rtol=1e-5, atol=0),
        f"loss_type={loss_type!r}: the loss over the rows with a nonzero advantage, rescaled by DGPO's "
        f"`loss_scale`, is the loss over every row (a zero-advantage row contributes 0 and only the normalizer "
        f"sees it); got {scaled.item()} for {full.item()}.",
    )


@pytest.mark.parametrize("loss_type", ["grpo", "cispo"])
def test_a_zero_advantage_row_is_never_counted_as_clipped(grpo, monkeypatch, loss_type):
    """TRL's clip-ratio metrics count a token as clipped only where its advantage is nonzero: DGPO corrects them to
    cover every row by the kept rows' share of the valid tokens (`dgpo_trl.skipping.full_batch_metrics`)."""
    from dgpo_trl.skipping import CLIPPED_FRACTIONS

    monkeypatch.setattr(grpo, "loss_type", loss_type)
    if loss_type == "cispo":  # CISPO caps the ratio at epsilon_high (TRL suggests ~5); a ratio of 1 is then unclipped
        monkeypatch.setattr(grpo, "epsilon_high", 5.0)
    inputs = completion_batch(grpo, rows=4)
    inputs["advantages"] = torch.tensor([0.0, 1.0, 0.0, -1.0])
    # Ratios far outside every clip range, on the zero-advantage rows only (the others at a ratio of 1)
    with torch.no_grad():
        logps, _, _ = grpo._get_per_token_logps_and_entropies(
            grpo.model,
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
            inputs["completion_ids"].size(1),
        )
    inputs["old_per_token_logps"] = logps - torch.tensor([5.0, 0.0, -5.0, 0.0]).unsqueeze(1)
    grpo._metrics["eval"].clear()
    with torch.no_grad():
        grpo._compute_loss(grpo.model, inputs)
    logged = {key: values[-1] for key, values in grpo._metrics["eval"].items()}
    fractions = [key for key in CLIPPED_FRACTIONS if key in logged]
    require(
        fractions and all(logged[key] == 0.0 for key in fractions) and "entropy" in logged,
        f"loss_type={loss_type!r}: TRL's in-loss metrics {fractions} count no clipped token on zero-advantage "
        f"rows, and `entropy` is logged from the loss; got {logged}.",
    )


def test_the_settings_that_stop_row_skipping_are_trl_attributes(grpo):
    for name in ("beta", "_entropy_bonus_enabled", "aux_loss_enabled", "top_entropy_quantile", "loss_type"):
        require(
            hasattr(grpo, name),
            f"GRPOTrainer sets `self.{name}`, which DGPO's row skipping reads (dgpo_trl.skipping.skipping_blockers).",
        )
