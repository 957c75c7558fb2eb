"""Step benchmark: DGPO vs GRPO(beta=0.04) vs GRPO(beta=0), one process per trainer, interleaved over rounds.

Each measurement is one *process* that builds one trainer (TRL's `GRPOTrainer` for the baselines, `DGPOTrainer` for
DGPO) from a model saved on disk beforehand, trains it for a few generation cycles and writes what it measured. The
processes run one at a time, in rounds: round 1 runs every configuration's variants (A B C), round 2 runs them again
with the order rotated (B C A), and so on. Each ratio is taken per round (DGPO's process against the baseline's of the
same round, minutes apart) and then summarised over rounds: mean, median, spread and a 95% confidence half-width, with
the number of rounds a +-3% resolution would need; and again "at the same generation speed" (each process's cycle over
its own generation time, the same work in every variant: it cancels a host whose speed drifts between processes).
Targets are judged met or missed on the mean, and resolved only when the whole 95% interval is on one side. Why
processes, not threads in one process: identical work costs the same in every process, whereas in one shared process
it did not (the allocator's state, shared by every trainer, gave each a different number of page faults: CHANGELOG.md,
0.1.0); peak memory is the process's own; and at Qwen2.5-0.5B's shape three trainers do not fit in 24 GiB at once.

Model: random-init Qwen2-shaped causal LMs (`SHAPES`; tied embeddings like Qwen2.5-0.5B) with the character
tokenizer. At V = 151,936 a random model practically never samples its end-of-sequence token, so every completion
runs to `--max-completion-length` and every variant does the same generation and training work.

What is timed: a *generation cycle*, one generation and the `steps_per_generation` optimizer steps trained on it,
from the end of the previous cycle's last optimizer step to the end of this cycle's (the first `--warmup` cycles are
not counted). It is split into:
- generation: TRL's `_generate` (the same HF generation in every variant);
- scoring stage: TRL's `_generate_and_score_completions` minus the generation (rewards, TRL's old-log-prob and
  reference passes, or DGPO's scoring-time passes);
- training steps: the rest (forward, backward, optimizer, logging; DGPO's loss-time reference forward and
  divergence pass on the aligned path).
`ref_forward_ms` is the time inside the reference model's backbone (torch forward hooks on the reference's
`base_model`): TRL's reference pass for GRPO(beta=0.04), DGPO's reference forward for DGPO. DGPO's floor against
GRPO(beta=0) is 1 + DGPO's ref_forward_ms / GRPO(beta=0)'s cycle, per round.

Paths (gradient_accumulation_steps = 1):
- aligned:   steps_per_generation = 1 (TRL's default). TRL computes no old log-probs; DGPO takes pi_theta's hidden
             states from the training forward and scores only completions with a nonzero advantage.
- offpolicy: steps_per_generation = 2. TRL runs a scoring-time policy pass for old log-probs over the generation
             batch; DGPO answers it with its own pass and scores every completion (the rewards are not known yet).

Configurations (`--configs PATH:ZERO:HEAD ...`):
- ZERO, the fraction of groups whose completions all get the same reward (zero advantage): `ControlledReward` makes
  exactly that fraction of groups constant and gives every other completion a distinct reward, whatever the model
  generates. At 0 every completion is scored; DGPO's aligned-path saving grows with the fraction.
- HEAD, the positions TRL's fused LM head projects: `completion` (only the positions with a label: TRL's compact path,
  what a GPU runs) or `all` (every position, prompt and padding included: what TRL 1.16 does on CPU, whose compact
  path is Triton-only; `_use_triton` in trl/kernels/chunked_logprob.py). DGPO's own passes project completion tokens
  either way, so `all` hands DGPO a CPU-only advantage over TRL's old-log-prob and reference passes: the figures that
  carry to a GPU are the `completion` ones, and the difference between the two is the CPU-only effect. On CUDA
  TRL's own path is compact, so only `completion` exists there.

Memory allocator (`--allocator`): by default (`reuse`) the measuring processes run glibc with mmap and heap trimming
off, so freed memory is reused as torch's CUDA caching allocator reuses its blocks. With glibc's defaults (`glibc`)
every block above its mmap threshold gets fresh pages from the kernel and returns them at free, so each large tensor
costs page faults on every use: on virtual machines that hand freed pages back to their host, a share of CPU time
that differs per trainer, and none of it on a GPU. Each cycle also records the process's CPU time and minor page
faults.

Peak memory: on CPU the process's peak resident set (VmHWM) from the start of `train()` (reset through
/proc/self/clear_refs), so the model loading's transient is left out and the resident policy, reference and optimizer
state are in; on a GPU torch.cuda.max_memory_allocated from the same point.

    python benchmarks/bench_steps.py --shape tiny --rounds 6          # 1 torch thread per process; ~4 min a round
    python benchmarks/bench_steps.py --shape qwen2.5-0.5b --rounds 5  # 2 threads, ~12 GiB per process; ~20 min a round
    python benchmarks/bench_steps.py --report benchmarks/results/steps_qwen2.5-0.5b_cpu_epyc.runs.jsonl  # tables
Every finished process is appended to `<out>/<stem>.runs.jsonl`; running the same command again resumes: it skips
what is there and adds rounds up to `--rounds`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, set_malloc, write_results  # noqa: E402

# Random-init Qwen2-family shapes. qwen2.5-7b is only measured layer by layer (bench_layers.py): it does not fit here.
SHAPES = {
    "micro": dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vocab=2048, tied=True),
    "tiny": dict(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=512, vocab=151936, tied=True),
    "qwen2.5-0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, tied=True),
    "qwen2.5-7b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064, tied=False),
}
VARIANTS = ("dgpo", "grpo_beta0.04", "grpo_beta0")
PATHS = {"aligned": 1, "offpolicy": 2}  # steps_per_generation
HEADS = ("completion", "all")
NAMES = {"grpo_beta0": "GRPO(beta=0)", "grpo_beta0.04": "GRPO(beta=0.04)", "dgpo": "DGPO"}
# Aligned-path cycles per process: a multiple of 5 makes a zero fraction of 0.4 exact over the timed cycles
# The configurations whose ratios carry to a GPU (TRL's compact head path); `all` stays available for the CPU-only
# effect of TRL's every-position head
CONFIGS = [
    "aligned:0:completion",
    "aligned:0.4:completion",
    "aligned:0.6:completion",
    "offpolicy:0:completion",
    "offpolicy:0.4:completion",
]
DEFAULTS = {"cpu": dict(configs=CONFIGS), "cuda": dict(configs=CONFIGS)}
TIMED_CYCLES = {"aligned": 5, "offpolicy": 3}
WARMUP_CYCLES = {"aligned": 2, "offpolicy": 1}
RESOLUTION = 0.03  # the ratios should resolve +-3%


@dataclass(frozen=True)
class Config:
    path: str
    zero_fraction: float
    head: str

    @classmethod
    def parse(cls, text: str) -> Config:
        path, zero, head = text.split(":")
        if path not in PATHS or head not in HEADS or not 0.0 <= float(zero) < 1.0:
            raise ValueError(
                f"bad configuration {text!r}: PATH:ZERO:HEAD with PATH in {list(PATHS)}, 0 <= ZERO < 1, "
                f"HEAD in {list(HEADS)}"
            )
        return cls(path, float(zero), head)

    @property
    def key(self) -> str:
        return f"{self.path}:{self.zero_fraction:g}:{self.head}"


# ---------------------------------------------------------------------------------------------------------------------
# The reward and the model


class ControlledReward:
    """A reward that sets the fraction of zero-advantage groups exactly, whatever the (random) model generates.

    Completions arrive grouped (TRL's sampler repeats each prompt `num_generations` times in a row). Group g of this
    process (counted over every call) is constant (reward 0 for all its completions, so every advantage is 0) when
    floor((g + 1) f) > floor(g f): exactly a fraction f of every 1/f consecutive groups. The others get distinct
    pseudo-random rewards seeded by g, so their advantages are nonzero. The rewards depend on the group index only,
    so every variant's process sees the same sequence.
    """

    __name__ = "controlled_reward"  # TRL names the reward's metrics after it

    def __init__(self, zero_fraction: float, num_generations: int):
        self.zero_fraction = zero_fraction
        self.num_generations = num_generations
        self.groups_seen = 0

    def is_constant(self, group: int) -> bool:
        f = self.zero_fraction
        return math.floor((group + 1) * f) > math.floor(group * f)

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        if len(completions) % self.num_generations:
            raise ValueError(f"{len(completions)} completions are not whole groups of {self.num_generations}")
        rewards = []
        for _ in range(len(completions) // self.num_generations):
            g, self.groups_seen = self.groups_seen, self.groups_seen + 1
            rng = random.Random(g)
            rewards += (
                [0.0] * self.num_generations
                if self.is_constant(g)
                else [rng.random() for _ in range(self.num_generations)]
            )
        return rewards


def build_model(path: Path, shape: str, dtype_name: str, device_name: str) -> None:
    """Saves a random-init Qwen2 model of `shape` and the character tokenizer under `path` (atomically)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dgpo_trl.tiny import build_tokenizer

    spec = SHAPES[shape]
    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=spec["tied"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device_name):  # initialising 0.5B parameters on a GPU takes a second, on one CPU thread a minute
        model = Qwen2ForCausalLM(config)
    model = model.to(getattr(torch, dtype_name))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(path)


def prepare_model(shape: str, dtype_name: str, device_name: str, cache: Path) -> Path:
    """The model's path, built once (in a process of its own, so no measuring process ever held the builder's
    memory) and cached."""
    path = cache / f"{shape}_v{SHAPES[shape]['vocab']}_{dtype_name}_random"
    if not (path / "config.json").exists():
        cache.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--child-build", shape, dtype_name, device_name, str(path)], check=True
        )
        print(f"# built {shape} in {time.perf_counter() - start:.0f}s: {path}", flush=True)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# One measuring process: one trainer, a few generation cycles


