"""Offline learning study: does DGPO's token reallocation change what a tiny model learns, and does adaptive tau help?

One command runs everything (SFT warm-ups, RL runs, held-out evaluation, aggregation, plots):

    OMP_NUM_THREADS=1 python benchmarks/learning/study.py [--quick] [--out DIR] [--publish DIR] [--workers N]

For each task and seed, a random-init tiny Llama gets a short supervised warm-up, then every configuration trains
from that same warm-up with the same data order and sampling seed (a paired design). The tasks are `dgpo_trl.tasks`'
``reversal`` (every completion token decides the reward) and ``filler`` (free random letters, then the few answer
tokens that decide it: the situation DGPO's token reallocation is meant for), each with disjoint SFT / validation /
RL / held-out prompt sets (`Task.splits`), and their vocabulary-scale variants ``<task>_v<V>`` for V in `VOCAB_SIZES`
(``reversal_v32000``, ``filler_v151936``, ...): the same prompts, rewards and tokenizer, with the model's vocabulary
(embedding and LM-head rows) padded with tokens the data never uses up to LLaMA-2's 32,000 and Qwen2.5's 151,936 rows
(log V 4.6 -> 10.4 -> 11.9; ``_v99`` is the tokenizer's own vocabulary, not padded: the same short runs at V = 99, for
the comparison; `pad_warmup` says how the padded rows are initialised). The configurations:

- ``grpo`` / ``grpo_kl``: TRL's `GRPOTrainer` with beta = 0 and beta = 0.04;
- ``dgpo``: `DGPOTrainer` at the paper's defaults (Hellinger, tau = 0.5, kappa = 1);
- ``dgpo_kappa0`` (no entropy gate), ``dgpo_rkl`` (reverse KL instead of Hellinger): the paper's ablations;
- ``dgpo_tau*``: the tau sweep (the paper's defaults plus the small taus that match the spread of the scores);
- ``dgpo_ess*``: adaptive tau (`dgpo_target_ess`), tau chosen per batch so the weights' mean normalised ESS hits
  the target.

Outputs under ``--out`` (default ``benchmarks/learning/outputs``, git-ignored): ``runs/<task>/<config>/seed<k>.json``
(per-step history, final accuracies; a finished run is skipped on rerun), ``models/<task>/seed<k>`` (warm-ups),
``summary.json``, ``summary.md`` (tables), ``*.png`` (plots) and ``study.log`` (every invocation's jobs and timings);
``--publish DIR`` copies those to DIR.
Nothing in the report is hard-coded: every number comes from the runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import resource
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# One thread per process: tiny models run ~10x faster than with the default thread pool (notes/environment.md)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
# glibc serves every allocation above 32 MiB with a fresh mmap, whose pages the kernel zeroes on first touch: at a
# padded vocabulary of 151,936 rows (128 x 151,936 float32 = 78 MB per logits tensor) that was ~half of each RL step's
# CPU time (system time). With mmap off and no trimming, freed memory is reused (same results, ~3x faster steps there,
# a larger resident set). Read at process start: applies to the spawned workers.
os.environ.setdefault("MALLOC_MMAP_MAX_", "0")
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(64 << 30))
os.environ.setdefault("MALLOC_TOP_PAD_", str(256 << 20))

HERE = Path(__file__).resolve().parent

from dgpo_trl.tasks import TASKS as SYNTHETIC_TASKS  # noqa: E402
from dgpo_trl.tasks import Task  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class StudyTask(Task):
    """A task of `dgpo_trl.tasks` as the study runs it. A vocabulary-scale variant pads the model's vocabulary to
    `vocab_size` rows, starting from the warm-up of the task `base` (None: the tokenizer's own vocabulary)."""

    vocab_size: int | None = None
    base: str | None = None


NATIVE_VOCAB_SIZE = 99  # the char tokenizer of `dgpo_trl.tiny` (4 specials + 95 characters); the tests check it
VOCAB_SIZES = (NATIVE_VOCAB_SIZE, 32000, 151936)  # ours, LLaMA-2 / Mistral, Qwen2.5
BASE_TASKS = ("reversal", "filler")


def study_task(task: Task, vocab_size: int | None = None) -> StudyTask:
    """`task`, or its variant with the model's vocabulary padded to `vocab_size` rows (same prompts, rewards and
    tokenizer), named ``<task>_v<vocab_size>``."""
    fields = asdict(task)  # the task's callables are kept as they are (deepcopy returns functions unchanged)
    if vocab_size is None:
        return StudyTask(**fields)
    what = "not padded" if vocab_size == NATIVE_VOCAB_SIZE else f"padded to {vocab_size:,} rows"
    fields.update(name=f"{task.name}_v{vocab_size}", description=f"{task.description}; model vocabulary {what}")
    return StudyTask(**fields, vocab_size=vocab_size, base=task.name)


TASKS: dict[str, StudyTask] = {
    **{name: study_task(SYNTHETIC_TASKS[name]) for name in BASE_TASKS},
    **{f"{name}_v{v}": study_task(SYNTHETIC_TASKS[name], v) for v in VOCAB_SIZES for name in BASE_TASKS},
}


# ----------------------------------------------------------------------------------------------------------------
# Configurations


@dataclass(frozen=True)
class RunConfig:
    """One training configuration: which trainer, beta, and the DGPO fields (ignored by GRPO)."""

    name: str
    label: str
    trainer: str = "dgpo"  # "grpo" (TRL's GRPOTrainer) or "dgpo"
    beta: float = 0.0
    dgpo: dict = field(default_factory=dict)

    def describe(self) -> str:
        if self.trainer == "grpo":
            return f"GRPOTrainer, beta={self.beta}"
        fields = {
            "dgpo_tau": 0.5,
            "dgpo_kappa": 1.0,
            "dgpo_divergence": "hellinger",
            "dgpo_entropy": "normalized",
            **self.dgpo,
        }
        return "DGPOTrainer, " + ", ".join(f"{k.removeprefix('dgpo_')}={v}" for k, v in fields.items())


def _tau_name(tau: float) -> str:
    return f"dgpo_tau{tau:g}"


TAU_SWEEP = (0.003, 0.01, 0.05, 0.5, 1.0)
TARGET_ESS = (0.8, 0.5)
NATS_TAUS = (0.5, 1.0)  # the paper's tau range, with the gate of its Eq. 3 (entropy in nats)


def all_configs() -> dict[str, RunConfig]:
    configs = [
        RunConfig("grpo", "GRPO (beta=0)", trainer="grpo"),
        RunConfig("grpo_kl", "GRPO (beta=0.04)", trainer="grpo", beta=0.04),
        RunConfig("dgpo", "DGPO defaults (tau=0.5, kappa=1)"),
        RunConfig("dgpo_kappa0", "DGPO kappa=0 (no entropy gate)", dgpo={"dgpo_kappa": 0.0}),
        RunConfig("dgpo_rkl", "DGPO reverse KL", dgpo={"dgpo_divergence": "reverse_kl"}),
    ]
    for tau in TAU_SWEEP:
        if tau != 0.5:  # tau = 0.5 is the "dgpo" run
            configs.append(RunConfig(_tau_name(tau), f"DGPO tau={tau:g}", dgpo={"dgpo_tau": tau}))
    for target in TARGET_ESS:
        configs.append(
            RunConfig(f"dgpo_ess{target:g}", f"DGPO adaptive tau (ESS {target:g})", dgpo={"dgpo_target_ess": target})
        )
    for tau in NATS_TAUS:
        configs.append(
            RunConfig(
                f"dgpo_nats_tau{tau:g}",
                f"DGPO nats gate (Eq. 3), tau={tau:g}",
                dgpo={"dgpo_tau": tau, "dgpo_entropy": "nats"},
            )
        )
    return {c.name: c for c in configs}


CONFIGS = all_configs()
QUICK_CONFIGS = ("grpo", "dgpo", "dgpo_ess0.8", "dgpo_nats_tau0.5")
# The vocabulary-scale experiment (`VOCAB_SIZES`): GRPO and both gates at the paper's default tau (other taus,
# tau = 1 included, from the what-if statistics of the same runs)
VOCAB_CONFIGS = ("grpo", "dgpo", "dgpo_nats_tau0.5")
# What-if taus: for every fixed-tau DGPO run, the weights its own scores would give at these taus, under either gate
WHATIF_TAUS = (0.01, 0.05, 0.1, 0.5, 1.0)


def task_configs(task_name: str) -> tuple[str, ...]:
    """The configurations a task runs: every one at the tokenizer's vocabulary, `VOCAB_CONFIGS` at a padded one."""
    return VOCAB_CONFIGS if TASKS[task_name].vocab_size else tuple(CONFIGS)


# ----------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class TaskSettings:
    """Model, warm-up, RL and evaluation sizes for one task."""

    hidden_size: int = 64
    num_layers: int = 2
    # SFT warm-up: AdamW at warmup_lr on batches of warmup_batch, checked every warmup_check steps, until the sampled
    # accuracy on the validation prompts reaches warmup_target (or warmup_max_steps): every seed starts RL from a
    # policy that is right about as often, with room left for RL
    warmup_target: float = 0.25
    warmup_check: int = 5
    warmup_max_steps: int = 600
    warmup_batch: int = 64
    warmup_lr: float = 3e-3
    rl_steps: int = 120
    prompts_per_step: int = 16
    num_generations: int = 8
    learning_rate: float = 3e-4
    lr_warmup_steps: int = 10
    n_sft: int = 4000
    n_train: int = 2000
    n_eval: int = 256
    eval_samples: int = 4
    block: int = 20  # steps per block of the reward table
    # Padded-vocabulary tasks only (`pad_warmup`): the padded LM-head rows are fitted (everything else frozen), on
    # batches of pad_batch SFT rows at pad_lr, so that their total probability is pad_tail_mass at every SFT target
    # position, until the batch's rms log-ratio to it is <= pad_tolerance (or pad_max_steps)
    pad_tail_mass: float = 1e-3
    pad_tolerance: float = 0.6
    pad_lr: float = 3e-2
    pad_batch: int = 32
    pad_max_steps: int = 200


def _same_settings(recorded: dict | None, settings: TaskSettings) -> bool:
    """Whether a record's settings are `settings`; a field the record predates counts as its default (so runs made
    before a field was added are still reused when it is at its default)."""
    if recorded is None:
        return False
    defaults = asdict(TaskSettings())
    return {**{k: v for k, v in defaults.items() if k not in recorded}, **recorded} == asdict(settings)


def _padded_settings(base: TaskSettings, **changes) -> TaskSettings:
    return TaskSettings(**{**asdict(base), **changes})


BASE_SETTINGS = {
    "reversal": TaskSettings(),
    "filler": TaskSettings(),
}
QUICK_BASE_SETTINGS = {
    # Warm-ups long enough that some groups mix right and wrong completions, so DGPO's weights are exercised
    name: TaskSettings(
        warmup_target=0.1,
        warmup_check=20,
        warmup_max_steps=200,
        rl_steps=4,
        prompts_per_step=4,
        n_sft=1000,
        n_train=64,
        n_eval=32,
        eval_samples=2,
        block=2,
    )
    for name in BASE_SETTINGS
}
# The vocabulary-scale tasks: the base task's warm-up and RL settings, shorter RL (an RL step at 151,936 rows took
# 40-80x one at 99 rows on a quiet machine, and up to 28 s under load; see docs/results.md), the same at every
# vocabulary size (V = 99 included)
PADDED_RL = {"rl_steps": 16, "block": 8}
FULL_SETTINGS = {
    **BASE_SETTINGS,
    **{name: _padded_settings(BASE_SETTINGS[t.base], **PADDED_RL) for name, t in TASKS.items() if t.vocab_size},
}
QUICK_SETTINGS = {
    **QUICK_BASE_SETTINGS,
    **{
        name: _padded_settings(QUICK_BASE_SETTINGS[t.base], rl_steps=2, block=1, pad_max_steps=10)
        for name, t in TASKS.items()
        if t.vocab_size
    },
}
QUICK_TASKS = ("reversal", "filler", "reversal_v32000")


# ----------------------------------------------------------------------------------------------------------------
# Warm-up, training, evaluation (run inside worker processes)


def _setup_process() -> None:
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def warm_up(task_name: str, settings: TaskSettings, seed: int, out: Path) -> dict:
    """Builds a tiny Llama (init seed = `seed`), runs the SFT warm-up and evaluates it; returns its record."""
    _setup_process()
    from dgpo_trl.tiny import build_tiny_model

    task = TASKS[task_name]
    if task.vocab_size:
        return pad_warmup(task_name, settings, seed, out)
    path = out / "models" / task_name / f"seed{seed}"
    record_path = path / "warmup.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if _same_settings(record.get("settings"), settings):
            return {**record, "reused": True}
    start = time.perf_counter()
    splits = task.splits(seed, settings.n_sft, settings.n_train, settings.n_eval)
    build_tiny_model(path, hidden_size=settings.hidden_size, num_layers=settings.num_layers, seed=seed)
    model, tokenizer, steps, curve = supervised_warmup(task, path, splits, settings, seed)
    accuracy = evaluate(model, tokenizer, task, splits["eval"], settings, seed)
    record = {
        "task": task_name,
        "seed": seed,
        "settings": asdict(settings),
        "path": str(path),
        "steps": steps,
        "val_curve": curve,
        **accuracy,
        "wall_s": time.perf_counter() - start,
    }
    record_path.write_text(json.dumps(record, indent=1))
    return record


def supervised_warmup(task: Task, path: Path, splits: dict, settings: TaskSettings, seed: int):
    """Plain-torch SFT on ``prompt + target + <eos>`` (loss on the target; as `dgpo_trl.tiny.supervised_warmup`),
    stopped once the sampled accuracy on the validation prompts reaches ``warmup_target``; saved back to `path`.
    Returns ``(model, tokenizer, steps, [(step, val sampled accuracy), ...])``."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from dgpo_trl.tiny import sft_batch

    torch.manual_seed(seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.warmup_lr)
    rows, rng = splits["sft"], random.Random(seed)
    val_settings = TaskSettings(**{**asdict(settings), "eval_samples": 2})
    curve, step = [], 0
    while step < settings.warmup_max_steps:
        model.train()
        for _ in range(settings.warmup_check):
            batch = [rows[rng.randrange(len(rows))] for _ in range(settings.warmup_batch)]
            model(**sft_batch(tokenizer, batch)).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        step += settings.warmup_check
        accuracy = evaluate(model, tokenizer, task, splits["val"], val_settings, seed + step)["sampled_accuracy"]
        curve.append((step, accuracy))
        if accuracy >= settings.warmup_target:
            break
    model.save_pretrained(path)
    return model, tokenizer, step, curve


def inverse_cdf_multinomial(probs, num_samples, replacement=False, *, generator=None, out=None):
    """`torch.multinomial` for the one-sample case, by inverse CDF in float64 (cumsum, then a binary search).

    Samples exactly the same distribution; torch's CPU multinomial took 0.33 s per call on (128, 151,936) probabilities
    (this: 0.03 s), a third of an RL step at that vocabulary. Any other call goes to torch's own."""
    import torch

    if num_samples != 1 or probs.dim() != 2 or out is not None:
        return (_torch_multinomial or torch.multinomial)(probs, num_samples, replacement, generator=generator, out=out)
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    # right: x in [cdf[i-1], cdf[i]) picks i, so a zero-probability id (cdf[i] == cdf[i-1]) is never drawn
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max(probs.shape[1] - 1)


_torch_multinomial = None  # torch's own, while `fast_sampling` has replaced it


@contextlib.contextmanager
def fast_sampling(enabled: bool = True):
    """Context in which `torch.multinomial` is `inverse_cdf_multinomial` (the padded-vocabulary tasks' generation)."""
    global _torch_multinomial
    if not enabled:
        yield
        return
    import torch

    _torch_multinomial = torch.multinomial
    torch.multinomial = inverse_cdf_multinomial
    try:
        yield
    finally:
        torch.multinomial = _torch_multinomial


def _warmup_identity(record: dict) -> dict:
    """What a padded warm-up depends on in its base task's warm-up record."""
    return {k: record[k] for k in ("settings", "steps", "val_curve", "greedy_accuracy", "sampled_accuracy")}


def pad_warmup(task_name: str, settings: TaskSettings, seed: int, out: Path) -> dict:
    """A vocabulary-scale task's warm-up: the base task's warm-up of this seed, its vocabulary padded to
    `task.vocab_size` rows, the padded LM-head rows then fitted (`fit_padded_rows`); returns its record. With
    `task.vocab_size` equal to the tokenizer's size nothing is padded: the base warm-up, unchanged.

    The padded rows stand for an LLM's rare and unused tokens, which pretraining leaves at low but nonzero
    probability in every context. They start as the model's own init (`resize_token_embeddings(mean_resizing=False)`:
    N(0, initializer_range), as every row of the base model started), which gives them nearly all of the mass
    (logits ~0, and 151,837 of them against 99 real tokens); then only they are fitted so that their total
    probability is `pad_tail_mass` at every SFT target position. Everything else is frozen, so among the real tokens
    the policy is exactly the base warm-up's (renormalised by 1 - tail mass): the runs pair with the base task's."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    task = TASKS[task_name]
    base_path = out / "models" / task.base / f"seed{seed}"
    base_record = json.loads((base_path / "warmup.json").read_text())
    path = out / "models" / task_name / f"seed{seed}"
    record_path = path / "warmup.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if _same_settings(record.get("settings"), settings) and record.get("base_warmup") == _warmup_identity(
            base_record
        ):
            return {**record, "reused": True}
    start = time.perf_counter()
    splits = task.splits(seed, settings.n_sft, settings.n_train, settings.n_eval)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    n_real = model.config.vocab_size
    if task.vocab_size < n_real:
        raise ValueError(f"{task_name}: vocab_size {task.vocab_size} is below the model's {n_real} rows")
    torch.manual_seed(seed)
    model.resize_token_embeddings(task.vocab_size, mean_resizing=False)
    probe = splits["sft"][:128]
    before = tail_statistics(model, tokenizer, probe, n_real)
    steps, curve = (
        fit_padded_rows(model, tokenizer, splits["sft"], settings, seed, n_real)
        if task.vocab_size > n_real
        else (0, [])
    )
    after = tail_statistics(model, tokenizer, probe, n_real)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    with fast_sampling():
        accuracy = evaluate(model, tokenizer, task, splits["eval"], settings, seed)
    record = {
        "task": task_name,
        "seed": seed,
        "settings": asdict(settings),
        "path": str(path),
        "base_warmup": _warmup_identity(base_record),
        "vocab_size": task.vocab_size,
        "real_tokens": n_real,
        "steps": base_record["steps"],
        "pad_steps": steps,
        "pad_curve": curve,
        "tail_before": before,
        "tail_after": after,
        **accuracy,
        "wall_s": time.perf_counter() - start,
    }
    record_path.write_text(json.dumps(record, indent=1))
    return record


def _target_positions(model, tokenizer, rows: list[dict], no_grad_backbone: bool = True):
    """Final hidden states at the SFT targets' positions (each predicting a target token) and those tokens."""
    import contextlib

    import torch

    from dgpo_trl.tiny import sft_batch

    batch = sft_batch(tokenizer, rows)
    labels = batch.pop("labels")[:, 1:]
    with torch.no_grad() if no_grad_backbone else contextlib.nullcontext():
        hidden = model.get_decoder()(**batch).last_hidden_state[:, :-1]
    mask = labels != -100
    return hidden[mask], labels[mask]


def tail_statistics(model, tokenizer, rows: list[dict], n_real: int, chunk: int = 16) -> dict:
    """Teacher-forced at the SFT targets' positions of `rows`: the padded ids' (>= n_real) total probability (mean,
    and quantiles over positions), and the mean entropy (nats) of the whole distribution and of the distribution
    renormalised over the real tokens."""
    import torch

    tails, entropy, real_entropy = [], [], []
    with torch.no_grad():
        for i in range(0, len(rows), chunk):
            hidden, _ = _target_positions(model, tokenizer, rows[i : i + chunk])
            logp = torch.log_softmax(model.get_output_embeddings()(hidden).float(), dim=-1)
            real = torch.log_softmax(logp[:, :n_real], dim=-1)
            tails.append(logp[:, n_real:].logsumexp(-1).exp() if logp.shape[1] > n_real else torch.zeros(len(logp)))
            entropy.append(-(logp.exp() * logp).sum(-1))
            real_entropy.append(-(real.exp() * real).sum(-1))
    tail = torch.cat(tails).double()
    quantiles = tail.quantile(torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {
        "tail_mass": tail.mean().item(),
        "tail_mass_q10_50_90_99": quantiles,
        "tail_mass_max": tail.max().item(),
        "entropy": torch.cat(entropy).mean().item(),
        "real_entropy": torch.cat(real_entropy).mean().item(),
        "positions": len(tail),
    }


def fit_padded_rows(model, tokenizer, rows: list[dict], settings: TaskSettings, seed: int, n_real: int):
    """Fits only the padded LM-head rows (index >= n_real) so that the padded ids' total probability is
    `pad_tail_mass` at every SFT target position: Adam at `pad_lr` on the mean squared log-ratio
    (log tail - log pad_tail_mass)^2 over batches of `pad_batch` rows, until its root on the batch about to be
    trained on is <= `pad_tolerance` or `pad_max_steps`.

    Why not the SFT loss itself: it pushes the padded rows down fastest where the hidden states share a direction,
    and after it first reaches a 5% mean the tail was 3e-5 at the median position and above 0.7 at the top 1% (a
    context where the model would mostly sample unused tokens). Fitting the log tail per position gives a tail that
    is small everywhere, as an LLM's rare tokens are. Returns ``(steps, [(step, mean tail, rms log-ratio), ...])``."""
    import random

    import torch

    for param in model.parameters():
        param.requires_grad_(False)
    head = model.get_output_embeddings().weight
    head.requires_grad_(True)
    keep = torch.ones(head.shape[0], 1)
    keep[:n_real] = 0.0
    head.register_hook(lambda grad: grad * keep)  # the real rows keep their warm-up values (zero grad, no decay)
    optimizer = torch.optim.AdamW([head], lr=settings.pad_lr, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    curve, step = [], 0
    while True:
        batch = [rows[rng.randrange(len(rows))] for _ in range(settings.pad_batch)]
        hidden, _ = _target_positions(model, tokenizer, batch)
        logp = torch.log_softmax(model.get_output_embeddings()(hidden).float(), dim=-1)
        log_tail = logp[:, n_real:].logsumexp(-1)
        loss = (log_tail - math.log(settings.pad_tail_mass)).square().mean()
        curve.append((step, log_tail.exp().mean().item(), loss.sqrt().item()))
        if loss.sqrt().item() <= settings.pad_tolerance or step >= settings.pad_max_steps:
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        step += 1
    head.requires_grad_(False)
    model.eval()
    return step, curve


def evaluate(model, tokenizer, task: Task, rows: list[dict], settings: TaskSettings, seed: int) -> dict:
    """Greedy accuracy and sampled accuracy (`eval_samples` per prompt, temperature 1, no top-k/top-p: the training
    sampler) on held-out prompts. A completion holding a padded id (one the tokenizer does not have: decoding would
    drop it silently) scores 0."""
    import torch

    model.eval()
    prompts = [r["prompt"] for r in rows]
    answers = [r["answer"] for r in rows]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    common = dict(
        max_new_tokens=task.max_completion_length,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    width = batch["input_ids"].shape[1]

    def decode(ids):
        ids = ids[:, width:]
        return tokenizer.batch_decode(ids, skip_special_tokens=True), (ids >= len(tokenizer)).any(-1).tolist()

    with torch.no_grad():
        greedy, greedy_padded = decode(model.generate(**batch, do_sample=False, **common))
        torch.manual_seed(10_000 + seed)
        sampled, sampled_padded = decode(
            model.generate(
                **batch,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=settings.eval_samples,
                **common,
            )
        )
    greedy_reward = [0.0 if bad else r for r, bad in zip(task.reward(greedy, answers), greedy_padded)]
    sampled_reward = [
        0.0 if bad else r
        for r, bad in zip(
            task.reward(sampled, [a for a in answers for _ in range(settings.eval_samples)]), sampled_padded
        )
    ]
    return {
        "greedy_accuracy": sum(greedy_reward) / len(greedy_reward),
        "sampled_accuracy": sum(sampled_reward) / len(sampled_reward),
        "sampled_padded_fraction": sum(sampled_padded) / len(sampled_padded),
        "examples": [
            {"prompt": p, "greedy": g, "sampled": s}
            for p, g, s in zip(prompts[:3], greedy[:3], sampled[: 3 * settings.eval_samples : settings.eval_samples])
        ],
    }


HISTORY_KEYS = (
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "entropy",
    "kl",
    "completions/mean_length",
    "dgpo/tau",
    "dgpo/ess",
    "dgpo/weight/max",
    "dgpo/weight/std",
    "dgpo/divergence/mean",
    "dgpo/divergence/max",
    "dgpo/score/mean",
    "dgpo/score/std",
    "dgpo/score/max",
    "dgpo/entropy/mean",
    "dgpo/entropy_normalized/mean",
    "dgpo/reverse_kl/mean",
    "dgpo/scored_fraction",
    "padded_fraction",
)


def padded_aware_reward(task: Task, n_real: int):
    """`task.reward`, except that a completion holding a padded id (>= n_real, which the tokenizer does not have, so
    TRL's decoding drops it silently) scores 0; logs the fraction of such completions as `padded_fraction`."""

    def reward(completions, answer, completion_ids=None, log_metric=None, **kwargs):
        rewards = task.reward(completions, answer, **kwargs)
        padded_rows = [any(i >= n_real for i in ids) for ids in completion_ids]
        if log_metric is not None:
            log_metric("padded_fraction", sum(padded_rows) / max(len(padded_rows), 1))
        return [0.0 if bad else r for r, bad in zip(rewards, padded_rows)]

    reward.__name__ = task.reward.__name__
    return reward


def whatif_ess(weights: list, mask: list, tau: float, factor: float, tau_new: float):
    """ESS and max weight that tau_new would give on the scores behind `weights` (drawn at tau), scaled by `factor`
    (log V to go from the normalized gate to nats, 1 / log V back, 1 for the same gate; kappa = 1).

    log w = s / tau + c within a completion, so the scores are tau * log w up to a constant the softmax ignores."""
    import torch

    ess, w_max = [], []
    for w, m in zip(weights, mask):
        w = w[m].double()
        if len(w) < 1 or not (w > 0).all():
            continue
        logits = w.log() * tau * factor / tau_new
        w_new = len(w) * torch.softmax(logits, dim=0)
        ess.append((w_new.sum() ** 2 / (len(w) * (w_new**2).sum())).item())
        w_max.append(w_new.max().item())
    return (statistics.fmean(ess) if ess else float("nan")), (max(w_max) if w_max else float("nan"))


def train_run(task_name: str, config_name: str, seed: int, settings: TaskSettings, out: Path) -> dict:
    """One RL run from the seed's warm-up; writes and returns its record."""
    _setup_process()
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from dgpo_trl import DGPOConfig, DGPOTrainer

    task, config = TASKS[task_name], CONFIGS[config_name]
    record_path = out / "runs" / task_name / config_name / f"seed{seed}.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if _same_settings(record.get("settings"), settings) and record.get("config") == asdict(config):
            return {**record, "reused": True}
    model_path = out / "models" / task_name / f"seed{seed}"
    splits = task.splits(seed, settings.n_sft, settings.n_train, settings.n_eval)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_path)
    # At the tokenizer's vocabulary: the task's own reward (nothing can be padded); else one that fails padded ids
    reward = padded_aware_reward(task, len(tokenizer)) if task.vocab_size else task.reward
    args = dict(
        output_dir=str(out / "tmp" / f"{task_name}-{config_name}-{seed}"),
        per_device_train_batch_size=settings.prompts_per_step * settings.num_generations,
        num_generations=settings.num_generations,
        max_completion_length=task.max_completion_length,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=settings.lr_warmup_steps,
        max_steps=settings.rl_steps,
        beta=config.beta,
        logging_steps=1,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        seed=seed,
        disable_tqdm=True,
    )
    if config.trainer == "grpo":
        trainer_cls, training_args = GRPOTrainer, GRPOConfig(**args)
    else:
        trainer_cls, training_args = DGPOTrainer, DGPOConfig(**args, **config.dgpo)
    trainer = trainer_cls(
        str(model_path),
        reward,
        args=training_args,
        train_dataset=Dataset.from_list(splits["train"]),
        processing_class=tokenizer,
    )

    class WeightProbe(TrainerCallback):
        """Per step, from every scored completion's token weights (`trainer.last_token_weights`):
        - the within-completion std of log w: log w_t = s_t / tau + const, so tau * std(log w) is the within-completion
          std of the scores s (the spread tau has to match);
        - on tasks where only some tokens decide the reward, the mean weight on those tokens and on the others
          (GRPO: 1 and 1);
        - for a fixed-tau run (kappa = 1), the mean ESS and max weight that each of `WHATIF_TAUS` would give on the
          same scores, under either gate (`whatif_ess`): what tau means at this vocabulary size, read off one run."""

        def __init__(self):
            self.log_weight_std: list[float] = []
            self.decisive_weight: list[float] = []
            self.other_weight: list[float] = []
            self.step_seconds: list[float] = []
            self.whatif: dict[str, list[float]] = {}
            dgpo = {"dgpo_tau": 0.5, "dgpo_kappa": 1.0, "dgpo_entropy": "normalized", **config.dgpo}
            self.whatif_gates = {}
            if config.trainer == "dgpo" and "dgpo_target_ess" not in dgpo and dgpo["dgpo_kappa"] == 1.0:
                log_v = math.log(trainer._vocab_size)
                normalized = dgpo["dgpo_entropy"] == "normalized"
                self.whatif_gates = {
                    "normalized": 1.0 if normalized else 1.0 / log_v,
                    "nats": log_v if normalized else 1.0,
                }
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.step_seconds.append(now - self._t)
            self._t = now
            shown, trainer.last_token_weights = getattr(trainer, "last_token_weights", None), None
            stds, on, off = [], [0.0, 0], [0.0, 0]
            for ids, w, m in zip(*(shown[k] for k in ("completion_ids", "weights", "mask"))) if shown else ():
                ids, w = ids[m], w[m]
                positive = w[w > 0]
                if len(positive) > 1:
                    stds.append(positive.log().std().item())
                if task.decisive is not None:
                    for weight, decisive in zip(w.tolist(), task.decisive(tokenizer.convert_ids_to_tokens(ids))):
                        bucket = on if decisive else off
                        bucket[0] += weight
                        bucket[1] += 1
            self.log_weight_std.append(statistics.fmean(stds) if stds else float("nan"))
            self.decisive_weight.append(on[0] / on[1] if on[1] else float("nan"))
            self.other_weight.append(off[0] / off[1] if off[1] else float("nan"))
            for gate, factor in self.whatif_gates.items():
                for tau_new in WHATIF_TAUS:
                    ess, w_max = (
                        whatif_ess(shown["weights"], shown["mask"], trainer.args.dgpo_tau, factor, tau_new)
                        if shown
                        else (float("nan"), float("nan"))
                    )
                    self.whatif.setdefault(f"whatif/{gate}/tau{tau_new:g}/ess", []).append(ess)
                    self.whatif.setdefault(f"whatif/{gate}/tau{tau_new:g}/max_w", []).append(w_max)

    spread = WeightProbe()
    trainer.add_callback(spread)
    trainer.remove_callback(PrinterCallback)  # disable_tqdm=True would print every step's log dict
    trainer.num_completions_to_show = 10**9  # keep every scored completion's weights for the probe
    start = time.perf_counter()
    with fast_sampling(bool(task.vocab_size)):
        trainer.train()
    train_seconds = time.perf_counter() - start
    history = {key: [] for key in HISTORY_KEYS}
    steps = []
    for row in trainer.state.log_history:
        if "reward" not in row:
            continue
        steps.append(row["step"])
        for key in HISTORY_KEYS:
            history[key].append(row.get(key, float("nan")))
    if config.trainer == "dgpo":
        history["score_spread"] = [
            std * tau if math.isfinite(std) else float("nan")
            for std, tau in zip(spread.log_weight_std, history["dgpo/tau"])
        ]
        if task.decisive is not None:
            history["weight_decisive"] = spread.decisive_weight
            history["weight_other"] = spread.other_weight
        history.update(spread.whatif)
    history["step_seconds"] = spread.step_seconds
    with fast_sampling(bool(task.vocab_size)):
        accuracy = evaluate(trainer.model, tokenizer, task, splits["eval"], settings, seed)
    record = {
        "task": task_name,
        "config": asdict(config),
        "seed": seed,
        "settings": asdict(settings),
        "steps": steps,
        "history": history,
        **accuracy,
        "train_seconds": train_seconds,
        "worker_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    record_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(record_path)
    shutil.rmtree(args["output_dir"], ignore_errors=True)
    trainer = None  # the callbacks' closures hold the name: release the model before the next run
    return record


def estimated_seconds(job) -> float:
    """A rough RL-run cost (seconds on one core) for ordering the jobs: measured here under load, an RL step took
    ~0.1 s at 99 vocabulary rows, and ~11 s (reversal) / ~14 s (filler) at 151,936, ~linear in the rows; DGPO ~1.3x
    GRPO. Only the order uses it."""
    task_name, config_name, _, settings, _ = job[1]
    task = TASKS[task_name]
    step = 0.1 + (task.vocab_size or 100) * task.max_completion_length**0.3 * 3.8e-5
    return settings.rl_steps * step * (1.3 if CONFIGS[config_name].trainer == "dgpo" else 1.0)


def order_jobs(jobs: list) -> list:
    """Longest first within two queues, large-vocabulary runs (>= 32,000 rows) and the others, merged so that their
    running estimated costs stay level: one worker is mostly on a large-vocabulary run while the other works through
    small ones (two 151,936-row runs at once slowed each other ~1.7x here, on memory bandwidth)."""
    big = sorted((j for j in jobs if (TASKS[j[1][0]].vocab_size or 0) >= 32000), key=estimated_seconds, reverse=True)
    small = sorted((j for j in jobs if (TASKS[j[1][0]].vocab_size or 0) < 32000), key=estimated_seconds, reverse=True)
    ordered, spent = [], [0.0, 0.0]
    while big or small:
        queue = 0 if big and (not small or spent[0] <= spent[1]) else 1
        job = (big if queue == 0 else small).pop(0)
        spent[queue] += estimated_seconds(job)
        ordered.append(job)
    return ordered


def _call(job):
    kind, payload = job
    fn = warm_up if kind == "warmup" else train_run
    start = time.perf_counter()
    result = fn(*payload)
    return kind, payload[:3] if kind == "train" else payload[:1] + payload[2:3], time.perf_counter() - start, result


def run_jobs(jobs: list, workers: int, log) -> list:
    """Runs `jobs` in `workers` spawned processes (1 thread each), or in this process when workers <= 1."""
    results = []
    if workers <= 1:
        for job in jobs:
            results.append(_report(_call(job), log))
        return results
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        for outcome in pool.imap_unordered(_call, jobs):
            results.append(_report(outcome, log))
    return results


def _report(outcome, log):
    kind, key, seconds, result = outcome
    extra = f"greedy {result['greedy_accuracy']:.3f} sampled {result['sampled_accuracy']:.3f}"
    if result.get("reused"):
        extra += "  (finished earlier: reused)"
    log(f"  {kind:6s} {'/'.join(map(str, key)):40s} {seconds:6.1f}s  {extra}")
    return result


# ----------------------------------------------------------------------------------------------------------------
# Aggregation


def mean_std(values) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(pair, digits=3) -> str:
    m, s = pair
    return "n/a" if not math.isfinite(m) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _blocks(values: list[float], block: int) -> list[float]:
    out = []
    for i in range(0, len(values), block):
        chunk = [v for v in values[i : i + block] if math.isfinite(v)]
        out.append(statistics.fmean(chunk) if chunk else float("nan"))
    return out


def aggregate(out: Path, task_names, configs_by_task: dict, seeds, settings_by_task) -> dict:
    summary = {"tasks": {}}
    for task_name in task_names:
        settings = settings_by_task[task_name]
        config_names = configs_by_task[task_name]
        warmups = [json.loads((out / "models" / task_name / f"seed{s}" / "warmup.json").read_text()) for s in seeds]
        task_summary = {
            "description": TASKS[task_name].description,
            "base": TASKS[task_name].base,
            "vocab_size": TASKS[task_name].vocab_size,
            "settings": asdict(settings),
            "max_completion_length": TASKS[task_name].max_completion_length,
            "warmup": {
                "steps": [w["steps"] for w in warmups],
                "greedy_accuracy": mean_std([w["greedy_accuracy"] for w in warmups]),
                "sampled_accuracy": mean_std([w["sampled_accuracy"] for w in warmups]),
            },
            "configs": {},
        }
        if TASKS[task_name].vocab_size:  # the padded rows after their fit (teacher-forced at the SFT targets)
            task_summary["warmup"].update(
                {
                    "pad_steps": [w["pad_steps"] for w in warmups],
                    "tail_mass": mean_std([w["tail_after"]["tail_mass"] for w in warmups]),
                    "tail_mass_q90": mean_std([w["tail_after"]["tail_mass_q10_50_90_99"][2] for w in warmups]),
                    "tail_mass_max": mean_std([w["tail_after"]["tail_mass_max"] for w in warmups]),
                    "entropy": mean_std([w["tail_after"]["entropy"] for w in warmups]),
                    "real_entropy": mean_std([w["tail_after"]["real_entropy"] for w in warmups]),
                    "sampled_padded_fraction": mean_std([w["sampled_padded_fraction"] for w in warmups]),
                }
            )
        for config_name in config_names:
            runs = [json.loads((out / "runs" / task_name / config_name / f"seed{s}.json").read_text()) for s in seeds]
            h = [r["history"] for r in runs]
            blocks = {}
            keys = [
                "reward",
                "dgpo/ess",
                "dgpo/weight/max",
                "dgpo/tau",
                "score_spread",
                "dgpo/score/mean",
                "dgpo/score/std",
                "dgpo/score/max",
                "dgpo/divergence/mean",
                "dgpo/entropy/mean",
                "entropy",
                "completions/mean_length",
                "weight_decisive",
                "weight_other",
                "padded_fraction",
            ]
            keys += sorted({k for x in h for k in x if k.startswith("whatif/")})
            for x in h:  # (within-completion score std / tau)^2: what 1 - ESS is for small spreads
                if "dgpo/score/std" in x:
                    x["score_over_tau_squared"] = [(s / t) ** 2 for s, t in zip(x["dgpo/score/std"], x["dgpo/tau"])]
            keys.append("score_over_tau_squared")
            overall, peak = {}, {}
            for key in keys:
                per_seed = [_blocks(x.get(key, []), settings.block) for x in h]
                if not per_seed or not per_seed[0]:
                    continue
                blocks[key] = [mean_std([p[i] for p in per_seed if i < len(p)]) for i in range(len(per_seed[0]))]
                # over all steps: mean over a seed's steps, then mean ± std over seeds
                overall[key] = mean_std(
                    [
                        statistics.fmean(v) if (v := [y for y in x.get(key, []) if math.isfinite(y)]) else float("nan")
                        for x in h
                    ]
                )
                if key.endswith(("max", "max_w")):  # the largest over a seed's steps, then mean ± std over seeds
                    peak[key] = mean_std(
                        [max(v) if (v := [y for y in x.get(key, []) if math.isfinite(y)]) else float("nan") for x in h]
                    )
            grpo = (
                [json.loads((out / "runs" / task_name / "grpo" / f"seed{s}.json").read_text()) for s in seeds]
                if "grpo" in config_names
                else []
            )

            def paired(key):  # same seed, same warm-up, same data order: differences to GRPO
                return [r[key] - g[key] for r, g in zip(runs, grpo)]

            def mean_reward(run):
                return statistics.fmean(run["history"]["reward"])

            task_summary["configs"][config_name] = {
                "label": CONFIGS[config_name].label,
                "describe": CONFIGS[config_name].describe(),
                "greedy_accuracy": mean_std([r["greedy_accuracy"] for r in runs]),
                "sampled_accuracy": mean_std([r["sampled_accuracy"] for r in runs]),
                "sampled_minus_grpo": mean_std(paired("sampled_accuracy")),
                "greedy_minus_grpo": mean_std(paired("greedy_accuracy")),
                "per_seed_sampled_minus_grpo": paired("sampled_accuracy"),
                "per_seed_greedy_minus_grpo": paired("greedy_accuracy"),
                "per_seed_sampled": [r["sampled_accuracy"] for r in runs],
                "per_seed_greedy": [r["greedy_accuracy"] for r in runs],
                "final_block_reward": blocks["reward"][-1],
                "reward_minus_grpo": mean_std([mean_reward(r) - mean_reward(g) for r, g in zip(runs, grpo)]),
                "overall": overall,
                "peak": peak,
                "blocks": blocks,
                "train_seconds": mean_std([r["train_seconds"] for r in runs]),
            }
        summary["tasks"][task_name] = task_summary
    return summary


def write_markdown(summary: dict, path: Path, header: str) -> None:
    lines = [header, ""]
    for task_name, t in summary["tasks"].items():
        s = t["settings"]
        lines += [
            f"## {task_name}: {t['description']}",
            "",
            f"Warm-up start point (SFT until validation sampled accuracy >= {s['warmup_target']:g}; steps per seed "
            f"{t['warmup']['steps']}), held-out, mean ± std over seeds: "
            f"greedy {fmt(t['warmup']['greedy_accuracy'])}, "
            f"sampled {fmt(t['warmup']['sampled_accuracy'])}. "
            f"RL: {s['rl_steps']} steps x {s['prompts_per_step']} prompts x "
            f"{s['num_generations']} completions, max {t['max_completion_length']} tokens, lr {s['learning_rate']:g}. "
            f"Held-out: {s['n_eval']} prompts, greedy and {s['eval_samples']} samples each.",
            "",
            "| config | held-out greedy | held-out sampled | sampled - GRPO (paired) | reward, last block | "
            "mean ESS | mean max w | mean tau | s spread (first → last block) | mean score std | mean H (nats) | "
            "mean w answer / filler | train s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, c in t["configs"].items():
            b = c["blocks"]

            def overall(key):
                vals = [m for m, _ in b.get(key, []) if math.isfinite(m)]
                return f"{statistics.fmean(vals):.3g}" if vals else "–"

            spread = b.get("score_spread")
            spread_text = (
                f"{spread[0][0]:.2g} → {spread[-1][0]:.2g}" if spread and math.isfinite(spread[0][0]) else "–"
            )
            lines.append(
                f"| {name} | {fmt(c['greedy_accuracy'])} | {fmt(c['sampled_accuracy'])} | "
                f"{fmt(c['sampled_minus_grpo'])} | {fmt(c['final_block_reward'])} | {overall('dgpo/ess')} | "
                f"{overall('dgpo/weight/max')} | {overall('dgpo/tau')} | {spread_text} | "
                f"{overall('dgpo/score/std')} | {overall('dgpo/entropy/mean')} | "
                f"{overall('weight_decisive')} / {overall('weight_other')} | {c['train_seconds'][0]:.0f} |"
            )
        block = s["block"]
        n_blocks = len(next(iter(t["configs"].values()))["blocks"]["reward"])
        lines += [
            "",
            f"Training reward (mean ± std over seeds) per block of {block} steps:",
            "",
            "| config | "
            + " | ".join(f"{i * block + 1}-{min((i + 1) * block, s['rl_steps'])}" for i in range(n_blocks))
            + " |",
            "|---|" + "---|" * n_blocks,
        ]
        for name, c in t["configs"].items():
            lines.append(f"| {name} | " + " | ".join(fmt(p, 2) for p in c["blocks"]["reward"]) + " |")
        lines.append("")
    lines += vocabulary_tables(summary)
    path.write_text("\n".join(lines) + "\n")


def _vocab_groups(summary: dict) -> dict[str, list[tuple[int, str, dict]]]:
    """{base task: [(vocabulary size, task name, task summary), ...] by size} for the vocabulary-scale tasks."""
    groups: dict[str, list] = {}
    for name, t in summary["tasks"].items():
        if t.get("vocab_size"):
            groups.setdefault(t["base"], []).append((t["vocab_size"], name, t))
    return {base: sorted(rows, key=lambda r: r[0]) for base, rows in groups.items()}


def _g(pair, digits=3) -> str:
    m, s = pair
    return "–" if not math.isfinite(m) else f"{m:.{digits}g} ± {s:.2g}"


def vocabulary_tables(summary: dict) -> list[str]:
    """The vocabulary-scale experiment: per base task, the weights and the learning result at each vocabulary size
    and gate, and the what-if table (the ESS each tau would give on the same runs' scores, under either gate)."""
    lines = []
    for base, rows in _vocab_groups(summary).items():
        s = rows[0][2]["settings"]
        lines += [
            f"## Vocabulary scale: {base}",
            "",
            f"The same warm-ups (seeds {summary.get('seeds', '?')}) with the model's vocabulary padded to V rows "
            f"(padded rows fitted to a total probability of {s['pad_tail_mass']:g} per position, everything else "
            f"frozen); RL: {s['rl_steps']} steps x {s['prompts_per_step']} prompts x {s['num_generations']} "
            "completions. A completion holding a padded id scores 0. Means over all steps, then mean ± std over "
            "seeds; 'minus GRPO' is paired by seed.",
            "",
            "| V | log V | warm-up: padded mass per position (mean; p90) | H (nats) | config | 1 - ESS | "
            "(score std / tau)^2 | max w | score mean | score std | completions with a padded id | held-out sampled | "
            "sampled - GRPO | reward - GRPO (all steps) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for vocab, name, t in rows:
            w = t["warmup"]
            tail = f"{w['tail_mass'][0]:.2g}; {w['tail_mass_q90'][0]:.2g}" if "tail_mass" in w else "–"
            for config_name, c in t["configs"].items():
                nan = (math.nan, 0.0)
                o = c["overall"]
                ess = o.get("dgpo/ess", nan)
                lines.append(
                    f"| {vocab:,} | {math.log(vocab):.1f} | {tail} | {_g(o.get('dgpo/entropy/mean', nan))} | "
                    f"{config_name} | {_g((1 - ess[0], ess[1]), 2)} | {_g(o.get('score_over_tau_squared', nan), 2)} | "
                    f"{_g(c['peak'].get('dgpo/weight/max', nan), 4)} | {_g(o.get('dgpo/score/mean', nan), 2)} | "
                    f"{_g(o.get('dgpo/score/std', nan), 2)} | {_g(o.get('padded_fraction', nan), 2)} | "
                    f"{fmt(c['sampled_accuracy'])} | {fmt(c['sampled_minus_grpo'])} | {fmt(c['reward_minus_grpo'])} |"
                )
        lines += [
            "",
            f"What tau means at each V ({base}): 1 - the mean ESS (max weight in brackets: the largest over a run's "
            "steps, mean over seeds) that each tau would give on the scores of the `dgpo` runs (normalized gate, "
            "tau 0.5), under either gate. Exact for those scores, because log w = s / tau + const within a completion "
            "and the nats score is log V times the normalized one at kappa = 1; the runs' own weights were those of "
            "the `tau 0.5, normalized` column. The `dgpo` rows of the main study (V = 99, "
            f"{summary['tasks'].get(base, {}).get('settings', {}).get('rl_steps', '?')} steps) are the last rows.",
            "",
            "| V | steps | gate | " + " | ".join(f"tau {x:g}" for x in WHATIF_TAUS) + " |",
            "|---|---|---|" + "---|" * len(WHATIF_TAUS),
        ]
        sources = [(f"{v:,}", t) for v, _, t in rows]
        if base in summary["tasks"]:
            sources.append(("99 (main study)", summary["tasks"][base]))
        for label, t in sources:
            c = t["configs"].get("dgpo")
            if c is None:
                continue
            for gate in ("normalized", "nats"):
                cells = []
                for x in WHATIF_TAUS:
                    ess = c["overall"].get(f"whatif/{gate}/tau{x:g}/ess")
                    top = c.get("peak", {}).get(f"whatif/{gate}/tau{x:g}/max_w", (float("nan"), 0.0))
                    cells.append("–" if ess is None else f"{1 - ess[0]:.2g} ({top[0]:.3g})")
                lines.append(f"| {label} | {t['settings']['rl_steps']} | {gate} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Plots


CURVE_CONFIGS = (
    "grpo",
    "grpo_kl",
    "dgpo",
    "dgpo_kappa0",
    "dgpo_rkl",
    "dgpo_tau0.003",
    "dgpo_ess0.8",
    "dgpo_ess0.5",
    "dgpo_nats_tau0.5",
)


def plot(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(CONFIGS)}  # one colour per config
    written = vocabulary_plots(summary, out, plt)
    base_tasks = {name: t for name, t in summary["tasks"].items() if not t.get("vocab_size")}
    if not base_tasks:
        return written
    for task_name, t in base_tasks.items():
        block = t["settings"]["block"]
        configs = t["configs"]
        fig, axes = plt.subplots(2, 3, figsize=(17, 8.5))
        dgpo_names = [c for c in configs if c.startswith("dgpo")]
        panels = [
            (axes[0, 0], "reward", "training reward (block mean)", [c for c in CURVE_CONFIGS if c in configs]),
            (axes[0, 1], "dgpo/ess", "mean normalised ESS of the weights", dgpo_names),
            (axes[0, 2], "dgpo/weight/max", "max token weight", dgpo_names),
            (axes[1, 0], "dgpo/tau", "tau (adaptive: chosen per batch)", dgpo_names),
            (axes[1, 1], "score_spread", "within-completion std of the scores s", dgpo_names),
            (axes[1, 2], "weight_decisive", "mean weight on reward-deciding tokens (GRPO: 1)", dgpo_names),
        ]
        for ax, key, title, names in panels:
            for name in names:
                pts = configs[name]["blocks"].get(key)
                if not pts:
                    continue
                x = [(i + 0.5) * block for i in range(len(pts))]
                m = [p[0] for p in pts]
                s = [p[1] for p in pts]
                (line,) = ax.plot(x, m, marker="o", ms=3, label=name, color=colors[name])
                ax.fill_between(
                    x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.15, color=line.get_color()
                )
            ax.set_title(title)
            ax.set_xlabel("step")
            if key in ("dgpo/weight/max", "dgpo/tau", "score_spread") and any(
                line.get_ydata().size and (line.get_ydata() > 0).any() for line in ax.get_lines()
            ):
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=7)
        axes[0, 1].legend(fontsize=6, ncol=2)
        if not any(configs[n]["blocks"].get("weight_decisive") for n in dgpo_names):
            axes[1, 2].text(0.5, 0.5, "every token decides the reward", ha="center", transform=axes[1, 2].transAxes)
        fig.suptitle(f"{task_name}: mean ± std over seeds")
        fig.tight_layout()
        path = out / f"{task_name}_training.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # Final held-out sampled accuracy: tau sweep vs GRPO and adaptive tau
    fig, axes = plt.subplots(1, len(base_tasks), figsize=(6 * len(base_tasks), 4.5), squeeze=False)
    for ax, (task_name, t) in zip(axes[0], base_tasks.items()):
        configs = t["configs"]
        sweep = sorted(
            (
                (CONFIGS[n].dgpo.get("dgpo_tau", 0.5), c)
                for n, c in configs.items()
                if CONFIGS[n].trainer == "dgpo" and set(CONFIGS[n].dgpo) <= {"dgpo_tau"}
            ),
            key=lambda x: x[0],
        )
        if sweep:
            ax.errorbar(
                [x for x, _ in sweep],
                [c["sampled_accuracy"][0] for _, c in sweep],
                yerr=[c["sampled_accuracy"][1] for _, c in sweep],
                marker="o",
                capsize=3,
                label="DGPO fixed tau",
            )
        nats = sorted(
            (
                (CONFIGS[n].dgpo["dgpo_tau"], c)
                for n, c in configs.items()
                if CONFIGS[n].dgpo.get("dgpo_entropy") == "nats"
            ),
            key=lambda x: x[0],
        )
        if nats:
            ax.errorbar(
                [x for x, _ in nats],
                [c["sampled_accuracy"][0] for _, c in nats],
                yerr=[c["sampled_accuracy"][1] for _, c in nats],
                marker="^",
                capsize=3,
                label="DGPO fixed tau, nats gate (Eq. 3)",
            )
        for name, style in (("grpo", "k--"), ("grpo_kl", "k:")):
            if name in configs:
                m, s = configs[name]["sampled_accuracy"]
                ax.axhline(m, color="k", ls=style[1:], label=f"{name} {m:.3f} ± {s:.3f}")
        for name, c in configs.items():
            if "dgpo_target_ess" in CONFIGS[name].dgpo:
                taus = [m for m, _ in c["blocks"].get("dgpo/tau", []) if math.isfinite(m)]
                x = statistics.fmean(taus) if taus else 0.5
                ax.errorbar(
                    [x],
                    [c["sampled_accuracy"][0]],
                    yerr=[c["sampled_accuracy"][1]],
                    marker="s",
                    capsize=3,
                    ls="none",
                    label=f"{name} (at its mean tau)",
                )
        w = t["warmup"]["sampled_accuracy"][0]
        ax.axhline(w, color="grey", lw=0.8, label=f"warm-up {w:.3f}")
        ax.set_xscale("log")
        ax.set_xlabel("tau")
        ax.set_ylabel("held-out sampled accuracy")
        ax.set_title(task_name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "tau_sweep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    # Final accuracy per configuration (top), and its paired difference to GRPO on the same seed (bottom)
    n_tasks = len(base_tasks)
    fig, axes = plt.subplots(2, n_tasks, figsize=(7 * n_tasks, 8.5), squeeze=False)
    for column, (task_name, t) in enumerate(base_tasks.items()):
        names = list(t["configs"])
        xs = list(range(len(names)))
        top, bottom = axes[0, column], axes[1, column]
        for offset, key, label in ((-0.2, "sampled", "sampled"), (0.2, "greedy", "greedy")):
            top.bar(
                [x + offset for x in xs],
                [t["configs"][n][f"{key}_accuracy"][0] for n in names],
                width=0.4,
                yerr=[t["configs"][n][f"{key}_accuracy"][1] for n in names],
                capsize=2,
                label=label,
            )
            line = bottom.errorbar(
                [x + offset for x in xs],
                [t["configs"][n][f"{key}_minus_grpo"][0] for n in names],
                yerr=[t["configs"][n][f"{key}_minus_grpo"][1] for n in names],
                fmt="o",
                capsize=3,
                label=f"{label}: mean ± std",
            )
            for x, n in zip(xs, names):
                seeds = t["configs"][n].get(f"per_seed_{key}_minus_grpo", [])
                bottom.scatter([x + offset] * len(seeds), seeds, s=8, color=line[0].get_color(), alpha=0.5)
        top.set_title(f"{task_name}: held-out accuracy after RL (mean ± std over seeds)")
        bottom.set_title(f"{task_name}: minus GRPO on the same seed (dots: seeds)")
        bottom.axhline(0.0, color="k", lw=0.8)
        for ax in (top, bottom):
            ax.set_xticks(xs)
            ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
            ax.legend(fontsize=7)
            ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "final_accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def vocabulary_plots(summary: dict, out: Path, plt) -> list[Path]:
    """vocab_scale.png (per base task: the weights' spread, the scores, and the paired learning result against log V,
    per configuration) and whatif_tau.png (the ESS each tau would give on the `dgpo` runs' scores, per V and gate)."""
    groups = _vocab_groups(summary)
    if not groups:
        return []
    written = []
    styles = {
        "dgpo": ("tab:blue", "o", "normalized gate, tau 0.5"),
        "dgpo_nats_tau0.5": ("tab:red", "^", "nats gate, tau 0.5"),
        "grpo": ("k", "s", "GRPO"),
    }
    nan = (math.nan, 0.0)

    def one_minus_ess(c):
        ess = c["overall"].get("dgpo/ess", nan)
        return 1 - ess[0], ess[1]

    fig, axes = plt.subplots(len(groups), 4, figsize=(20, 4.3 * len(groups)), squeeze=False)
    for row, (base, rows) in enumerate(groups.items()):
        x = [math.log(v) for v, _, _ in rows]
        panels = [
            ("1 - ESS", one_minus_ess, True),
            ("max token weight (largest over the run)", lambda c: c["peak"].get("dgpo/weight/max", nan), False),
            ("within-completion score std (trainer)", lambda c: c["overall"].get("dgpo/score/std", nan), True),
            ("held-out sampled accuracy minus GRPO (paired)", lambda c: c["sampled_minus_grpo"], False),
        ]
        for ax, (title, get, log) in zip(axes[row], panels):
            for name, (color, marker, label) in styles.items():
                if name == "grpo" and "GRPO" not in title:
                    continue
                pts = [get(t["configs"][name]) if name in t["configs"] else (math.nan, 0.0) for _, _, t in rows]
                ax.errorbar(
                    x,
                    [m for m, _ in pts],
                    yerr=[s for _, s in pts],
                    color=color,
                    marker=marker,
                    capsize=3,
                    label=label,
                )
            ax.set_xticks(x)
            ax.set_xticklabels([f"{v:,}\n(log V {math.log(v):.1f})" for v, _, _ in rows], fontsize=8)
            if log and any(line.get_ydata().size and (line.get_ydata() > 0).any() for line in ax.get_lines()):
                ax.set_yscale("log")
            if "GRPO" in title:
                ax.axhline(0.0, color="k", lw=0.8)
            ax.set_title(f"{base}: {title}", fontsize=9)
            ax.set_xlabel("model vocabulary size V")
            ax.grid(alpha=0.3)
        axes[row, 0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "vocab_scale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(1, len(groups), figsize=(7 * len(groups), 4.8), squeeze=False)
    for ax, (base, rows) in zip(axes[0], groups.items()):
        sources = [(f"V={v:,}", t) for v, _, t in rows]
        if base in summary["tasks"]:
            sources.append(
                (f"V=99, main study ({summary['tasks'][base]['settings']['rl_steps']} steps)", summary["tasks"][base])
            )
        shades = plt.get_cmap("viridis")
        for i, (label, t) in enumerate(sources):
            c = t["configs"].get("dgpo")
            if c is None:
                continue
            for gate, ls in (("normalized", "-"), ("nats", "--")):
                ess = [c["overall"].get(f"whatif/{gate}/tau{x:g}/ess", (math.nan, 0))[0] for x in WHATIF_TAUS]
                ax.plot(
                    WHATIF_TAUS,
                    [1 - e for e in ess],
                    ls=ls,
                    marker="o",
                    ms=3,
                    color=shades(i / max(len(sources) - 1, 1)),
                    label=f"{label}, {gate}",
                )
        ax.axvspan(0.5, 1.0, color="grey", alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tau (shaded: the paper's range)")
        ax.set_ylabel("1 - ESS the tau would give")
        ax.set_title(
            f"{base}: what tau means at each vocabulary size (dgpo runs' scores)\n"
            "solid: normalized gate, dashed: nats gate",
            fontsize=9,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, handlelength=4)
    fig.tight_layout()
    path = out / "whatif_tau.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


# ----------------------------------------------------------------------------------------------------------------
# Main


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    import torch
    import transformers
    import trl

    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke run: 1 seed, 3 configs, a few steps")
    p.add_argument(
        "--out",
        type=Path,
        default=HERE / "outputs",
        help="output folder: runs, warm-up models, tables, plots (default benchmarks/learning/outputs)",
    )
    p.add_argument(
        "--publish",
        type=Path,
        default=None,
        help="also copy summary.md, summary.json, study.log and the plots into this folder (e.g. docs/results)",
    )
    p.add_argument("--tasks", nargs="+", default=None, choices=list(TASKS))
    p.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS))
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--workers", type=int, default=None, help="parallel processes, 1 thread each (default 2; quick: 1)")
    p.add_argument("--steps", type=int, default=None, help="override RL steps for every task")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    tasks = args.tasks or list(QUICK_TASKS if args.quick else TASKS)
    selected = args.configs or (list(QUICK_CONFIGS) if args.quick else list(CONFIGS))
    configs = {t: [c for c in task_configs(t) if c in selected] for t in tasks}
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    workers = args.workers if args.workers is not None else (1 if args.quick else 2)
    settings = dict(QUICK_SETTINGS if args.quick else FULL_SETTINGS)
    if args.steps is not None:
        settings = {k: TaskSettings(**{**asdict(v), "rl_steps": args.steps}) for k, v in settings.items()}
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "study.log").open("a")

    def log(msg):
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    command = "python benchmarks/learning/study.py " + " ".join(sys.argv[1:] if argv is None else argv)
    info = machine()
    log(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  {command}\n# {info}")
    start = time.perf_counter()
    # Warm-ups first (every configuration of a seed starts from the same one; a padded-vocabulary task's starts from
    # its base task's), then the RL runs, longest first
    bases = list(dict.fromkeys(TASKS[t].base or t for t in tasks))
    records = run_jobs([("warmup", (t, settings[t], s, out)) for t in bases for s in seeds], workers, log)
    records = [r for r in records if r["task"] in tasks]  # a base warm-up only a padded task needs is not reported
    padded_tasks = [t for t in tasks if TASKS[t].vocab_size]
    records += run_jobs([("warmup", (t, settings[t], s, out)) for t in padded_tasks for s in seeds], workers, log)
    jobs = [("train", (t, c, s, settings[t], out)) for t in tasks for c in configs[t] for s in seeds]

    jobs = order_jobs(jobs)
    log(f"# {len(jobs)} RL runs, ~{sum(map(estimated_seconds, jobs)):.0f} s of single-core work estimated")
    records += run_jobs(jobs, workers, log)
    summary = aggregate(out, tasks, configs, seeds, settings)
    wall = time.perf_counter() - start
    ran = sum(not r.get("reused") for r in records)
    job_seconds = sum(r.get("train_seconds", r.get("wall_s", 0.0)) for r in records)
    summary.update(
        command=command,
        machine=info,
        workers=workers,
        seeds=seeds,
        wall_seconds=wall,
        jobs_run=ran,
        jobs_total=len(records),
        job_seconds=job_seconds,
        load_average_at_end=os.getloadavg(),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    reuse = (
        ""
        if ran == len(records)
        else (
            f" This invocation ran {ran} of {len(records)} jobs and reused the others from an earlier invocation of "
            "the same command (`study.log` in the output folder records every invocation's jobs and wall time)."
        )
    )
    header = (
        f"# Learning study results\n\nCommand: `{command}`; {workers} worker process(es), 1 thread each; seeds "
        f"{seeds}; wall time {wall:.0f} s on {info['cpu']} ({info['cpu_count']} cores, load average at start "
        f"{info['load_average_at_start'][0]:.2f}, at end {os.getloadavg()[0]:.2f}); the jobs' own "
        f"timings sum to {job_seconds:.0f} s (RL runs: `trainer.train()` only; warm-ups: SFT and evaluation)."
        f"{reuse}"
    )
    write_markdown(summary, out / "summary.md", header)
    plots = plot(summary, out)
    log(f"# done in {wall:.0f} s: {out / 'summary.md'}, {', '.join(p.name for p in plots)}")
    if args.publish is not None:
        args.publish.mkdir(parents=True, exist_ok=True)
        log(f"# copying the tables, plots and this log to {args.publish}")
        for path in [out / "summary.md", out / "summary.json", out / "study.log", *plots]:
            shutil.copy(path, args.publish / path.name)
    shutil.rmtree(out / "tmp", ignore_errors=True)
    return summary


if __name__ == "__main__":
    main()
