"""End-to-end optimizer-step benchmark: DGPO vs GRPO(beta=0.04) vs GRPO(beta=0), interleaved in one process.

Every variant is a real trainer (TRL's `GRPOTrainer` for the baselines, `DGPOTrainer` for DGPO) on the string-reversal
task, starting from the same SFT-warmed tiny Llama (so that groups mix right and wrong completions, as in real RL).
Each trainer's `train()` runs in its own thread, but a baton lets exactly one run at a time and passes it on after
every optimizer step, so the steps are interleaved A B C D A B C D ... and machine drift hits every variant alike.
A step's time runs from receiving the baton to the end of its optimizer step (generation, reward, scoring, forward,
backward, optimizer and the previous step's logging all included); the first steps are warm-up and not counted.

Variants (all with the same batch, generation length, learning rate and seed):
- grpo_beta0:    GRPOTrainer, beta = 0 (no reference model at all)
- grpo_beta0.04: GRPOTrainer, beta = 0.04 (a reference forward on every completion, at scoring time)
- dgpo:          DGPOTrainer, defaults (beta = 0, dgpo_skip_zero_advantage=True: reference forward and divergence
                 pass only on completions whose sequence advantage is nonzero)
- dgpo_noskip:   DGPOTrainer with dgpo_skip_zero_advantage=False (scores every completion, like GRPO(beta>0) does)

Peak memory: each trainer's first optimizer step, which sees the same batch in every variant (same weights, and the
RNG is reseeded before each trainer's first generation; the table's `mem_step_tokens` shows it), measured as the
trainer's resident tensors (policy, reference, optimizer state) plus the step's transient peak:
torch.cuda.max_memory_allocated on a GPU; on CPU the peak of live tensor bytes, counted by a TorchDispatchMode that
sees every allocation and (through weakrefs) every free.
The scoring share of DGPO's steps (its reference forwards and divergence passes) is timed separately, to show the
skip's saving against the fraction of completions scored.

    OMP_NUM_THREADS=1 python benchmarks/bench_steps.py --quick         # tiny model, 15 rounds, ~1 minute
    OMP_NUM_THREADS=1 python benchmarks/bench_steps.py                 # tiny and small models, 40 rounds
    python benchmarks/bench_steps.py --device cuda                     # on a GPU
One torch thread per process on CPU: tiny models run ~10x faster here with 1 thread than with 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import weakref
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


MODELS = {
    # name: (hidden, layers, heads, SFT warm-up steps); warm-up to ~0.2-0.35 sampled accuracy (informative groups)
    "tiny": (128, 2, 4, 80),
    "small": (256, 4, 4, 80),
}
VARIANTS = ("grpo_beta0", "grpo_beta0.04", "dgpo", "dgpo_noskip")


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


def make_callback(name, trainer_ref, baton, record, device, warmup_steps, memory_step=1):
    from transformers import TrainerCallback

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    class Interleave(TrainerCallback):
        def __init__(self):
            self.start = None
            self.mode = None

        def _begin(self, step):
            # This trainer holds the baton from here until its next optimizer step ends
            if step == memory_step:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    record["cuda_before"] = torch.cuda.memory_allocated(device)
                else:
                    self.mode = LiveTensorBytes()
                    self.mode.__enter__()
            if step == 1:
                # Same generation RNG for every variant's first step (the others' steps consumed the shared RNG)
                from transformers import set_seed

                set_seed(0)
            record["scoring_s"] = 0.0
            record["divergence_s"] = 0.0
            sync()
            self.start = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self._begin(1)

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            elapsed = time.perf_counter() - self.start
            step = state.global_step
            if step == memory_step:
                if device.type == "cuda":
                    record["transient_bytes"] = torch.cuda.max_memory_allocated(device) - record["cuda_before"]
                else:
                    self.mode.__exit__(None, None, None)
                    record["transient_bytes"] = self.mode.peak
                record["resident_bytes"] = resident_bytes(trainer_ref())
            if step > warmup_steps:
                record["step_s"].append(elapsed)
                record["scoring_step_s"].append(record["scoring_s"])
                record["divergence_step_s"].append(record["divergence_s"])
            baton.pass_on(name)
            baton.wait(name)
            self._begin(step + 1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.global_step == memory_step:
                record["mem_step_tokens"] = logs.get("num_tokens")
            if logs and state.global_step > warmup_steps:
                record["logs"].append(dict(logs))

        def on_train_end(self, args, state, control, **kwargs):
            baton.pass_on(name, finished=True)

    return Interleave()


def time_scoring(trainer, record, device):
    """Wraps DGPO's reference forward and divergence pass (instance attributes only) to time its scoring work."""

    def timed(fn, key="scoring_s"):
        def wrapper(*args, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                record[key] += time.perf_counter() - start

        return wrapper

    # The reference forward's name changed once already; time whichever this trainer has
    forwards = [name for name in ("_reference_hidden", "_backbone_hidden") if hasattr(trainer, name)]
    if not forwards:
        raise AttributeError("DGPOTrainer has no reference-forward method to time (_reference_hidden)")
    setattr(trainer, forwards[0], timed(getattr(trainer, forwards[0])))
    trainer._divergence_pass = timed(timed(trainer._divergence_pass), key="divergence_s")


def prepare_model(name, cache_dir: Path) -> str:
    from dgpo_trl.tiny import build_tiny_model, reversal_dataset, supervised_warmup

    hidden, layers, heads, warmup = MODELS[name]
    path = cache_dir / f"{name}_h{hidden}_l{layers}_sft{warmup}"
    if not (path / "config.json").exists():
        start = time.perf_counter()
        build_tiny_model(path, hidden_size=hidden, num_layers=layers, num_heads=heads, seed=0)
        supervised_warmup(path, reversal_dataset(2000, seed=1), steps=warmup, batch_size=128)
        print(f"# built and warmed {name} ({hidden}/{layers}) in {time.perf_counter() - start:.0f}s", flush=True)
    return str(path)


def run_model(model_name, args, device, cache_dir):
    from transformers import PreTrainedTokenizerFast, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from dgpo_trl import DGPOConfig, DGPOTrainer
    from dgpo_trl.tiny import exact_match_reward, reversal_dataset

    path = prepare_model(model_name, cache_dir)
    dataset = reversal_dataset(4096, seed=2)
    warmup_steps = max(args.warmup, 1)  # step 1 is the memory step, never timed
    common = dict(
        per_device_train_batch_size=args.batch,
        num_generations=args.generations,
        max_completion_length=8,
        learning_rate=1e-4,
        max_steps=warmup_steps + args.rounds,
        logging_steps=1,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
    )
    variants = [v for v in VARIANTS if v in args.variants]
    records = {
        v: {"step_s": [], "scoring_step_s": [], "divergence_step_s": [], "logs": [], "scoring_s": 0.0}
        for v in variants
    }
    baton = Baton(variants)
    trainers = {}
    with tempfile.TemporaryDirectory() as out:
        for v in variants:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
            kw = dict(output_dir=f"{out}/{v}", **common)
            if v.startswith("grpo"):
                beta = 0.04 if v == "grpo_beta0.04" else 0.0
                trainer = GRPOTrainer(path, exact_match_reward, args=GRPOConfig(beta=beta, **kw),
                                      train_dataset=dataset, processing_class=tokenizer)
            else:
                config = DGPOConfig(dgpo_skip_zero_advantage=v == "dgpo", **kw)
                trainer = DGPOTrainer(path, exact_match_reward, args=config, train_dataset=dataset,
                                      processing_class=tokenizer)
                time_scoring(trainer, records[v], device)
            trainer.add_callback(
                make_callback(v, weakref.ref(trainer), baton, records[v], device, warmup_steps)
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
        if errors:
            raise RuntimeError(f"trainers failed: {errors}") from next(iter(errors.values()))

    rows = []
    for v in variants:
        r = records[v]
        logs = r["logs"]

        def mean_log(key):
            values = [log[key] for log in logs if key in log]
            return sum(values) / len(values) if values else None

        rows.append(
            dict(
                model=model_name,
                variant=v,
                steps=len(r["step_s"]),
                step_ms=1e3 * median(r["step_s"]),
                step_min_ms=1e3 * min(r["step_s"]),
                scoring_ms=1e3 * median(r["scoring_step_s"]) if v.startswith("dgpo") else None,
                divergence_ms=1e3 * median(r["divergence_step_s"]) if v.startswith("dgpo") else None,
                peak_mib=(r["resident_bytes"] + r["transient_bytes"]) / 2**20,
                resident_mib=r["resident_bytes"] / 2**20,
                transient_mib=r["transient_bytes"] / 2**20,
                mem_step_tokens=r.get("mem_step_tokens"),
                reward=mean_log("reward"),
                frac_reward_zero_std=mean_log("frac_reward_zero_std"),
                scored_fraction=mean_log("dgpo/scored_fraction"),
            )
        )
    by = {row["variant"]: row for row in rows}
    ratios = []

    def ratio(a, b):
        if a in by and b in by:
            ratios.append(
                dict(
                    model=model_name,
                    ratio=f"{a} / {b}",
                    step_time=by[a]["step_ms"] / by[b]["step_ms"],
                    # Ratio of the fastest steps: less sensitive to bursts of load from other processes
                    step_time_min=by[a]["step_min_ms"] / by[b]["step_min_ms"],
                    peak_memory=by[a]["peak_mib"] / by[b]["peak_mib"],
                )
            )

    ratio("dgpo", "grpo_beta0.04")
    ratio("dgpo_noskip", "grpo_beta0.04")
    ratio("dgpo", "grpo_beta0")
    ratio("grpo_beta0.04", "grpo_beta0")
    ratio("dgpo", "dgpo_noskip")
    if "dgpo" in by and "dgpo_noskip" in by:
        ratios.append(
            dict(
                model=model_name,
                ratio="scoring time dgpo / dgpo_noskip",
                step_time=by["dgpo"]["scoring_ms"] / by["dgpo_noskip"]["scoring_ms"],
                scored_fraction=by["dgpo"]["scored_fraction"],
            )
        )
    return rows, ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model only, fewer rounds (~2 minutes)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    parser.add_argument("--batch", type=int, default=64, help="completions per optimizer step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for tiny models on CPU)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "dgpo_bench_models",
                        help="where the warmed-up models are kept between runs")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    models = args.models or (["tiny"] if args.quick else ["tiny", "small"])
    args.rounds = args.rounds or (15 if args.quick else 40)
    args.cache.mkdir(parents=True, exist_ok=True)

    meta = machine_info(device) | {"argv": sys.argv, "rounds": args.rounds, "warmup": args.warmup,
                                   "batch": args.batch, "generations": args.generations, "models": MODELS}
    print(f"# optimizer steps on {meta.get('gpu', meta['cpu'])}, {args.threads} torch thread(s), "
          f"{args.rounds} timed rounds of {len(args.variants)} interleaved variants", flush=True)
    rows, ratios = [], []
    for name in models:
        model_rows, model_ratios = run_model(name, args, device, args.cache)
        rows += model_rows
        ratios += model_ratios
        columns = ["model", "variant", "steps", "step_ms", "scoring_ms", "divergence_ms", "peak_mib", "transient_mib",
                   "mem_step_tokens", "reward", "frac_reward_zero_std", "scored_fraction"]
        print(format_table(model_rows, columns))
        print(format_table(model_ratios, ["model", "ratio", "step_time", "step_time_min", "peak_memory",
                                          "scored_fraction"]), flush=True)
    stem = f"steps_{device.type}" + ("_quick" if args.quick else "")
    csv_path, json_path = write_results(stem, rows, meta | {"ratios": ratios}, args.out)
    print(f"\nwrote {csv_path} and {json_path}")


if __name__ == "__main__":
    main()
