"""Offline learning study: does DGPO's token reallocation change what a tiny model learns, and does adaptive tau help?

One command runs everything (SFT warm-ups, RL runs, held-out evaluation, aggregation, plots):

    OMP_NUM_THREADS=1 python benchmarks/learning/study.py [--quick] [--out DIR] [--publish DIR] [--workers N]

For each task (see `tasks.py`) and seed, a random-init tiny Llama gets a short supervised warm-up, then every
configuration trains from that same warm-up with the same data order and sampling seed (a paired design):

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
import json
import math
import os
import platform
import re
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

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from tasks import TASKS, Task  # noqa: E402


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
        fields = {"dgpo_tau": 0.5, "dgpo_kappa": 1.0, "dgpo_score": "hellinger", **self.dgpo}
        return "DGPOTrainer, " + ", ".join(f"{k.removeprefix('dgpo_')}={v}" for k, v in fields.items())


def _tau_name(tau: float) -> str:
    return f"dgpo_tau{tau:g}"


TAU_SWEEP = (0.003, 0.01, 0.05, 0.5, 1.0)
TARGET_ESS = (0.8, 0.5)


def all_configs() -> dict[str, RunConfig]:
    configs = [
        RunConfig("grpo", "GRPO (beta=0)", trainer="grpo"),
        RunConfig("grpo_kl", "GRPO (beta=0.04)", trainer="grpo", beta=0.04),
        RunConfig("dgpo", "DGPO defaults (tau=0.5, kappa=1)"),
        RunConfig("dgpo_kappa0", "DGPO kappa=0 (no entropy gate)", dgpo={"dgpo_kappa": 0.0}),
        RunConfig("dgpo_rkl", "DGPO reverse KL", dgpo={"dgpo_score": "reverse_kl"}),
    ]
    for tau in TAU_SWEEP:
        if tau != 0.5:  # tau = 0.5 is the "dgpo" run
            configs.append(RunConfig(_tau_name(tau), f"DGPO tau={tau:g}", dgpo={"dgpo_tau": tau}))
    for target in TARGET_ESS:
        configs.append(
            RunConfig(f"dgpo_ess{target:g}", f"DGPO adaptive tau (ESS {target:g})", dgpo={"dgpo_target_ess": target})
        )
    return {c.name: c for c in configs}


CONFIGS = all_configs()
QUICK_CONFIGS = ("grpo", "dgpo", "dgpo_ess0.8")


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


FULL_SETTINGS = {
    "reversal": TaskSettings(),
    "filler": TaskSettings(),
}
QUICK_SETTINGS = {
    # Warm-ups long enough that some groups mix right and wrong completions, so DGPO's weights are exercised
    name: TaskSettings(warmup_target=0.1, warmup_check=20, warmup_max_steps=200, rl_steps=4, prompts_per_step=4,
                       n_sft=1000, n_train=64, n_eval=32, eval_samples=2, block=2)
    for name in FULL_SETTINGS
}


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
    path = out / "models" / task_name / f"seed{seed}"
    record_path = path / "warmup.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("settings") == asdict(settings):
            return {**record, "reused": True}
    start = time.perf_counter()
    splits = task.splits(seed, settings.n_sft, settings.n_train, settings.n_eval)
    build_tiny_model(path, hidden_size=settings.hidden_size, num_layers=settings.num_layers, seed=seed)
    model, tokenizer, steps, curve = supervised_warmup(task, path, splits, settings, seed)
    accuracy = evaluate(model, tokenizer, task, splits["eval"], settings, seed)
    record = {"task": task_name, "seed": seed, "settings": asdict(settings), "path": str(path), "steps": steps,
              "val_curve": curve, **accuracy, "wall_s": time.perf_counter() - start}
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


def evaluate(model, tokenizer, task: Task, rows: list[dict], settings: TaskSettings, seed: int) -> dict:
    """Greedy accuracy and sampled accuracy (`eval_samples` per prompt, temperature 1, no top-k/top-p: the training
    sampler) on held-out prompts."""
    import torch

    model.eval()
    prompts = [r["prompt"] for r in rows]
    answers = [r["answer"] for r in rows]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    common = dict(max_new_tokens=task.max_completion_length, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    width = batch["input_ids"].shape[1]

    def decode(ids):
        return tokenizer.batch_decode(ids[:, width:], skip_special_tokens=True)

    with torch.no_grad():
        greedy = decode(model.generate(**batch, do_sample=False, **common))
        torch.manual_seed(10_000 + seed)
        sampled = decode(model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                        num_return_sequences=settings.eval_samples, **common))
    greedy_reward = task.reward(greedy, answers)
    sampled_reward = task.reward(sampled, [a for a in answers for _ in range(settings.eval_samples)])
    return {
        "greedy_accuracy": sum(greedy_reward) / len(greedy_reward),
        "sampled_accuracy": sum(sampled_reward) / len(sampled_reward),
        "examples": [{"prompt": p, "greedy": g, "sampled": s} for p, g, s in
                     zip(prompts[:3], greedy[:3], sampled[: 3 * settings.eval_samples: settings.eval_samples])],
    }


HISTORY_KEYS = (
    "reward", "reward_std", "frac_reward_zero_std", "entropy", "kl", "completions/mean_length",
    "dgpo/tau", "dgpo/ess", "dgpo/weight/max", "dgpo/weight/std", "dgpo/divergence/mean", "dgpo/divergence/max",
    "dgpo/score/mean", "dgpo/entropy_normalized/mean", "dgpo/reverse_kl/mean", "dgpo/scored_fraction",
)


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
        if record.get("settings") == asdict(settings) and record.get("config") == asdict(config):
            return {**record, "reused": True}
    model_path = out / "models" / task_name / f"seed{seed}"
    splits = task.splits(seed, settings.n_sft, settings.n_train, settings.n_eval)
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
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_path)
    trainer = trainer_cls(
        str(model_path),
        task.reward,
        args=training_args,
        train_dataset=Dataset.from_list(splits["train"]),
        processing_class=tokenizer,
    )

    class WeightProbe(TrainerCallback):
        """Per step, from every scored completion's token weights (`trainer.last_token_weights`):
        - the within-completion std of log w: log w_t = s_t / tau + const, so tau * std(log w) is the within-completion
          std of the scores s (the spread tau has to match);
        - on tasks where only some tokens decide the reward, the mean weight on those tokens and on the others
          (GRPO: 1 and 1)."""

        def __init__(self):
            self.log_weight_std: list[float] = []
            self.decisive_weight: list[float] = []
            self.other_weight: list[float] = []
            self.step_seconds: list[float] = []
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

    spread = WeightProbe()
    trainer.add_callback(spread)
    trainer.remove_callback(PrinterCallback)  # disable_tqdm=True would print every step's log dict
    trainer.num_completions_to_show = 10**9  # keep every scored completion's weights for the probe
    start = time.perf_counter()
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
    history["step_seconds"] = spread.step_seconds
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
    }
    record_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(record_path)
    shutil.rmtree(args["output_dir"], ignore_errors=True)
    del trainer
    return record


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


def aggregate(out: Path, task_names, config_names, seeds, settings_by_task) -> dict:
    summary = {"tasks": {}}
    for task_name in task_names:
        settings = settings_by_task[task_name]
        warmups = [json.loads((out / "models" / task_name / f"seed{s}" / "warmup.json").read_text()) for s in seeds]
        task_summary = {
            "description": TASKS[task_name].description,
            "settings": asdict(settings),
            "max_completion_length": TASKS[task_name].max_completion_length,
            "warmup": {
                "steps": [w["steps"] for w in warmups],
                "greedy_accuracy": mean_std([w["greedy_accuracy"] for w in warmups]),
                "sampled_accuracy": mean_std([w["sampled_accuracy"] for w in warmups]),
            },
            "configs": {},
        }
        for config_name in config_names:
            runs = [json.loads((out / "runs" / task_name / config_name / f"seed{s}.json").read_text()) for s in seeds]
            h = [r["history"] for r in runs]
            blocks = {}
            for key in ("reward", "dgpo/ess", "dgpo/weight/max", "dgpo/tau", "score_spread", "dgpo/score/mean",
                        "dgpo/divergence/mean", "entropy", "completions/mean_length", "weight_decisive",
                        "weight_other"):
                per_seed = [_blocks(x.get(key, []), settings.block) for x in h]
                if not per_seed or not per_seed[0]:
                    continue
                blocks[key] = [mean_std([p[i] for p in per_seed if i < len(p)]) for i in range(len(per_seed[0]))]
            grpo = [json.loads((out / "runs" / task_name / "grpo" / f"seed{s}.json").read_text()) for s in seeds] \
                if "grpo" in config_names else []

            def paired(key):  # same seed, same warm-up, same data order: differences to GRPO
                return [r[key] - g[key] for r, g in zip(runs, grpo)]

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
            "mean ESS | mean max w | mean tau | s spread (first → last block) | mean w answer / filler | train s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
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
                f"{overall('weight_decisive')} / {overall('weight_other')} | {c['train_seconds'][0]:.0f} |"
            )
        block = s["block"]
        n_blocks = len(next(iter(t["configs"].values()))["blocks"]["reward"])
        lines += ["", f"Training reward (mean ± std over seeds) per block of {block} steps:", "",
                  "| config | " + " | ".join(f"{i * block + 1}-{min((i + 1) * block, s['rl_steps'])}"
                                          for i in range(n_blocks)) + " |",
                  "|---|" + "---|" * n_blocks]
        for name, c in t["configs"].items():
            lines.append(f"| {name} | " + " | ".join(fmt(p, 2) for p in c["blocks"]["reward"]) + " |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Plots


CURVE_CONFIGS = ("grpo", "grpo_kl", "dgpo", "dgpo_kappa0", "dgpo_rkl", "dgpo_tau0.003", "dgpo_ess0.8", "dgpo_ess0.5")


def plot(summary: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {name: plt.get_cmap("tab20")(i % 20) for i, name in enumerate(CONFIGS)}  # one colour per config
    written = []
    for task_name, t in summary["tasks"].items():
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
                line, = ax.plot(x, m, marker="o", ms=3, label=name, color=colors[name])
                ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.15,
                                color=line.get_color())
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
    fig, axes = plt.subplots(1, len(summary["tasks"]), figsize=(6 * len(summary["tasks"]), 4.5), squeeze=False)
    for ax, (task_name, t) in zip(axes[0], summary["tasks"].items()):
        configs = t["configs"]
        sweep = sorted(
            ((CONFIGS[n].dgpo.get("dgpo_tau", 0.5), c) for n, c in configs.items()
             if CONFIGS[n].trainer == "dgpo" and set(CONFIGS[n].dgpo) <= {"dgpo_tau"}),
            key=lambda x: x[0],
        )
        if sweep:
            ax.errorbar([x for x, _ in sweep], [c["sampled_accuracy"][0] for _, c in sweep],
                        yerr=[c["sampled_accuracy"][1] for _, c in sweep], marker="o", capsize=3,
                        label="DGPO fixed tau")
        for name, style in (("grpo", "k--"), ("grpo_kl", "k:")):
            if name in configs:
                m, s = configs[name]["sampled_accuracy"]
                ax.axhline(m, color="k", ls=style[1:], label=f"{name} {m:.3f} ± {s:.3f}")
        for name, c in configs.items():
            if "dgpo_target_ess" in CONFIGS[name].dgpo:
                taus = [m for m, _ in c["blocks"].get("dgpo/tau", []) if math.isfinite(m)]
                x = statistics.fmean(taus) if taus else 0.5
                ax.errorbar([x], [c["sampled_accuracy"][0]], yerr=[c["sampled_accuracy"][1]], marker="s", capsize=3,
                            ls="none", label=f"{name} (at its mean tau)")
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
    n_tasks = len(summary["tasks"])
    fig, axes = plt.subplots(2, n_tasks, figsize=(7 * n_tasks, 8.5), squeeze=False)
    for column, (task_name, t) in enumerate(summary["tasks"].items()):
        names = list(t["configs"])
        xs = list(range(len(names)))
        top, bottom = axes[0, column], axes[1, column]
        for offset, key, label in ((-0.2, "sampled", "sampled"), (0.2, "greedy", "greedy")):
            top.bar([x + offset for x in xs], [t["configs"][n][f"{key}_accuracy"][0] for n in names], width=0.4,
                    yerr=[t["configs"][n][f"{key}_accuracy"][1] for n in names], capsize=2, label=label)
            line = bottom.errorbar([x + offset for x in xs], [t["configs"][n][f"{key}_minus_grpo"][0] for n in names],
                                   yerr=[t["configs"][n][f"{key}_minus_grpo"][1] for n in names], fmt="o", capsize=3,
                                   label=f"{label}: mean ± std")
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

    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl.__version__, "load_average_at_start": os.getloadavg()}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CI smoke run: 1 seed, 3 configs, a few steps")
    p.add_argument("--out", type=Path, default=HERE / "outputs",
                   help="output folder: runs, warm-up models, tables, plots (default benchmarks/learning/outputs)")
    p.add_argument("--publish", type=Path, default=None,
                   help="also copy summary.md, summary.json, study.log and the plots into this folder "
                   "(e.g. docs/results)")
    p.add_argument("--tasks", nargs="+", default=None, choices=list(TASKS))
    p.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS))
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--workers", type=int, default=None, help="parallel processes, 1 thread each (default 2; quick: 1)")
    p.add_argument("--steps", type=int, default=None, help="override RL steps for every task")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    tasks = args.tasks or list(TASKS)
    configs = args.configs or (list(QUICK_CONFIGS) if args.quick else list(CONFIGS))
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
    # Warm-ups first (every configuration of a seed starts from the same one), then the RL runs, longest first
    records = run_jobs([("warmup", (t, settings[t], s, out)) for t in tasks for s in seeds], workers, log)
    jobs = [("train", (t, c, s, settings[t], out)) for t in tasks for c in configs for s in seeds]
    # Longest first: filler (longer completions) before reversal, DGPO (an extra reference pass) before GRPO
    jobs.sort(key=lambda j: (-TASKS[j[1][0]].max_completion_length, CONFIGS[j[1][1]].trainer != "dgpo"))
    records += run_jobs(jobs, workers, log)
    summary = aggregate(out, tasks, configs, seeds, settings)
    wall = time.perf_counter() - start
    ran = sum(not r.get("reused") for r in records)
    job_seconds = sum(r.get("train_seconds", r.get("wall_s", 0.0)) for r in records)
    summary.update(command=command, machine=info, workers=workers, seeds=seeds, wall_seconds=wall, jobs_run=ran,
                   jobs_total=len(records), job_seconds=job_seconds, load_average_at_end=os.getloadavg())
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    reuse = "" if ran == len(records) else (
        f" This invocation ran {ran} of {len(records)} jobs and reused the others from an earlier invocation of the "
        "same command (`study.log` in the output folder records every invocation's jobs and wall time)."
    )
    header = (f"# Learning study results\n\nCommand: `{command}`; {workers} worker process(es), 1 thread each; seeds "
              f"{seeds}; wall time {wall:.0f} s on {info['cpu']} ({info['cpu_count']} cores, load average at start "
              f"{info['load_average_at_start'][0]:.2f}, at end {os.getloadavg()[0]:.2f}); the jobs' own "
              f"timings sum to {job_seconds:.0f} s (RL runs: `trainer.train()` only; warm-ups: SFT and evaluation)."
              f"{reuse}")
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