def _die_with_parent() -> None:
    """A measuring process must not outlive the harness (a killed kit or a Ctrl-C): Linux's parent-death signal."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


def _read_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _use_compact_lm_head() -> None:
    """Makes TRL's fused LM head project only the positions with a label on CPU too, as it does on a GPU.

    TRL 1.16 picks the compact path where Triton runs (`_use_triton(device)`, imported into trl.trainer.utils): on
    other devices it projects every position, because a varying number of rows would recompile on XLA-like devices.
    Only that choice changes here (the fold kernels keep their own `_use_triton`): the same log-probs, computed on the
    labelled rows only.
    """
    import trl.trainer.utils as trl_utils

    if not callable(getattr(trl_utils, "_use_triton", None)):
        raise RuntimeError("trl.trainer.utils._use_triton is gone: update _use_compact_lm_head for this TRL")
    trl_utils._use_triton = lambda device: True


def measure(spec: dict) -> dict:
    """Trains one trainer as `spec` says and returns what it measured (run in a process of its own)."""
    import torch
    from transformers import PreTrainedTokenizerFast, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from dgpo_trl import DGPOConfig, DGPOTrainer
    from dgpo_trl.tasks import reversal_dataset

    wall_start = time.perf_counter()
    load_start = os.getloadavg()
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    torch.set_num_threads(spec["threads"])
    config = Config.parse(spec["config"])
    if config.head == "completion" and device.type == "cpu":
        _use_compact_lm_head()
    elif config.head == "all" and device.type != "cpu":
        raise ValueError("head 'all' is TRL's CPU fallback; on a GPU TRL projects completion positions only")
    spg = PATHS[config.path]
    cycles = spec["warmup"] + spec["cycles"]
    half = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    kw = dict(
        output_dir=spec["output_dir"],
        per_device_train_batch_size=spec["batch"],
        num_generations=spec["generations"],
        max_completion_length=spec["max_completion_length"],
        steps_per_generation=spg,
        gradient_accumulation_steps=1,
        learning_rate=1e-6,
        max_steps=spg * cycles,
        logging_steps=1,
        bf16=half and dtype == torch.bfloat16,
        fp16=half and dtype == torch.float16,
        model_init_kwargs={"dtype": dtype},
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
    )
    variant = spec["variant"]
    dataset = reversal_dataset(spec["batch"] * spg * cycles * 2, seed=2)
    reward = ControlledReward(config.zero_fraction, spec["generations"])
    tokenizer = PreTrainedTokenizerFast.from_pretrained(spec["model_path"])
    if variant == "dgpo":
        trainer = DGPOTrainer(
            spec["model_path"], reward, args=DGPOConfig(**kw), train_dataset=dataset, processing_class=tokenizer
        )
    else:
        beta = {"grpo_beta0": 0.0, "grpo_beta0.04": 0.04}[variant]
        trainer = GRPOTrainer(
            spec["model_path"],
            reward,
            args=GRPOConfig(beta=beta, **kw),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    trainer.remove_callback(PrinterCallback)
    init_s = time.perf_counter() - wall_start

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    parts = {}

    def reset_parts():
        parts.update(generate=0.0, stage=0.0, generate_cpu=0.0, stage_cpu=0.0, ref_forward=0.0, ref_calls=0)

    reset_parts()

    def cpu_usage():
        # The process's CPU time and minor page faults (first touches of fresh memory: on CPU, every large tensor is
        # new memory from the kernel, zeroed, unless the allocator keeps it; on a GPU, torch's caching allocator does)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return dict(user_s=usage.ru_utime, sys_s=usage.ru_stime, minflt=usage.ru_minflt)

    def timed(fn, key):
        def wrapper(*args, **kwargs):
            sync()
            start, usage = time.perf_counter(), cpu_usage()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                parts[key] += time.perf_counter() - start
                parts[key + "_cpu"] += sum(cpu_usage()[k] - usage[k] for k in ("user_s", "sys_s"))

        return wrapper

    # TRL's methods, wrapped on the instance (DGPO's override of the second one included)
    trainer._generate = timed(trainer._generate, "generate")
    trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, "stage")
    reference = getattr(trainer, "ref_model", None)
    if reference is not None:
        backbone = trainer.accelerator.unwrap_model(reference).base_model
        started = []

        def before(module, args):
            sync()
            started.append(time.perf_counter())

        def after(module, args, output):
            sync()
            parts["ref_forward"] += time.perf_counter() - started.pop()
            parts["ref_calls"] += 1

        backbone.register_forward_pre_hook(before)
        backbone.register_forward_hook(after)

    record = dict(cycles=[], logs=[])

    class CycleTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record["load_peak_mib"] = (
                _read_kib("VmHWM") / 1024 if device.type == "cpu" else torch.cuda.max_memory_allocated(device) / 2**20
            )
            if device.type == "cpu":
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, from here on
            else:
                torch.cuda.reset_peak_memory_stats(device)
            record["train_begin_mib"] = (
                _read_kib("VmRSS") / 1024 if device.type == "cpu" else torch.cuda.memory_allocated(device) / 2**20
            )
            sync()
            self.start, self.usage = time.perf_counter(), cpu_usage()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % spg:
                return
            sync()
            now = time.perf_counter()
            cycle = dict(
                total_s=now - self.start,
                generate_s=parts["generate"],
                score_s=parts["stage"] - parts["generate"],
                train_s=now - self.start - parts["stage"],
                ref_forward_s=parts["ref_forward"] if reference is not None else None,
                ref_calls=parts["ref_calls"],
                generate_cpu_s=parts["generate_cpu"],
                warmup=len(record["cycles"]) < spec["warmup"],
            )
            usage = cpu_usage()
            cycle.update({k: usage[k] - self.usage[k] for k in usage})
            record["cycles"].append(cycle)
            reset_parts()
            self.start, self.usage = time.perf_counter(), usage

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.global_step > spec["warmup"] * spg:
                record["logs"].append(dict(logs))

    trainer.add_callback(CycleTimer())
    trainer.train()
    if device.type == "cpu":
        peak = _read_kib("VmHWM") / 1024
    else:
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        record["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20

    def mean_log(key):
        values = [log[key] for log in record["logs"] if log.get(key) is not None]
        return sum(values) / len(values) if values else None

    return dict(
        spec,
        peak_mib=peak,
        cycles=record["cycles"],
        load_peak_mib=record["load_peak_mib"],
        train_begin_mib=record["train_begin_mib"],
        peak_reserved_mib=record.get("peak_reserved_mib"),
        frac_reward_zero_std=mean_log("frac_reward_zero_std"),
        scored_fraction=mean_log("dgpo/scored_fraction"),
        completion_length=mean_log("completions/mean_length"),
        num_tokens=mean_log("num_tokens"),
        init_s=init_s,
        wall_s=time.perf_counter() - wall_start,
        load_average_start=load_start,
        load_average_end=os.getloadavg(),
        pid=os.getpid(),
        torch=torch.__version__,
    )


# ---------------------------------------------------------------------------------------------------------------------
# The harness: rounds of processes, resumable


SETTINGS = (
    "shape",
    "device",
    "dtype",
    "threads",
    "batch",
    "generations",
    "max_completion_length",
    "warmup_cycles",
    "timed_cycles",
    "allocator",
)
# How the measuring processes' glibc treats freed memory: "reuse" keeps it, as torch's CUDA caching allocator keeps its
# blocks (`_common.set_malloc`); "glibc" leaves its defaults, which give every block above the mmap threshold fresh
# pages from the kernel and take them back at free (page faults on every use of a large tensor: CPU-only)
ALLOCATORS = ("reuse", "glibc")


def settings_of(args) -> dict:
    return {k: getattr(args, k) for k in SETTINGS}


def read_runs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_benchmark(args, progress=None) -> dict:
    """Runs the rounds `args` asks for (skipping those already in the runs file), then summarises every run there.
    Returns the summary (also written as `<stem>.json`/`.csv` next to the runs file). `progress(summary)`, if
    given, gets the summary of the runs so far after each process."""
    out = Path(args.out or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / f"{args.stem}.runs.jsonl"
    settings = settings_of(args)
    runs = read_runs(runs_path)
    machine = machine_label(args.device)
    for run in runs:
        if run["settings"] != settings:
            raise SystemExit(f"{runs_path} holds runs with other settings ({run['settings']}); use another --stem")
        # A ratio is taken within a round, but a table mixes rounds: rounds from two processors do not belong together
        if run.get("machine", machine) != machine:
            raise SystemExit(
                f"{runs_path} holds runs measured on {run['machine']!r}, this is {machine!r}; use another --stem"
            )
    done = {(r["config"], r["variant"], r["round"]) for r in runs}
    model_path = prepare_model(args.shape, args.dtype, args.device, args.cache)
    configs = [Config.parse(c) for c in args.configs]
    todo = [
        (r, c, v)
        for r in range(1, args.rounds + 1)
        for c in configs
        for v in args.variants[(r - 1) % len(args.variants) :] + args.variants[: (r - 1) % len(args.variants)]
        if (c.key, v, r) not in done
    ]
    print(
        f"# {args.shape} on {args.device}: {len(done)} runs in {runs_path.name}, {len(todo)} to go "
        f"(load average {os.getloadavg()[0]:.2f})",
        flush=True,
    )
    started = time.perf_counter()
    for i, (round_, config, variant) in enumerate(todo):
        elapsed = time.perf_counter() - started
        if args.budget_s is not None and i and elapsed + elapsed / i > args.budget_s:
            print(
                f"# the {args.budget_s:.0f}s budget would run out during the next process: stopping after {i} "
                f"(the same command resumes)",
                flush=True,
            )
            break
        wait_for_quiet(args.max_load)
        spec = dict(
            settings,
            config=config.key,
            variant=variant,
            round=round_,
            model_path=str(model_path),
            warmup=args.warmup_cycles.get(config.path, 1),
            cycles=args.timed_cycles.get(config.path, 1),
        )
        with tempfile.TemporaryDirectory(prefix="dgpo_bench_") as tmp:
            spec["output_dir"] = tmp
            result_path = Path(tmp) / "result.json"
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            proc = subprocess.run(
                [sys.executable, __file__, "--child-measure", json.dumps(spec), str(result_path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            if proc.returncode != 0 or not result_path.exists():
                raise RuntimeError(
                    f"{config.key} {variant} round {round_} failed ({proc.returncode}):\n" + proc.stdout[-4000:]
                )
            result = json.loads(result_path.read_text())
        result.pop("output_dir", None)
        result["settings"] = settings
        result["machine"] = machine
        with runs_path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        timed = [c["total_s"] for c in result["cycles"] if not c["warmup"]]
        elapsed = time.perf_counter() - started
        print(
            f"  round {round_} {config.key:24s} {variant:14s} cycle {1e3 * statistics.mean(timed):8.0f} ms, "
            f"peak {result['peak_mib']:7.0f} MiB, process {result['wall_s']:5.0f}s, load "
            f"{result['load_average_start'][0]:.2f}-{result['load_average_end'][0]:.2f}; "
            f"{i + 1}/{len(todo)}, ~{elapsed / (i + 1) * (len(todo) - i - 1) / 60:.0f} min left",
            flush=True,
        )
        if progress is not None:
            progress(summarize(read_runs(runs_path)))
    summary = summarize(read_runs(runs_path))
    summary["meta"] = dict(
        machine_info_for(args.device),
        argv=sys.argv,
        settings=settings,
        runs_file=str(runs_path),
        load_average_at_end=os.getloadavg(),
    )
    write_results(args.stem, summary["rows"], {k: v for k, v in summary.items() if k != "rows"}, out)
    print(report(summary))
    return summary


def wait_for_quiet(max_load: float | None, poll_s: float = 15.0) -> None:
    """On a shared machine: starts the next process only once the 1-minute load average (nothing of ours runs between
    processes) is below `max_load`, so that fewer measurements overlap other people's jobs."""
    if max_load is None:
        return
    waited = 0.0
    while os.getloadavg()[0] >= max_load:
        if waited == 0.0:
            print(f"  (waiting for the load average {os.getloadavg()[0]:.2f} to drop below {max_load})", flush=True)
        time.sleep(poll_s)
        waited += poll_s


