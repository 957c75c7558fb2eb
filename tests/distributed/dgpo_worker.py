"""One rank of a multi-process DGPO run: what `tests/test_distributed.py` launches with `accelerate launch`.

Runs one or more short DGPO trainings ("runs") in this process and writes, per run and per rank, everything the test
needs to check them from outside: the world size and backend actually in use, every call to
`DGPOTrainer._apply_token_weights` (the rows scored, their padded inputs, their token weights and advantages, and at
scoring time TRL's old log-probs), per-step counts of reference-backbone forwards and divergence passes (collectives
under ZeRO-3), the full parameters at the start of every step (gathered under ZeRO-3; rank 0 only) and at the end
(every rank), the log history, the number of causal-LM instances alive, this process's peak RSS, the precision the
models ran in, and on every micro-step with TRL's old log-probs the largest |log pi_theta - old_per_token_logps| (the
log of TRL's PPO ratio).

Runs:
  full     full-model DGPO, statistics at loss time (the default: steps_per_generation == gradient_accumulation_steps).
  scoring  full-model DGPO, statistics at scoring time (steps_per_generation=2 > gradient_accumulation_steps=1:
           TRL runs a policy forward for old log-probs, which DGPO's joint pass replaces).
  lora     LoRA (PEFT) DGPO, loss time: the reference is the policy with its adapter disabled; no second model.
  in_memory  full-model DGPO on a model passed as an object and changed in memory after loading (noised weights; under
           ZeRO-3 loaded after the config, so `zero.Init` partitions it): its reference must be a copy of it.
  server   full-model DGPO generating through TRL's vLLM server branch with a stand-in engine (`StandInServer`) and
           TRL's importance-sampling correction: scoring time, and nothing runs on the trainer's model between an
           optimizer step and DGPO's scoring-time forwards (generation happens elsewhere), as with a real server.
  grpo     TRL's own GRPOTrainer on the same launch and settings, two micro-steps per generation (the control: the
           launch itself trains, and TRL's own first-micro-step ratio).
  checkpointed, resumed
           full-model DGPO for 4 steps saving a checkpoint at step 2; then a new trainer resumes from it and trains
           steps 2-3 again (the test compares the two).
  <run>_compact
           <run> (full, lora, scoring) with TRL's fused LM head projecting only the labelled positions, as it does
           where Triton runs (`tests/trl_head.py`; the run fails if TRL never asked which positions to project).
With --starve-step S (loss-time runs), at global step S every completion on rank --starve-rank gets the same reward, so
that rank has no completion with a nonzero advantage and nothing to score (the dummy-forward path under ZeRO-3).

Launch (see accelerate_configs/cpu_*.yaml):
  OMP_NUM_THREADS=1 accelerate launch --config_file accelerate_configs/cpu_zero3.yaml \
      tests/distributed/dgpo_worker.py --model /path/to/tiny --out /tmp/out --runs lora,full,scoring
A launch with `--mixed_precision bf16` trains in bf16 as the GPU configs do (see `run`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
from trl_head import compact_lm_head  # noqa: E402

# Shared with tests/test_distributed.py, which recomputes the weights with the same settings
SETTINGS = {
    "per_device_train_batch_size": 8,
    "num_generations": 4,
    "max_completion_length": 8,
    "learning_rate": 3e-3,
    "temperature": 0.8,
    "dgpo_tau": 0.005,
    "dgpo_kappa": 1.0,
}
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "lora_dropout": 0.0}
# Per-run overrides. LoRA moves the policy less per step, so it gets a larger learning rate: its token weights must
# spread enough after one step for a wrong reference or misaligned rows to show in the comparison.
RUN_SETTINGS = {
    # Adaptive tau: every rank must bisect on the global mean ESS (a collective per iteration, starved rank included)
    "full": {"dgpo_target_ess": 0.9},
    "scoring": {"steps_per_generation": 2},  # > gradient_accumulation_steps = 1: scoring-time statistics
    "lora": {"learning_rate": 3e-2},
    "in_memory": {},
    # TRL asks for old log-probs to correct for the engine's sampling log-probs: scoring time at every step
    "server": {"vllm_importance_sampling_correction": True, "vllm_importance_sampling_mode": "token_truncate"},
    # Two micro-steps per generation, so TRL itself computes old log-probs: the control for the first-micro-step ratio
    "grpo": {"steps_per_generation": 2},
    "checkpointed": {"save_strategy": "steps", "save_steps": 2},
    "resumed": {"save_strategy": "steps", "save_steps": 2},
}
# A run named "<run>_compact" is <run> with TRL's fused LM head on its GPU path (`tests/trl_head.py`); one named
# "<run>_every_row" is <run> training every completion, zero-advantage ones included (`dgpo_skip_zero_advantage=False`)
COMPACT, EVERY_ROW = "_compact", "_every_row"
RESUME_STEPS, RESUME_FROM = 4, 2  # the checkpointed run's steps, and the step of the checkpoint the resumed run loads
IN_MEMORY_NOISE = 0.05  # std of the noise added to the loaded weights: the in-memory model is not the checkpoint


def digit_fraction_reward(completions, trainer_state=None, **kwargs):
    """Fraction of digit characters: varies between completions of a random model, so most advantages are nonzero.

    When STARVE_RANK/STARVE_STEP are set, every completion of that rank at that global step gets 0.5: all its groups
    then have zero reward variance and zero advantage (TRL keeps each group of `num_generations` on one rank).
    """
    rank = int(os.environ.get("RANK", "0"))
    starve_rank, starve_step = os.environ.get("STARVE_RANK"), os.environ.get("STARVE_STEP")
    if starve_rank is not None and rank == int(starve_rank) and trainer_state.global_step == int(starve_step):
        return [0.5] * len(completions)
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def full_parameters(model, zero3: bool) -> dict[str, torch.Tensor]:
    """A CPU copy of every parameter, gathered first under ZeRO-3 or FSDP2 (a collective: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    params = list(model.named_parameters())
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
    else:
        ctx = nullcontext()
    with torch.no_grad(), ctx:
        return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone().cpu() for name, p in params}


