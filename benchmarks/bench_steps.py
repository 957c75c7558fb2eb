"""End-to-end benchmark of whole generation cycles: DGPO vs GRPO(beta=0.04) vs GRPO(beta=0), interleaved in one
process.

Every variant is a real trainer (TRL's `GRPOTrainer` for the baselines, `DGPOTrainer` for DGPO) on the same model,
data, batch, generation length, learning rate and seed. Each trainer's `train()` runs in its own thread, but a baton
lets exactly one run at a time and passes it on after every optimizer step, so the steps are interleaved
A B C A B C ... and machine drift hits every variant alike.

What is timed is a *generation cycle*: one generation plus the optimizer steps trained on it (`steps_per_generation`
of them), i.e. the sum of those steps' times. A step's time runs from receiving the baton to the end of its optimizer
step (generation, rewards, scoring, forward, backward, optimizer and the previous step's logging all included). The
first cycles are warm-up and not counted. `cycle_ms` is the mean over the timed cycles (on the aligned path DGPO's
cost per cycle depends on how many of its completions have a nonzero advantage, so its cycle times are bimodal and a
median would pick one mode), `cycle_median_ms` and `cycle_min_ms` are given too; `generate_ms` is the mean time in
TRL's `_generate` (the same HF generation for every variant) and the ratio `train_time` compares the cycles without
it.

Two paths through the trainers (gradient_accumulation_steps = 1 on both):
- aligned:    steps_per_generation = 1. One optimizer step per generation: pi_old == pi_theta when the batch is
              trained, TRL computes no old log-probs, DGPO takes pi_theta's statistics from the training forward and
              scores only the completions with a nonzero advantage (`dgpo_skip_zero_advantage`).
- offpolicy:  steps_per_generation = 8 (the paper's 512 prompts generated, 64 per update). TRL runs a scoring-time
              policy forward for old log-probs over the whole generation batch, and DGPO computes every completion's
              statistics there (the rewards are not known yet at that forward, so nothing is skipped).

Vocabulary: the character tokenizer has 99 tokens; `--vocab 151936` (Qwen2/Qwen2.5's size, the default) pads the
model's vocabulary with unused tokens after its SFT warm-up (see `pad_vocabulary`): the tokenizer keeps its 99 tokens,
the model's embedding and LM head get 151,936 rows, and the padding rows are set so that they carry a small
probability mass (at most e^-6 of the total on the warm-up data), as the long tail of a real LM's vocabulary does. At
that size the LM head is nearly all of a tiny model's compute, as it is most of what DGPO adds to a real one.

Variants:
- grpo_beta0:    GRPOTrainer, beta = 0 (no reference model at all)
- grpo_beta0.04: GRPOTrainer, beta = 0.04 (a reference forward on every completion, at scoring time)
- dgpo:          DGPOTrainer, defaults (beta = 0, dgpo_skip_zero_advantage=True)
- dgpo_noskip:   DGPOTrainer with dgpo_skip_zero_advantage=False (only differs from dgpo on the aligned path)

Rewards: exact match on string reversal, from an SFT-warmed model, so that some groups are all right or all wrong
and the others mixed (TRL's `frac_reward_zero_std` is reported); random-init models (`qwen2.5-0.5b`, `micro`) get
`mixed_reward`, a deterministic stand-in with the same kind of mix.

Peak memory: each trainer's first generation cycle, which sees the same data in every variant (same weights, and the
RNG is reseeded before each trainer's first generation; `mem_step_tokens` shows it): the trainer's resident tensors
(policy, reference, optimizer state) plus the largest transient peak of the cycle's steps:
torch.cuda.max_memory_allocated on a GPU; on CPU the peak of live tensor bytes, counted by a TorchDispatchMode that
sees every allocation and (through weakrefs) every free.

    OMP_NUM_THREADS=1 python benchmarks/bench_steps.py --quick   # tiny, V 151936, both paths, 8 completions x 16
                                                                 # tokens per step, 8 + 2 timed cycles (< 3 minutes)
    OMP_NUM_THREADS=1 python benchmarks/bench_steps.py           # the same at 16 completions x 32 tokens per step,
                                                                 # 20 + 4 timed cycles (~7 minutes of CPU)
    OMP_NUM_THREADS=1 python benchmarks/bench_steps.py --models tiny small --vocab 99 --paths aligned --batch 64 \
        --max-completion-length 8 --variants grpo_beta0 grpo_beta0.04 dgpo dgpo_noskip --rounds 40   # 99 tokens
    python benchmarks/bench_steps.py --device cuda --models qwen2.5-0.5b --batch 32 --max-completion-length 128
                                                                 # a GPU, bf16 (what benchmarks/gpu_check.py runs)
One torch thread per process on CPU: tiny models run ~10x faster here with 1 thread than with 2.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import threading
import time
import weakref
import zlib
from pathlib import Path


os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, machine_info, median, write_results  # noqa: E402


def mean(values):
    return sum(values) / len(values) if values else float("nan")


QWEN2_VOCAB = 151936
MODELS = {
    # SFT-warmed Llamas on string reversal (warm-up to ~0.2-0.35 sampled accuracy: informative groups)
    "tiny": dict(arch="llama", hidden=128, layers=2, heads=4, sft_steps=80),
    "small": dict(arch="llama", hidden=256, layers=4, heads=4, sft_steps=80),
    # Random-init Qwen2 shapes (no warm-up; `mixed_reward`): Qwen2.5-0.5B for GPUs, a micro one for dry runs
    "qwen2.5-0.5b": dict(arch="qwen2", hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, tied=True),
    "micro": dict(arch="qwen2", hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, tied=True),
}
PATHS = {"aligned": 1, "offpolicy": 8}  # steps_per_generation
VARIANTS = ("grpo_beta0", "grpo_beta0.04", "dgpo", "dgpo_noskip")
DEFAULT_VARIANTS = ("grpo_beta0", "grpo_beta0.04", "dgpo")


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storage allocated inside the mode and still alive, on any device.

    Each op's output storages are counted once (views share a storage) and uncounted when the storage is freed
    (a weakref finalizer: torch keeps one Python object per storage while it lives). Storages that existed before
    the mode was entered are not counted: the peak is the transient memory of what runs inside.
    """

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen = set()
        self._lock = threading.Lock()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                storage = t.untyped_storage()
                key = storage._cdata
                with self._lock:
                    if key in self._seen:
                        continue
                    self._seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key, nbytes):
        with self._lock:
            if key in self._seen:
                self._seen.discard(key)
                self.live -= nbytes