def machine_info_for(device_name: str) -> dict:
    import torch

    return machine_info(torch.device(device_name))


def machine_label(device_name: str) -> str:
    """The processor the times belong to: the GPU's name on CUDA, else the CPU's model name."""
    info = machine_info_for(device_name)
    return info.get("gpu") or info["cpu"]


# ---------------------------------------------------------------------------------------------------------------------
# Summaries: per-round ratios and their spread

# Two-sided 95% quantiles of Student's t, by degrees of freedom (beyond the table, the normal 1.96 is close enough)
T95 = {
    1: 12.71,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    12: 2.179,
    15: 2.131,
    20: 2.086,
    30: 2.042,
}


def t95(df: int) -> float:
    return T95[max(k for k in T95 if k <= df)] if df >= 1 else math.inf


def spread(values: list[float]) -> dict:
    """Mean, median, sample std, min, max and the 95% confidence half-width of the mean (Student's t), and the rounds
    a half-width of RESOLUTION x mean would need at this std."""
    n = len(values)
    mean = statistics.fmean(values) if values else math.nan
    sd = statistics.stdev(values) if n > 1 else math.nan
    half = t95(n - 1) * sd / math.sqrt(n) if n > 1 else math.nan
    needed = None
    if n > 1 and mean:
        needed = 2
        while t95(needed - 1) * sd / math.sqrt(needed) > RESOLUTION * abs(mean):
            needed += 1
    return dict(
        n=n,
        mean=mean,
        median=statistics.median(values) if values else math.nan,
        sd=sd,
        min=min(values, default=math.nan),
        max=max(values, default=math.nan),
        ci95=half,
        rounds_for_3pct=needed,
    )