def parameter_bytes(model) -> dict:
    """The bytes of `model`'s parameters this rank holds, and the bytes of the whole model (ZeRO-3 partitions, FSDP2
    DTensor shards, or whole tensors), plus how many of its decoder layers are FSDP2 units of their own."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    local = total = 0
    for param in model.parameters():
        if hasattr(param, "ds_id"):  # ZeRO-3: the partition this rank owns
            local += param.ds_tensor.numel() * param.element_size()
            total += param.ds_numel * param.element_size()
        elif isinstance(param, DTensor):
            local += param.to_local().numel() * param.element_size()
            total += param.numel() * param.element_size()
        else:
            local += param.numel() * param.element_size()
            total += param.numel() * param.element_size()
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    return {
        "local": local,
        "total": total,
        "layers": len(layers),
        "fsdp_layers": sum(isinstance(m, FSDPModule) for m in layers),
    }


class StandInServer:
    """Stands in for TRL's `VLLMGeneration` in server mode: returns completions sampled elsewhere (random tokens from a
    per-rank seeded generator, some ending with EOS) and per-token sampling log-probs near the trainer's, without
    running the trainer's model, as a real server does."""

    def __init__(self, vocab_size: int, eos_token_id: int, max_completion_length: int, seed: int):
        self.vocab_size, self.eos_token_id, self.max_len = vocab_size, eos_token_id, max_completion_length
        self.generator = torch.Generator().manual_seed(seed)

    def sync_weights(self):
        pass

    def generate(self, prompts, images, num_generations, profiler=None):
        import math

        g = self.generator
        completion_ids, logprobs = [], []
        for i, _ in enumerate(prompts):
            length = int(torch.randint(2, self.max_len + 1, (1,), generator=g))
            ids = torch.randint(4, self.vocab_size, (length,), generator=g).tolist()
            if i % 3 != 0:
                ids[-1] = self.eos_token_id
            completion_ids.append(ids)
            lps = (-math.log(self.vocab_size) + 0.05 * torch.randn(length, generator=g)).tolist()
            logprobs.append([[lp] for lp in lps])
        return [list(p) for p in prompts], completion_ids, logprobs, None