def resident_bytes(trainer) -> int:
    """Bytes of the tensors a trainer keeps between steps: policy and reference parameters/buffers, optimizer state."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in seen:
            seen.add(t.untyped_storage()._cdata)
            total += t.untyped_storage().nbytes()

    for model in (trainer.model, getattr(trainer, "ref_model", None)):
        if model is not None:
            for t in list(model.parameters()) + list(model.buffers()):
                add(t)
    if trainer.optimizer is not None:
        for state in trainer.optimizer.state.values():
            for t in state.values():
                add(t)
    return total


class Baton:
    """Lets one trainer thread run at a time, in a fixed order, skipping those that have finished."""

    def __init__(self, names):
        self.order = list(names)
        self.turn = 0
        self.finished = set()
        self.cond = threading.Condition()

    def wait(self, name):
        with self.cond:
            self.cond.wait_for(lambda: self.order[self.turn] == name)

    def pass_on(self, name, finished=False):
        with self.cond:
            if finished:
                self.finished.add(name)
            if len(self.finished) < len(self.order):
                self.turn = (self.turn + 1) % len(self.order)
                while self.order[self.turn] in self.finished:
                    self.turn = (self.turn + 1) % len(self.order)
            self.cond.notify_all()


def make_callback(name, trainer_ref, baton, record, device, steps_per_cycle, warmup_cycles):
    """Times each optimizer step from receiving the baton to its end, sums them per generation cycle, measures the
    first cycle's memory, and passes the baton on after every step."""
    from transformers import TrainerCallback

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    class Interleave(TrainerCallback):
        def __init__(self):
            self.start = None
            self.mode = None
            self.cycle_s = 0.0

        def _begin(self, step):
            # This trainer holds the baton from here until its next optimizer step ends
            if step <= steps_per_cycle:  # the first cycle: memory (its steps are never timed)
                if device.type == "cuda":
                    sync()
                    torch.cuda.reset_peak_memory_stats(device)
                    record["cuda_before"] = torch.cuda.memory_allocated(device)
                else:
                    self.mode = LiveTensorBytes()
                    self.mode.__enter__()
            if step == 1:
                # Same generation RNG for every variant's first step (the others' steps consumed the shared RNG)
                from transformers import set_seed

                set_seed(0)
            if (step - 1) % steps_per_cycle == 0:
                self.cycle_s = 0.0
                for key in PART_KEYS:
                    record[key] = 0.0
            sync()
            self.start = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self._begin(1)

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            elapsed = time.perf_counter() - self.start
            step = state.global_step
            self.cycle_s += elapsed
            if step <= steps_per_cycle:
                if device.type == "cuda":
                    transient = torch.cuda.max_memory_allocated(device) - record["cuda_before"]
                else:
                    self.mode.__exit__(None, None, None)
                    transient = self.mode.peak
                    self.mode = None
                record["transient_bytes"] = max(record.get("transient_bytes", 0), transient)
                if step == steps_per_cycle:
                    record["resident_bytes"] = resident_bytes(trainer_ref())
            if step % steps_per_cycle == 0 and step > warmup_cycles * steps_per_cycle:
                record["cycle_s"].append(self.cycle_s)
                for key in PART_KEYS:
                    record[f"{key}_cycles"].append(record[key])
            baton.pass_on(name)
            baton.wait(name)
            self._begin(step + 1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.global_step == 1:
                record["mem_step_tokens"] = logs.get("num_tokens")
            if logs and state.global_step > warmup_cycles * steps_per_cycle:
                record["logs"].append(dict(logs))

        def on_train_end(self, args, state, control, **kwargs):
            if self.mode is not None:
                self.mode.__exit__(None, None, None)
                self.mode = None
            baton.pass_on(name, finished=True)

    return Interleave()


# Per-cycle timed parts (seconds, summed over the cycle's calls)
PART_KEYS = ("scoring_s", "divergence_s", "generate_s", "stage_s")


def _timed(fn, record, keys, device):
    def wrapper(*args, **kwargs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            for key in keys:
                record[key] += time.perf_counter() - start

    return wrapper


def time_parts(trainer, record, device) -> None:
    """Wraps (instance attributes only) the trainer's generation and, for DGPO, its reference forward and divergence
    pass, to time them. Methods that a trainer does not have are left alone (their times are then not reported)."""
    if hasattr(trainer, "_generate"):
        trainer._generate = _timed(trainer._generate, record, ["generate_s"], device)
        record["has_generate"] = True
    # Generation, rewards and the scoring-time passes (TRL's old-log-prob and reference passes, or DGPO's): with the
    # generation subtracted, every variant's scoring stage, comparable across trainers
    trainer._generate_and_score_completions = _timed(
        trainer._generate_and_score_completions, record, ["stage_s"], device
    )
    record["has_stage"] = True
    forward = next((name for name in ("_reference_hidden", "_backbone_hidden") if hasattr(trainer, name)), None)
    if forward is not None:
        setattr(trainer, forward, _timed(getattr(trainer, forward), record, ["scoring_s"], device))
        record["has_scoring"] = True
    if hasattr(trainer, "_divergence_pass"):
        trainer._divergence_pass = _timed(trainer._divergence_pass, record, ["scoring_s", "divergence_s"], device)
        record["has_scoring"] = record["has_divergence"] = True


# ---------------------------------------------------------------------------------------------------------------------
# Models and rewards


def mixed_reward(prompts, completion_ids, **kwargs) -> list[float]:
    """A deterministic reward with a realistic mix for random-init models, whose completions are random tokens.

    Each prompt gets a success rate p from a hash of its text (0 or 1 for 3/8 of prompts, 0.1-0.9 for the others),
    each completion reward 1 with probability p, decided by a hash of its token ids. With 8 completions per prompt
    about half the groups are all right or all wrong (TRL's `frac_reward_zero_std` ~0.5), as with exact-match rewards
    on a partly trained policy.
    """
    rates = (0.0, 0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    rewards = []
    for prompt, ids in zip(prompts, completion_ids):
        rate = rates[zlib.crc32(str(prompt).encode()) % len(rates)]
        draw = zlib.crc32(",".join(map(str, ids)).encode()) / 2**32
        rewards.append(1.0 if draw < rate else 0.0)
    return rewards


def _used_token_ids(tokenizer, rows) -> set[int]:
    used = {tokenizer.eos_token_id}
    for row in rows:
        used.update(tokenizer(row["prompt"] + row["answer"], add_special_tokens=False)["input_ids"])
    return used


def pad_vocabulary(src: str, dst: str, vocab_size: int, *, max_log_mass: float = -6.0, seed: int = 0) -> dict:
    """Saves `src`'s model with its vocabulary padded to `vocab_size` rows (embedding and LM head) under `dst`, with
    `src`'s tokenizer (which keeps its tokens: the padding ids are never produced by it).

    Padding row i of the LM head is a copy of one of the tokens the warm-up data never contains (cycled), plus 10%
    noise, minus beta times the mean direction mu of the final hidden states. On the warm-up data every hidden state
    has h.mu > 0, so this lowers every padding logit; beta is the smallest value that brings the padding's total
    probability to at most e^max_log_mass at every warm-up position, so sampling and rewards stay those of the warmed
    model while every projection runs over the full vocabulary. Returns what was set and measured.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from dgpo_trl.tiny import reversal_dataset, sft_batch

    tokenizer = PreTrainedTokenizerFast.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    rows = list(reversal_dataset(256, seed=7))
    batch = sft_batch(tokenizer, rows)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    mask = batch["labels"][:, 1:] != -100
    hidden = out.hidden_states[-1][:, :-1][mask]  # after the final norm: logits = hidden @ W.T
    lse_real = out.logits[:, :-1][mask].float().logsumexp(-1)
    head = model.get_output_embeddings().weight.data
    old_vocab, width = head.shape
    used = _used_token_ids(tokenizer, list(reversal_dataset(2000, seed=1)) + rows)
    unused = torch.tensor([i for i in range(old_vocab) if i not in used])
    n_pad = vocab_size - old_vocab
    generator = torch.Generator().manual_seed(seed)
    source = unused[torch.arange(n_pad) % len(unused)]
    pad_rows = head[source] + 0.1 * head[unused].std() * torch.randn(n_pad, width, generator=generator)
    mu = hidden.mean(0)
    mu = mu / mu.norm()
    along = hidden @ mu
    if along.min() <= 0:
        raise RuntimeError("the warm-up hidden states do not share a direction; cannot pad the vocabulary this way")
    lse_pad = (hidden @ pad_rows.T).logsumexp(-1)
    beta = ((lse_pad - lse_real - max_log_mass) / along).max().clamp(min=0.0).item()
    pad_rows -= beta * mu
    log_mass = (hidden @ pad_rows.T).logsumexp(-1) - torch.logaddexp(lse_real, (hidden @ pad_rows.T).logsumexp(-1))

    embed = model.get_input_embeddings().weight.data
    embed_rows = embed[source].clone()
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    model.get_input_embeddings().weight.data[old_vocab:] = embed_rows
    model.get_output_embeddings().weight.data[old_vocab:] = pad_rows
    model.config.vocab_size = vocab_size
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)
    return dict(beta=beta, pad_log_mass_max=log_mass.max().item(), pad_log_mass_mean=log_mass.mean().item())


def build_random_qwen2(path: Path, spec: dict, vocab_size: int, device: torch.device, dtype: torch.dtype) -> None:
    """A random-init Qwen2 model of `spec`'s shape with the character tokenizer (prompts only need its 99 tokens)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dgpo_trl.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=spec.get("tied", False),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialising 0.5B parameters on a GPU takes a second, on one CPU thread a minute
        model = Qwen2ForCausalLM(config)
    model = model.to(dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    del model


def prepare_model(name: str, vocab: int | None, cache_dir: Path, device: torch.device, dtype: torch.dtype) -> str:
    """Builds (once; cached under `cache_dir`) the benchmark model `name` with `vocab` rows; returns its path."""
    from dgpo_trl.tiny import build_tiny_model, build_tokenizer, reversal_dataset, supervised_warmup

    spec = MODELS[name]
    if spec["arch"] == "qwen2":
        vocab = vocab or QWEN2_VOCAB
        path = cache_dir / f"{name}_v{vocab}_{str(dtype).removeprefix('torch.')}_random"
        if not (path / "config.json").exists():
            start = time.perf_counter()
            build_random_qwen2(path, spec, vocab, device, dtype)
            print(f"# built random-init {name} (V={vocab}) in {time.perf_counter() - start:.0f}s", flush=True)
        return str(path)
    base = cache_dir / f"{name}_h{spec['hidden']}_l{spec['layers']}_sft{spec['sft_steps']}"
    if not (base / "config.json").exists():
        start = time.perf_counter()
        build_tiny_model(base, hidden_size=spec["hidden"], num_layers=spec["layers"], num_heads=spec["heads"], seed=0)
        supervised_warmup(base, reversal_dataset(2000, seed=1), steps=spec["sft_steps"], batch_size=128)
        print(f"# built and warmed {name} in {time.perf_counter() - start:.0f}s", flush=True)
    if not vocab or vocab == len(build_tokenizer()):
        return str(base)
    path = cache_dir / f"{base.name}_v{vocab}"
    if not (path / "config.json").exists():
        info = pad_vocabulary(str(base), str(path), vocab)
        print(f"# padded {name} to V={vocab}: padding log-mass max {info['pad_log_mass_max']:.1f}, "
              f"mean {info['pad_log_mass_mean']:.1f} (beta {info['beta']:.2f})", flush=True)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------------
# One configuration: model x vocabulary x path, every variant interleaved


def run_config(model_name, vocab, path_name, args, device, dtype):
    """Trains every variant of `args.variants` on one (model, vocabulary, path), interleaved; returns (rows,
    ratios)."""
    from transformers import PreTrainedTokenizerFast, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from dgpo_trl import DGPOConfig, DGPOTrainer
    from dgpo_trl.tiny import exact_match_reward, reversal_dataset

    spec = MODELS[model_name]
    path = prepare_model(model_name, vocab, args.cache, device, dtype)
    reward = mixed_reward if spec["arch"] == "qwen2" else exact_match_reward
    steps_per_cycle = PATHS[path_name] if path_name != "offpolicy" else args.steps_per_generation
    # At least 3 warm-up optimizer steps, in whole cycles; the first cycle is the memory cycle
    warmup_cycles = max(args.warmup, math.ceil(3 / steps_per_cycle))
    rounds = args.rounds_aligned if path_name == "aligned" else args.rounds_offpolicy
    dataset = reversal_dataset(max(4096, 2 * args.batch * steps_per_cycle * (warmup_cycles + rounds)), seed=2)
    half = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    common = dict(
        per_device_train_batch_size=args.batch,
        num_generations=args.generations,
        max_completion_length=args.max_completion_length,
        steps_per_generation=steps_per_cycle,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
        max_steps=steps_per_cycle * (warmup_cycles + rounds),
        logging_steps=1,
        bf16=half and dtype == torch.bfloat16,
        fp16=half and dtype == torch.float16,
        model_init_kwargs={"dtype": dtype},  # TRL loads float32 unless told (the policy; references follow it)
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
    )
    variants = [v for v in VARIANTS if v in args.variants]
    if path_name == "offpolicy" and "dgpo" in variants and "dgpo_noskip" in variants:
        variants.remove("dgpo_noskip")  # every completion is scored at scoring time: the same trainer as dgpo
    records = {v: {"cycle_s": [], "logs": [], **{k: 0.0 for k in PART_KEYS}, **{f"{k}_cycles": [] for k in PART_KEYS}}
               for v in variants}
    baton = Baton(variants)
    trainers = {}
    with tempfile.TemporaryDirectory() as out:
        for v in variants:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
            kw = dict(output_dir=f"{out}/{v}", **common)
            if v.startswith("grpo"):
                beta = 0.04 if v == "grpo_beta0.04" else 0.0
                trainer = GRPOTrainer(path, reward, args=GRPOConfig(beta=beta, **kw), train_dataset=dataset,
                                      processing_class=tokenizer)
            else:
                config = DGPOConfig(dgpo_skip_zero_advantage=v == "dgpo", **kw)
                trainer = DGPOTrainer(path, reward, args=config, train_dataset=dataset, processing_class=tokenizer)
            time_parts(trainer, records[v], device)
            trainer.add_callback(
                make_callback(v, weakref.ref(trainer), baton, records[v], device, steps_per_cycle, warmup_cycles)
            )
            trainer.remove_callback(PrinterCallback)  # the logs are collected; printing them would bury the table
            trainers[v] = trainer

        errors = {}

        def train(v):
            try:
                torch.set_num_threads(args.threads)  # the intra-op thread count is per thread under OpenMP
                baton.wait(v)
                trainers[v].train()
            except BaseException as error:  # noqa: BLE001 - reported below; the others must not wait forever
                errors[v] = error
                baton.pass_on(v, finished=True)

        threads = [threading.Thread(target=train, args=(v,), name=v) for v in variants]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        trainers.clear()
        if errors:
            raise RuntimeError(f"trainers failed: {errors}") from next(iter(errors.values()))

    where = dict(model=model_name, vocab=vocab or len(PreTrainedTokenizerFast.from_pretrained(path)), path=path_name)
    rows = []
    for v in variants:
        r = records[v]
        logs = r["logs"]

        def mean_log(key):
            values = [log[key] for log in logs if log.get(key) is not None]
            return sum(values) / len(values) if values else None

        def part_ms(key, flag):
            return 1e3 * mean(r[f"{key}_cycles"]) if r.get(flag) else None

        generate = part_ms("generate_s", "has_generate")

        rows.append(
            dict(
                **where,
                variant=v,
                steps_per_cycle=steps_per_cycle,
                cycles=len(r["cycle_s"]),
                cycle_ms=1e3 * mean(r["cycle_s"]),
                cycle_median_ms=1e3 * median(r["cycle_s"]),
                cycle_min_ms=1e3 * min(r["cycle_s"]),
                generate_ms=generate,
                # The cycle without its generation: what the trainers do differently (HF generation is the same)
                train_ms=None if generate is None else 1e3 * mean(r["cycle_s"]) - generate,
                stage_ms=None if generate is None else part_ms("stage_s", "has_stage") - generate,
                scoring_ms=part_ms("scoring_s", "has_scoring"),
                divergence_ms=part_ms("divergence_s", "has_divergence"),
                peak_mib=(r["resident_bytes"] + r["transient_bytes"]) / 2**20,
                resident_mib=r["resident_bytes"] / 2**20,
                transient_mib=r["transient_bytes"] / 2**20,
                mem_step_tokens=r.get("mem_step_tokens"),
                reward=mean_log("reward"),
                frac_reward_zero_std=mean_log("frac_reward_zero_std"),
                scored_fraction=mean_log("dgpo/scored_fraction"),
                completion_length=mean_log("completions/mean_length"),
            )
        )
    return rows, ratios_for(rows)


def ratios_for(rows: list[dict]) -> list[dict]:
    """The ratios of one configuration's rows (same model, vocabulary and path), each measured in the same run."""
    by = {row["variant"]: row for row in rows}
    where = {k: rows[0][k] for k in ("model", "vocab", "path")} if rows else {}
    ratios = []

    def ratio(a, b):
        if a in by and b in by:
            ratios.append(
                dict(
                    **where,
                    ratio=f"{a} / {b}",
                    cycle_time=by[a]["cycle_ms"] / by[b]["cycle_ms"],
                    cycle_time_median=by[a]["cycle_median_ms"] / by[b]["cycle_median_ms"],
                    # Ratio of the fastest cycles: less sensitive to bursts of load from other processes
                    cycle_time_min=by[a]["cycle_min_ms"] / by[b]["cycle_min_ms"],
                    train_time=(by[a]["train_ms"] / by[b]["train_ms"]
                                if by[a]["train_ms"] and by[b]["train_ms"] else None),
                    peak_memory=by[a]["peak_mib"] / by[b]["peak_mib"],
                )
            )

    ratio("dgpo", "grpo_beta0.04")
    ratio("dgpo_noskip", "grpo_beta0.04")
    ratio("dgpo", "grpo_beta0")
    ratio("grpo_beta0.04", "grpo_beta0")
    ratio("dgpo", "dgpo_noskip")
    if {"dgpo", "grpo_beta0"} <= by.keys() and by["dgpo"]["scoring_ms"] and by["dgpo"]["divergence_ms"]:
        # DGPO's floor against GRPO(beta=0), which runs no reference: DGPO's own reference forwards (on the
        # completions it scores), timed in the same run, on top of GRPO(beta=0)'s cycle
        reference_ms = by["dgpo"]["scoring_ms"] - by["dgpo"]["divergence_ms"]
        ratios.append(dict(**where, ratio="floor: 1 + dgpo reference forward / grpo_beta0",
                           cycle_time=1.0 + reference_ms / by["grpo_beta0"]["cycle_ms"],
                           scored_fraction=by["dgpo"]["scored_fraction"]))
    if "dgpo" in by and "grpo_beta0.04" in by and (by["grpo_beta0.04"].get("stage_ms") or 0) > 0:
        # The scoring stage alone (generation subtracted): DGPO's passes against TRL's old-log-prob and reference ones
        ratios.append(dict(**where, ratio="scoring stage dgpo / grpo_beta0.04",
                           cycle_time=by["dgpo"]["stage_ms"] / by["grpo_beta0.04"]["stage_ms"]))
    if "dgpo" in by and "dgpo_noskip" in by and by["dgpo"]["scoring_ms"] and by["dgpo_noskip"]["scoring_ms"]:
        ratios.append(
            dict(
                **where,
                ratio="scoring time dgpo / dgpo_noskip",
                cycle_time=by["dgpo"]["scoring_ms"] / by["dgpo_noskip"]["scoring_ms"],
                scored_fraction=by["dgpo"]["scored_fraction"],
            )
        )
    return ratios


ROW_COLUMNS = ["model", "vocab", "path", "variant", "cycles", "cycle_ms", "cycle_median_ms", "generate_ms",
               "stage_ms", "scoring_ms", "divergence_ms", "peak_mib", "transient_mib", "mem_step_tokens", "reward",
               "frac_reward_zero_std", "scored_fraction"]
RATIO_COLUMNS = ["model", "vocab", "path", "ratio", "cycle_time", "cycle_time_median", "cycle_time_min", "train_time",
                 "peak_memory", "scored_fraction"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, V 151936, both paths, few cycles (~3 min)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    parser.add_argument("--vocab", type=int, nargs="+", default=[QWEN2_VOCAB],
                        help="model vocabulary sizes (99 = the character tokenizer's own; default 151936)")
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                        help=f"default: {' '.join(DEFAULT_VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=None, help="timed cycles per variant on both paths")
    parser.add_argument("--rounds-aligned", type=int, default=None, help="timed cycles per variant, aligned path")
    parser.add_argument("--rounds-offpolicy", type=int, default=None, help="timed cycles per variant, off-policy path")
    parser.add_argument("--warmup", type=int, default=1, help="untimed cycles first (at least 3 optimizer steps)")
    parser.add_argument("--batch", type=int, default=None, help="completions per optimizer step (16; --quick: 8)")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-completion-length", type=int, default=None, help="32 (--quick: 16)")
    parser.add_argument("--steps-per-generation", type=int, default=PATHS["offpolicy"],
                        help="optimizer steps per generation on the off-policy path")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models on CPU)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dgpo_bench_models",
                        help="where the built models are kept between runs")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    parser.add_argument("--stem", default=None, help="results file name (default from the device and options)")
    parser.add_argument("--report", type=Path, default=None, metavar="JSON",
                        help="print an earlier run's results (its JSON) as markdown tables, and exit")
    return parser


def run(args) -> tuple[list[dict], list[dict], dict]:
    """Runs every configuration of `args` (parsed by `build_parser`); prints the tables; returns rows, ratios, meta."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.set_num_threads(args.threads)
    args.models = args.models or ["tiny"]
    args.variants = args.variants or list(DEFAULT_VARIANTS)
    args.batch = args.batch or (8 if args.quick else 16)
    args.max_completion_length = args.max_completion_length or (16 if args.quick else 32)
    args.rounds_aligned = args.rounds_aligned or args.rounds or (8 if args.quick else 20)
    args.rounds_offpolicy = args.rounds_offpolicy or args.rounds or (2 if args.quick else 4)
    args.cache.mkdir(parents=True, exist_ok=True)
    meta = machine_info(device) | {
        "argv": sys.argv,
        "dtype": str(dtype),
        "paths": {p: (PATHS[p] if p != "offpolicy" else args.steps_per_generation) for p in args.paths},
        **{k: getattr(args, k) for k in ("rounds_aligned", "rounds_offpolicy", "warmup", "batch", "generations",
                                         "max_completion_length", "threads", "variants", "vocab")},
        "models": {name: MODELS[name] for name in args.models},
    }
    print(f"# generation cycles on {meta.get('gpu', meta['cpu'])}, {args.threads} torch thread(s), {dtype}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    rows, ratios = [], []
    for name in args.models:
        for vocab in args.vocab:
            for path_name in args.paths:
                config_rows, config_ratios = run_config(name, vocab, path_name, args, device, dtype)
                gc.collect()  # the trainers of one configuration go before the next one's are built
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows += config_rows
                ratios += config_ratios
                print(format_table(config_rows, ROW_COLUMNS))
                print(format_table(config_ratios, RATIO_COLUMNS), flush=True)
    meta["load_average_at_end"] = os.getloadavg()
    return rows, ratios, meta


NAMES = {"grpo_beta0": "GRPO(beta=0)", "grpo_beta0.04": "GRPO(beta=0.04)", "dgpo": "DGPO",
         "dgpo_noskip": "DGPO (skip off)"}


def markdown(results: dict) -> str:
    """`docs/performance.md`'s tables from a results JSON of this script (`--report PATH`)."""

    def f(value, digits=3):
        return "" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)

    meta, lines = results["meta"], []
    lines.append(f"{meta.get('gpu', meta['cpu'])}, {meta['torch_threads']} torch thread(s), torch {meta['torch']}; "
                 f"load average {', '.join(f'{x:.2f}' for x in meta['load_average_at_start'])} at start"
                 + (f", {', '.join(f'{x:.2f}' for x in meta['load_average_at_end'])} at end"
                    if "load_average_at_end" in meta else "")
                 + f"; `{' '.join(['python', *meta['argv']])}`")
    lines += ["", "| model | V | path | variant | cycles | cycle ms (mean) | generation ms | scoring stage ms | "
                  "DGPO scoring ms | peak MiB | frac_reward_zero_std | scored fraction |", "|" + " --- |" * 12]
    for r in results["rows"]:
        lines.append(f"| {r['model']} | {r['vocab']} | {r['path']} | {NAMES.get(r['variant'], r['variant'])} | "
                     f"{r['cycles']} | {f(r['cycle_ms'])} | {f(r['generate_ms'])} | {f(r.get('stage_ms'))} | "
                     f"{f(r['scoring_ms'])} | "
                     f"{f(r['peak_mib'])} | {f(r['frac_reward_zero_std'], 2)} | {f(r['scored_fraction'], 2)} |")
    lines += ["", "| model | V | path | ratio | cycle time (mean) | median | min | without generation | peak memory |",
              "|" + " --- |" * 9]
    for r in meta["ratios"]:
        name = " ".join(NAMES.get(word, word) for word in r["ratio"].split(" "))
        lines.append(f"| {r['model']} | {r['vocab']} | {r['path']} | {name} | {f(r['cycle_time'])} | "
                     f"{f(r.get('cycle_time_median'))} | {f(r.get('cycle_time_min'))} | {f(r.get('train_time'))} | "
                     f"{f(r.get('peak_memory'))} |")
    return "\n".join(lines)


def main():
    if "--report" in sys.argv[1:]:
        import json

        results = json.loads(Path(sys.argv[sys.argv.index("--report") + 1]).read_text())
        # The ratios are recomputed from the rows, so a results file reads with this script's definitions
        configs = {}
        for row in results["rows"]:
            configs.setdefault((row["model"], row["vocab"], row["path"]), []).append(row)
        results["meta"]["ratios"] = [ratio for rows in configs.values() for ratio in ratios_for(rows)]
        print(markdown(results))
        return
    args = build_parser().parse_args()
    rows, ratios, meta = run(args)
    device = meta["device"].split(":")[0]
    stem = args.stem or (f"steps_{device}" + ("_quick" if args.quick else "")
                         + ("" if args.vocab == [QWEN2_VOCAB] else "_v" + "-".join(map(str, args.vocab))))
    print("\n# all ratios")
    print(format_table(ratios, RATIO_COLUMNS))
    csv_path, json_path = write_results(stem, rows, meta | {"ratios": ratios}, args.out)
    print(f"\nwrote {csv_path} and {json_path}")


if __name__ == "__main__":
    main()