def _process_means(run: dict) -> dict:
    """One process's means over its timed cycles (milliseconds)."""
    timed = [c for c in run["cycles"] if not c["warmup"]]

    def ms(key):
        values = [c[key] for c in timed if c.get(key) is not None]
        return 1e3 * statistics.fmean(values) if values else None

    cpu = [c["user_s"] + c["sys_s"] for c in timed if "user_s" in c]
    return dict(
        cycle_ms=ms("total_s"),
        generate_ms=ms("generate_s"),
        generate_cpu_ms=ms("generate_cpu_s"),
        score_ms=ms("score_s"),
        train_ms=ms("train_s"),
        ref_forward_ms=ms("ref_forward_s"),
        peak_mib=run["peak_mib"],
        cycles=len(timed),
        cpu_ms=1e3 * statistics.fmean(cpu) if cpu else None,
        sys_ms=ms("sys_s"),
        faults=statistics.fmean(c["minflt"] for c in timed) if cpu else None,
    )


RATIOS = (("dgpo", "grpo_beta0.04"), ("dgpo", "grpo_beta0"), ("grpo_beta0.04", "grpo_beta0"))


def summarize(runs: list[dict]) -> dict:
    """Rows per (configuration, variant) and ratios per configuration, each ratio taken within a round."""
    by = {}
    for run in runs:
        by.setdefault(run["config"], {}).setdefault(run["variant"], {})[run["round"]] = run
    rows, ratios = [], []
    for config_key, variants in by.items():
        config = Config.parse(config_key)
        where = dict(config=config_key, path=config.path, zero_fraction=config.zero_fraction, head=config.head)
        means = {v: {r: _process_means(run) for r, run in rounds.items()} for v, rounds in variants.items()}
        for variant, rounds in variants.items():
            m = means[variant]

            def over_rounds(key):
                values = [x[key] for x in m.values() if x[key] is not None]
                return statistics.fmean(values) if values else None

            def mean_field(key):
                values = [run[key] for run in rounds.values() if run.get(key) is not None]
                return statistics.fmean(values) if values else None

            cycle = spread([x["cycle_ms"] for x in m.values()])
            rows.append(
                dict(
                    where,
                    variant=variant,
                    rounds=len(rounds),
                    cycles_per_round=statistics.fmean(x["cycles"] for x in m.values()),
                    cycle_ms=cycle["mean"],
                    cycle_sd_pct=100 * cycle["sd"] / cycle["mean"] if cycle["n"] > 1 else None,
                    generate_ms=over_rounds("generate_ms"),
                    score_ms=over_rounds("score_ms"),
                    train_ms=over_rounds("train_ms"),
                    ref_forward_ms=over_rounds("ref_forward_ms"),
                    generate_cpu_ms=over_rounds("generate_cpu_ms"),
                    cpu_ms=over_rounds("cpu_ms"),
                    sys_ms=over_rounds("sys_ms"),
                    faults=over_rounds("faults"),
                    peak_mib=over_rounds("peak_mib"),
                    peak_mib_max=max(x["peak_mib"] for x in m.values()),
                    frac_reward_zero_std=mean_field("frac_reward_zero_std"),
                    scored_fraction=mean_field("scored_fraction"),
                    completion_length=mean_field("completion_length"),
                    load_average=statistics.fmean(run["load_average_start"][0] for run in rounds.values()),
                    process_s=statistics.fmean(run["wall_s"] for run in rounds.values()),
                )
            )
        for a, b in RATIOS:
            if a not in means or b not in means:
                continue
            paired = sorted(set(means[a]) & set(means[b]))
            if not paired:
                continue
            entry = dict(where, ratio=f"{a} / {b}", rounds=paired)
            for key in ("cycle_ms", "score_ms", "train_ms", "generate_ms", "generate_cpu_ms", "cpu_ms", "peak_mib"):
                # Aligned, only GRPO(beta=0.04) has a scoring-stage pass (DGPO scores at loss time): no ratio there
                values = (
                    []
                    if key == "score_ms" and config.path == "aligned"
                    else [means[a][r][key] / means[b][r][key] for r in paired if means[a][r][key] and means[b][r][key]]
                )
                entry[key.removesuffix("_ms").removesuffix("_mib")] = spread(values) if values else None
            # Generation is the same work in every variant, so each process's cycle over its own generation time
            # cancels how fast that process's minutes of the machine happened to be (on a shared host, +-10% from one
            # process to the next); this ratio assumes only that the slowdown hits generation and the rest alike
            same_speed = [
                (means[a][r]["cycle_ms"] / means[a][r]["generate_ms"])
                / (means[b][r]["cycle_ms"] / means[b][r]["generate_ms"])
                for r in paired
                if means[a][r]["generate_ms"] and means[b][r]["generate_ms"]
            ]
            entry["cycle_same_speed"] = spread(same_speed) if same_speed else None
            ratios.append(entry)
        if "dgpo" in means and "grpo_beta0" in means:
            # What DGPO cannot avoid against a trainer without a reference: its own reference forwards
            paired = [
                r
                for r in sorted(set(means["dgpo"]) & set(means["grpo_beta0"]))
                if means["dgpo"][r]["ref_forward_ms"] is not None
            ]
            if paired:
                ratios.append(
                    dict(
                        where,
                        ratio="floor: 1 + dgpo ref_forward / grpo_beta0",
                        rounds=paired,
                        cycle=spread(
                            [
                                1 + means["dgpo"][r]["ref_forward_ms"] / means["grpo_beta0"][r]["cycle_ms"]
                                for r in paired
                            ]
                        ),
                    )
                )
    return dict(rows=rows, ratios=ratios, targets=targets(ratios))