def char_tokenizer(model_dir: str):
    """The tiny model's char-level tokenizer, loaded as saved (not as the class AutoProcessor picks by model type)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(model_dir)


def count_causal_lms() -> int:
    import warnings

    from transformers import LlamaForCausalLM

    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on some lazy module objects warns
        return sum(1 for obj in gc.get_objects() if isinstance(obj, LlamaForCausalLM))


def run(name: str, cli, dataset, out: Path) -> None:
    import torch.distributed as dist
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dgpo_trl import DGPOConfig, DGPOTrainer
    from dgpo_trl.accelerate_cpu_fsdp import check_cpu_fsdp_launch

    rank = int(os.environ["RANK"])
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    use_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    base, compact = name.removesuffix(COMPACT).removesuffix(EVERY_ROW), name.endswith(COMPACT)
    dgpo = base != "grpo"
    settings = dict(SETTINGS, **RUN_SETTINGS[base])
    if name.endswith(EVERY_ROW):
        settings["dgpo_skip_zero_advantage"] = False
    steps = cli.steps + (1 if base == "scoring" else 0)  # two generations at steps 0 and 2
    if base in ("checkpointed", "resumed"):
        steps = RESUME_STEPS
    if not dgpo:
        settings = {key: value for key, value in settings.items() if not key.startswith("dgpo_")}
        # What a script with a plain GRPOConfig does for CPU FSDP (DGPOConfig does it itself)
        check_cpu_fsdp_launch()
    args = (DGPOConfig if dgpo else GRPOConfig)(
        output_dir=str(out / f"ckpt_{'checkpointed' if name == 'resumed' else name}"),
        max_steps=steps,
        lr_scheduler_type="constant",
        logging_steps=1,
        report_to="none",
        save_strategy=settings.pop("save_strategy", "no"),
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=0,
        ddp_backend="gloo",
        # A rank stuck in a collective (a deadlock) raises after this long instead of hanging the launch
        ddp_timeout=cli.ddp_timeout,
        # DDP on CPU needs use_cpu; DeepSpeed and FSDP must not have it (accelerate would then drop them for DDP)
        use_cpu=not (use_deepspeed or use_fsdp),
        **settings,
    )
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") == "bf16":
        # A launch with `mixed_precision: bf16` (the GPU configs'; `--mixed_precision bf16` here) trains in bf16
        # through accelerate whatever `bf16` says, but HF's DeepSpeed integration refuses a DeepSpeed config with bf16
        # enabled unless `bf16=True` ("ds bf16.enabled=True vs hf bf16|bf16_full_eval=False"), and TrainingArguments
        # refuses `bf16=True` on a host without a GPU unless `use_cpu` ("Your setup doesn't support bf16/gpu"), which
        # drops DeepSpeed and FSDP. Set after that check, it is what `bf16=True` is on a GPU.
        args.bf16 = True
    peft_config = None
    if base == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **LORA)
    if base in ("full", "lora") and cli.starve_step is not None:
        os.environ["STARVE_RANK"], os.environ["STARVE_STEP"] = str(cli.starve_rank), str(cli.starve_step)
    else:
        os.environ.pop("STARVE_RANK", None)
        os.environ.pop("STARVE_STEP", None)

    models_before = count_causal_lms()
    states: dict[int, dict[str, torch.Tensor]] = {}
    model, in_memory = cli.model, {}
    if name == "in_memory":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cli.model, dtype=torch.float32)
        in_memory["partitioned"] = any(hasattr(p, "ds_id") for p in model.parameters())
        noise = torch.Generator().manual_seed(7)  # the same noise on every rank
        if in_memory["partitioned"]:
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0)
        else:
            gathered = nullcontext()
        with gathered, torch.no_grad():
            for param in model.parameters():
                param.add_(IN_MEMORY_NOISE * torch.randn(param.shape, generator=noise))
        in_memory["passed"] = full_parameters(model, in_memory["partitioned"])

    class StateDump(TrainerCallback):
        """Parameters at the start of every step: weights computed during step k use `states[k]`."""

        def on_train_begin(self, args, state, control, **kwargs):
            states[state.global_step] = full_parameters(trainer.accelerator.unwrap_model(trainer.model), zero3)
            if in_memory:
                in_memory["reference"] = full_parameters(trainer.reference.model, zero3)

        def on_step_end(self, args, state, control, **kwargs):
            states[state.global_step] = full_parameters(trainer.accelerator.unwrap_model(trainer.model), zero3)

    trainer = (DGPOTrainer if dgpo else GRPOTrainer)(
        model,
        reward_funcs=digit_fraction_reward,
        args=args,
        train_dataset=dataset,
        peft_config=peft_config,
        callbacks=[StateDump()],
        processing_class=char_tokenizer(cli.model) if cli.char_tokenizer else None,
    )
    models_after = count_causal_lms()
    accelerator = trainer.accelerator
    plugin = accelerator.state.deepspeed_plugin
    zero_stage = plugin.zero_stage if plugin is not None else None
    zero3 = zero_stage == 3
    fsdp_plugin = accelerator.state.fsdp_plugin if use_fsdp else None
    world = dist.get_world_size() if dist.is_initialized() else 1
    # A launcher that silently started independent single processes must fail here, not pass vacuously
    assert world == 2 and accelerator.num_processes == 2, (world, accelerator.num_processes)
    assert use_deepspeed == (accelerator.distributed_type.value == "DEEPSPEED"), accelerator.distributed_type
    assert use_fsdp == (accelerator.distributed_type.value == "FSDP"), accelerator.distributed_type
    if name == "server":
        # TRL's vLLM branch (server mode) with a stand-in engine: the trainer's model does not generate
        trainer.use_vllm, trainer.vllm_mode, trainer._last_loaded_step = True, "server", -1
        tokenizer = trainer.processing_class
        trainer.vllm_generation = StandInServer(
            len(tokenizer), tokenizer.eos_token_id, args.max_completion_length, seed=rank
        )

    records = []
    ref_forwards, divergence_passes, policy_forwards = Counter(), Counter(), Counter()
    undo = instrument(trainer, records, ref_forwards, divergence_passes, policy_forwards) if dgpo else []
    log_ratios = []
    undo.append(record_log_ratios(trainer, log_ratios))

    start = time.perf_counter()
    checkpoint = out / "ckpt_checkpointed" / f"checkpoint-{RESUME_FROM}"
    # TRL's fused LM head projects only the labelled positions, as on a GPU (exiting checks that TRL asked)
    head_path = compact_lm_head() if compact else nullcontext([])
    with head_path as asked:
        trainer.train(resume_from_checkpoint=str(checkpoint) if name == "resumed" else None)
    train_seconds = time.perf_counter() - start
    for undo_one in undo:
        undo_one()

    final = full_parameters(accelerator.unwrap_model(trainer.model), zero3)
    result = {
        "run": name,
        "rank": rank,
        "world_size": world,
        "num_processes": accelerator.num_processes,
        "machine": {key: os.environ.get(key) for key in ("LOCAL_RANK", "GROUP_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")},
        "distributed_type": accelerator.distributed_type.value,
        "zero_stage": zero_stage,
        "ref_model_is_none": trainer.ref_model is None,
        "reference_bytes": None if trainer.ref_model is None else parameter_bytes(trainer.ref_model),
        "policy_bytes": parameter_bytes(trainer.model),
        "is_peft": base == "lora",
        "compact_lm_head": len(asked),  # how often TRL asked which positions to project on its GPU path
        "mixed_precision": accelerator.mixed_precision,
        # What the ranks compute in: DeepSpeed's bf16 holds the models in bf16, FSDP2 casts its fp32 shards per unit
        "parameter_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters()}),
        "fsdp_param_dtype": str(getattr(getattr(fsdp_plugin, "mixed_precision_policy", None), "param_dtype", None)),
        "log_ratios": log_ratios,
        "causal_lms_before": models_before,
        "causal_lms_after": models_after,
        "records": records,
        "ref_forwards": dict(ref_forwards),
        "policy_forwards": dict(policy_forwards),
        "divergence_passes": dict(divergence_passes),
        "final_params": final,
        "train_seconds": train_seconds,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "settings": dict(settings, steps_per_generation=args.steps_per_generation, max_steps=steps),
        "in_memory": in_memory,
    }
    if rank == 0:
        result["states"] = states
        result["log_history"] = trainer.state.log_history
    torch.save(result, out / f"{name}_rank{rank}.pt")
    if rank == 0:
        (out / f"{name}_log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))

    # Free this run's engine before the next one (the model count of a later run must not see it)
    trainer.accelerator.free_memory()
    trainer = states = records = final = model = in_memory = None  # (the callbacks' closures hold these names)
    gc.collect()
    dist.barrier()


def record_log_ratios(trainer, log_ratios: list) -> Callable[[], None]:
    """Records, for every training micro-step that has TRL's old log-probs, (global step, max |log pi_theta -
    old_per_token_logps| over its completion tokens): the log of TRL's PPO ratio, exactly 0 on the first micro-step
    after a generation (no update has happened since). Reads TRL's own `_compute_loss` (DGPO's may hand it a subset of
    the rows) and the training forward it runs. Returns the callable that undoes it."""
    from trl import GRPOTrainer

    pending = []
    compute_loss, per_token_logps = GRPOTrainer._compute_loss, trainer._get_per_token_logps_and_entropies

    def recording_compute_loss(self, model, inputs):
        pending[:] = [inputs] if self is trainer else []
        try:
            return compute_loss(self, model, inputs)
        finally:
            pending.clear()

    def recording_per_token_logps(*args, **kwargs):
        output = per_token_logps(*args, **kwargs)
        inputs = pending.pop() if pending else None  # the first call inside TRL's loss: its training forward
        if inputs is not None and inputs.get("old_per_token_logps") is not None:
            mask = inputs["completion_mask"].bool()
            difference = (output[0].detach() - inputs["old_per_token_logps"]).abs()[mask]
            log_ratios.append((trainer.state.global_step, difference.max().item() if difference.numel() else 0.0))
        return output

    GRPOTrainer._compute_loss = recording_compute_loss
    trainer._get_per_token_logps_and_entropies = recording_per_token_logps

    def undo():
        GRPOTrainer._compute_loss = compute_loss
        del trainer._get_per_token_logps_and_entropies

    return undo


def instrument(trainer, records, ref_forwards, divergence_passes, policy_forwards) -> list:
    """Records every `_apply_token_weights` call (into `records`) and counts, per global step, reference-backbone
    forwards, divergence passes (LM-head gathers under ZeRO-3) and policy-backbone forwards outside generation
    (training forward, plus scoring-time joint passes). Returns the callables that undo it, to run after training."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    import dgpo_trl.weighting as dgpo_weighting
    from dgpo_trl.forwards import causal_lm

    trainer.num_completions_to_show = 10**6  # keep every scored completion's weights in `last_token_weights`
    original_apply = trainer._apply_token_weights

    taus = []
    original_tau_search = dgpo_weighting.tau_for_target_ess

    def recording_tau_search(*a, **k):
        taus.append(original_tau_search(*a, **k))
        return taus[-1]

    dgpo_weighting.tau_for_target_ess = recording_tau_search

    def recording_apply(inputs, stats, rows):
        advantages = inputs["advantages"].clone()
        taus.clear()
        original_apply(inputs, stats, rows)
        shown = trainer.last_token_weights
        rec = {
            "step": trainer.state.global_step,
            "tau": taus[0] if taus else trainer.dgpo.tau,  # the tau these weights were computed with
            "path": "scoring" if "old_per_token_logps" in inputs else "loss",
            "rows": rows.cpu(),
            "advantages": advantages.cpu(),
            "prompt_ids": inputs["prompt_ids"][rows].cpu(),
            "prompt_mask": inputs["prompt_mask"][rows].cpu(),
            "completion_ids": inputs["completion_ids"][rows].cpu(),
            "completion_mask": inputs["completion_mask"][rows].cpu(),
            # (a call that scored no row leaves the previous batch's weights in last_token_weights)
            "weights": shown["weights"].clone() if len(rows) else inputs["completion_mask"][rows].float().cpu(),
            "token_advantages": inputs["advantages"][rows].cpu(),
        }
        if "old_per_token_logps" in inputs:
            rec["old_per_token_logps"] = inputs["old_per_token_logps"][rows].cpu()
            rec["trl_old_per_token_logps"] = trl_old_logps(inputs)[rows].cpu()
        records.append(rec)

    trainer._apply_token_weights = recording_apply

    def trl_old_logps(inputs):
        """TRL's own old log-probs of a scored batch: its fused-LM-head policy forward, which DGPO's joint pass
        answers in its place at scoring time (a forward on every rank: ZeRO-3 gathers; not counted below)."""
        from trl import GRPOTrainer

        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        generating.append(True)
        try:
            with torch.no_grad():
                logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                    trainer, trainer.model, ids, attention, inputs["completion_ids"].size(1)
                )
        finally:
            generating.pop()
        return logps

    generating = []
    original_generate = trainer._generate

    def flagged_generate(*a, **k):
        generating.append(True)
        try:
            return original_generate(*a, **k)
        finally:
            generating.pop()

    trainer._generate = flagged_generate

    # With LoRA the reference pass runs the policy's own backbone with the adapter disabled: tell the two apart by
    # PEFT's flag on an adapter layer at call time
    adapter_layers = [m for m in trainer._policy().modules() if isinstance(m, BaseTunerLayer)]

    def count_policy_backbone_forward(*a):
        if adapter_layers and adapter_layers[0].disable_adapters:
            ref_forwards.update([trainer.state.global_step])
        elif not generating:
            policy_forwards.update([trainer.state.global_step])

    policy_backbone = causal_lm(trainer._policy()).base_model
    handles = [policy_backbone.register_forward_hook(count_policy_backbone_forward)]
    if trainer.ref_model is not None:
        ref_backbone = causal_lm(trainer.accelerator.unwrap_model(trainer.ref_model)).base_model
        handles.append(ref_backbone.register_forward_hook(lambda *a: ref_forwards.update([trainer.state.global_step])))
    original_divergence = trainer._divergence_pass

    def counting_divergence(*a, **k):
        divergence_passes.update([trainer.state.global_step])
        return original_divergence(*a, **k)

    trainer._divergence_pass = counting_divergence
    restore_tau_search = lambda: setattr(dgpo_weighting, "tau_for_target_ess", original_tau_search)  # noqa: E731
    return [handle.remove for handle in handles] + [restore_tau_search]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved tiny model (dgpo_trl.tiny.build_tiny_model)")
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--runs", default="full",
        help="comma-separated: full, scoring, lora, in_memory, server, grpo, checkpointed, resumed, and full, lora, "
        "scoring with the suffix _compact",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--starve-rank", type=int, default=1)
    parser.add_argument("--starve-step", type=int, default=None)
    parser.add_argument("--ddp-timeout", type=int, default=180, help="seconds a collective may wait")
    parser.add_argument(
        "--char-tokenizer", action="store_true",
        help="pass the model's saved tokenizer as a PreTrainedTokenizerFast (non-Llama tiny models: TRL's "
        "AutoProcessor picks a tokenizer class by model type, and Qwen2Tokenizer drops whitespace)",
    )  # fmt: skip
    cli = parser.parse_args()
    out = Path(cli.out)
    out.mkdir(parents=True, exist_ok=True)

    from dgpo_trl.tasks import reversal_dataset

    dataset = reversal_dataset(256, seed=0)
    for name in cli.runs.split(","):
        run(name, cli, dataset, out)
    (out / f"done_rank{os.environ['RANK']}").write_text("ok")


if __name__ == "__main__":
    main()