def targets(ratios: list[dict]) -> list[dict]:
    """The targets of docs/performance.md, judged on the figures that carry to a GPU (TRL projecting completion
    positions only)."""
    found = {(r["config"], r["ratio"]): r for r in ratios}
    out = []

    def add(target: str, config: str, figure: dict, limit: float, same_speed: dict | None = None, **extra):
        same_speed = same_speed or {}
        out.append(
            dict(target=target, config=config, measured=figure.get("mean"), ci95=figure.get("ci95"), limit=limit)
            | extra
            | (dict(same_speed=same_speed.get("mean"), same_speed_ci95=same_speed.get("ci95")) if same_speed else {})
        )

    for (config, ratio), entry in found.items():
        c = Config.parse(config)
        if c.head != "completion":
            continue
        cycle, same = entry.get("cycle") or {}, entry.get("cycle_same_speed") or {}
        if ratio == "dgpo / grpo_beta0.04" and c.zero_fraction == 0:
            add(f"{c.path}, every completion scored: DGPO / GRPO(beta=0.04) <= 1.00", config, cycle, 1.00, same)
            add(f"{c.path}: peak memory DGPO / GRPO(beta=0.04) <= 1.02", config, entry.get("peak") or {}, 1.02)
        # Skipping the zero-advantage rows' training forward and backward makes DGPO cheaper than both baselines
        # (a fraction between the two is held to the lower one's limits)
        limits = (
            {"dgpo / grpo_beta0.04": 0.75, "dgpo / grpo_beta0": 0.85}
            if c.zero_fraction >= 0.6
            else {"dgpo / grpo_beta0.04": 0.85, "dgpo / grpo_beta0": 0.95}
            if c.zero_fraction >= 0.4
            else {}
        )
        if c.path == "aligned" and ratio in limits:
            baseline = ratio.split(" / ")[1].replace("grpo_beta", "GRPO(beta=") + ")"
            target = f"aligned, {c.zero_fraction:.0%} zero-advantage groups: DGPO / {baseline} <= {limits[ratio]:.2f}"
            add(target, config, cycle, limits[ratio], same)
        floor = found.get((config, "floor: 1 + dgpo ref_forward / grpo_beta0"))
        if ratio == "dgpo / grpo_beta0" and c.zero_fraction == 0 and floor:
            f = floor["cycle"]["mean"]
            add(f"{c.path}: DGPO / GRPO(beta=0) within 3% of its floor", config, cycle, 1.03 * f, same, floor=f)
    for t in out:
        t.update(judge(t["measured"], t["ci95"], t["limit"]))
        if t.get("same_speed") is not None:
            t["same_speed_verdict"] = judge(t["same_speed"], t["same_speed_ci95"], t["limit"])
    return out


def judge(mean, ci95, limit) -> dict:
    """`met`: the mean is within the limit; `resolved`: the whole 95% interval is on the same side of it (with one
    round there is no interval, so nothing is resolved)."""
    if mean is None or math.isnan(mean):
        return dict(met=False, resolved=False)
    half = ci95 if ci95 is not None and not math.isnan(ci95) else math.inf
    met = mean <= limit
    return dict(met=met, resolved=(mean + half <= limit) if met else (mean - half > limit))


def verdict(judged: dict, limit: float) -> str:
    if judged["resolved"]:
        return "yes" if judged["met"] else "no"
    side = "yes" if judged["met"] else "no"
    return f"{side} on the mean; not resolved (the 95% interval includes {limit:.3f})"


def _r(value):
    """A ratio: three decimals, so 1.004 does not print as 1."""
    return "" if value is None or math.isnan(value) else f"{value:.3f}"


def _f(value, digits=3):
    """`digits` significant digits; whole numbers from there up (thousands separated), never an exponent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if not isinstance(value, float):
        return str(value)
    if abs(value) >= 10 ** (digits - 1):
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def report(summary: dict) -> str:
    """Markdown tables of a summary (docs/performance.md's)."""
    lines = [
        "| config | variant | rounds | cycle ms (sd %) | generation ms | scoring stage ms | training steps ms | "
        "reference backbone ms | CPU ms (system) | minor faults | peak MiB | zero-adv. groups | scored | load |",
        "|" + " --- |" * 14,
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['config']} | {NAMES[r['variant']]} | {r['rounds']} | {_f(r['cycle_ms'], 4)} "
            f"({_f(r['cycle_sd_pct'], 2)}) | {_f(r['generate_ms'])} | {_f(r['score_ms'])} | "
            f"{_f(r['train_ms'])} | {_f(r['ref_forward_ms'])} | {_f(r.get('cpu_ms'), 4)} "
            f"({_f(r.get('sys_ms'))}) | {_f(r.get('faults'), 2)} | {_f(r['peak_mib'], 4)} | "
            f"{_f(r['frac_reward_zero_std'], 2)} | {_f(r['scored_fraction'], 2)} | {_f(r['load_average'], 2)} |"
        )
    lines += [
        "",
        "| config | ratio | rounds | cycle: mean +- 95% CI (median; min-max) | rounds for +-3% | cycle at "
        "the same generation speed +- 95% CI | scoring stage | training steps | generation | CPU time +- 95% "
        "CI | peak memory |",
        "|" + " --- |" * 11,
    ]
    for r in summary["ratios"]:
        c = r["cycle"]
        name = " ".join(NAMES.get(w, w) for w in r["ratio"].split(" "))

        def mean_of(key):
            return _r((r.get(key) or {}).get("mean"))

        cpu, same = r.get("cpu") or {}, r.get("cycle_same_speed") or {}
        lines.append(
            f"| {r['config']} | {name} | {c['n']} | {_r(c['mean'])} +- {_r(c['ci95'])} "
            f"({_r(c['median'])}; {_r(c['min'])}-{_r(c['max'])}) | {_f(c['rounds_for_3pct'])} | "
            f"{_r(same.get('mean'))} +- {_r(same.get('ci95'))} | "
            f"{mean_of('score')} | {mean_of('train')} | {mean_of('generate')} | {_r(cpu.get('mean'))} +- "
            f"{_r(cpu.get('ci95'))} | {mean_of('peak')} |"
        )
    by_key = {(r["path"], r["zero_fraction"], r["head"], r["ratio"]): r for r in summary["ratios"]}
    effect = []
    for (path, zero, head, ratio), r in by_key.items():
        other = by_key.get((path, zero, "all", ratio))
        if head == "completion" and other and not ratio.startswith("floor"):
            cpu = [_r((x.get("cpu") or {}).get("mean")) for x in (r, other)]
            effect.append(
                f"| {path}:{zero:g} | {' '.join(NAMES.get(w, w) for w in ratio.split(' '))} | "
                f"{_r(r['cycle']['mean'])} ({cpu[0]}) | {_r(other['cycle']['mean'])} ({cpu[1]}) |"
            )
    if effect:
        lines += [
            "",
            "CPU-only effect (TRL's fused head projecting every position on CPU); cycle-time ratio (CPU-time ratio):",
            "",
            "| path:zero | ratio | TRL projects completion positions (as on a GPU) | every position (TRL on CPU) |",
            "| --- | --- | --- | --- |",
            *effect,
        ]
    if summary.get("targets"):
        lines += [
            "",
            "| target | measured | met? | at the same generation speed | met? |",
            "| --- | --- | --- | --- | --- |",
        ]
        for t in summary["targets"]:
            floor = f" (floor {_r(t['floor'])})" if "floor" in t else ""
            same = (
                (
                    f"{_r(t['same_speed'])} +- {_r(t['same_speed_ci95'])} | "
                    f"{verdict(t['same_speed_verdict'], t['limit'])}"
                )
                if "same_speed_verdict" in t
                else " | "
            )
            lines.append(
                f"| {t['target']} | {_r(t['measured'])} +- {_r(t['ci95'])}{floor} | "
                f"{verdict(t, t['limit'])} | {same} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=[s for s in SHAPES if s != "qwen2.5-7b"], default="tiny")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=None,
        metavar="PATH:ZERO:HEAD",
        help="default: " + "; ".join(f"{d}: {' '.join(v['configs'])}" for d, v in DEFAULTS.items()),
    )
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=4, help="rounds of every (configuration, variant) process")
    parser.add_argument("--batch", type=int, default=8, help="completions per optimizer step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-completion-length", type=int, default=16)
    parser.add_argument(
        "--timed-cycles",
        type=json.loads,
        default=TIMED_CYCLES,
        help=f"timed generation cycles per process, by path (JSON; default {TIMED_CYCLES})",
    )
    parser.add_argument(
        "--warmup-cycles",
        type=json.loads,
        default=WARMUP_CYCLES,
        help=f"untimed cycles first, by path (JSON; default {WARMUP_CYCLES})",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per process (default: 2 for qwen2.5-0.5b on CPU, else 1: tiny models run "
        "~10x faster with 1 thread than with 2 on these 2-core machines)",
    )
    parser.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default="reuse",
        help="CPU memory allocator behaviour of the measuring processes (see ALLOCATORS; glibc: its "
        "defaults, with the page faults a GPU's caching allocator does not have)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no process that would, at the mean process time so far, end after this many "
        "seconds (the runs file keeps what finished; the same command resumes)",
    )
    parser.add_argument(
        "--max-load",
        type=float,
        default=None,
        help="wait before each process until the 1-minute load average is below this (shared machines; "
        "set it above the benchmark's own threads, whose load lingers in the average)",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None, help="default: bfloat16 on CUDA, float32 on CPU"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "dgpo_bench_models",
        help="where the built models are kept between runs",
    )
    parser.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    parser.add_argument("--stem", default=None, help="results file name (default steps_<shape>_<device>)")
    parser.add_argument(
        "--report", type=Path, default=None, metavar="RUNS_JSONL", help="print the tables of a runs file and exit"
    )
    return parser


def resolve(args) -> argparse.Namespace:
    """Fills the defaults that depend on the device and the shape."""
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    args.dtype = args.dtype or ("bfloat16" if kind == "cuda" else "float32")
    args.configs = args.configs or DEFAULTS[kind]["configs"]
    args.threads = args.threads or (2 if args.shape == "qwen2.5-0.5b" and kind == "cpu" else 1)
    args.stem = args.stem or f"steps_{args.shape}_{kind}" + ("" if args.allocator == "reuse" else f"_{args.allocator}")
    return args


def main():
    if sys.argv[1:2] == ["--child-build"]:
        build_model(Path(sys.argv[5]), sys.argv[2], sys.argv[3], sys.argv[4])
        return
    if sys.argv[1:2] == ["--child-measure"]:
        _die_with_parent()
        spec = json.loads(sys.argv[2])
        if spec["allocator"] == "reuse":
            set_malloc("reuse")  # before the model and the trainer allocate anything large
        result = measure(spec)
        Path(sys.argv[3]).write_text(json.dumps(result))
        return
    args = build_parser().parse_args()
    if args.report:
        print(report(summarize(read_runs(args.report))))
        return
    run_benchmark(resolve(args))


if __name__ == "__main__":
    main()
