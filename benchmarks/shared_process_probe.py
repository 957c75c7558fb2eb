"""Why identical work cost different amounts per variant in the old shared-process step benchmark: a probe.

Until issue 17, `bench_steps.py` trained every variant in one process, each trainer's `train()` in its own thread,
with a baton interleaving their optimizer steps. There GRPO(beta=0.04)'s identical work (its HF generation, its
training steps) measured 20-40% slower than the other variants'. This script runs that harness, taken from git at the
commit before its removal (`--commit`), with per-thread accounting added (`getrusage(RUSAGE_THREAD)`: user and system
CPU time, minor and major page faults, context switches) for every optimizer step and for each trainer's generation
and scoring stage. Identical work should cost the same CPU time in every thread; where it does not, the accounting
says which kind of time differs.

    python benchmarks/shared_process_probe.py --out /tmp/probe.json -- --paths offpolicy --rounds-offpolicy 3
    PROBE_ORDER=dgpo,grpo_beta0.04,grpo_beta0 python benchmarks/shared_process_probe.py ...    # another baton order
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=4611686018427387904 python benchmarks/shared_process_probe.py ...
Arguments after `--` go to the old harness. A variant name like `grpo_beta0_copy` (in PROBE_ORDER and --variants)
is a second GRPO(beta=0) trainer: identical work in two threads of one process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
HARNESS_COMMIT = "d408ee9"  # the last commit with the shared-process harness


def usage() -> dict:
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return dict(wall=time.perf_counter(), user=r.ru_utime, sys=r.ru_stime, minflt=r.ru_minflt, majflt=r.ru_majflt,
                nivcsw=r.ru_nivcsw, nvcsw=r.ru_nvcsw)


def delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commit", default=HARNESS_COMMIT)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("harness_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    old = Path(tempfile.mkdtemp(prefix="dgpo_old_harness_"))
    for name in ("bench_steps.py", "_common.py"):
        text = subprocess.run(["git", "show", f"{args.commit}:benchmarks/{name}"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        (old / name).write_text(text)
    sys.path.insert(0, str(old))
    import bench_steps as harness
    from transformers import TrainerCallback

    if os.environ.get("PROBE_ORDER"):  # the baton passes in the order of the harness's VARIANTS
        harness.VARIANTS = tuple(os.environ["PROBE_ORDER"].split(","))
    probe = {}
    timed = harness._timed

    def timed_with_usage(fn, record, keys, device):
        def wrapper(*a, **k):
            start = usage()
            try:
                return fn(*a, **k)
            finally:
                probe.setdefault(record["probe_name"], {}).setdefault(keys[0], []).append(delta(start, usage()))

        return timed(wrapper, record, keys, device)

    time_parts = harness.time_parts

    def time_parts_with_steps(trainer, record, device):
        name = record["probe_name"] = Path(trainer.args.output_dir).name

        class Steps(TrainerCallback):  # added before the baton's callback: its step ends before the baton passes
            def on_step_begin(self, *a, **k):
                self.start = usage()

            def on_step_end(self, args, state, control, **k):
                probe.setdefault(name, {}).setdefault("step", []).append(
                    dict(step=state.global_step, **delta(self.start, usage())))

        trainer.add_callback(Steps())
        return time_parts(trainer, record, device)

    harness._timed, harness.time_parts = timed_with_usage, time_parts_with_steps
    sys.argv = [sys.argv[0]] + [a for a in args.harness_args if a != "--"]
    start = time.time()
    rows, ratios, meta = harness.run(harness.build_parser().parse_args())
    env = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC", "PROBE", "OMP"))}
    args.out.write_text(json.dumps(dict(rows=rows, ratios=ratios, meta=meta, probe=probe, env=env,
                                        wall_s=time.time() - start), default=str, indent=1))
    print(summary(json.loads(args.out.read_text())))


def summary(result: dict) -> str:
    """Per trainer: wall and CPU time per generation, scoring stage and optimizer step, after the first (warm-up)
    generation cycle."""
    lines = [f"load {result['meta']['load_average_at_start']} -> {result['meta']['load_average_at_end']}, "
             f"env {result['env']}", "trainer part n wall_s user_s sys_s minor_faults"]
    cycle = {row["variant"]: row["steps_per_cycle"] for row in result["rows"]}
    for name, parts in result["probe"].items():
        for part, values in parts.items():
            values = [v for v in values if v["step"] > cycle[name]] if part == "step" else values[1:]
            if not values:
                continue
            mean = {k: sum(v[k] for v in values) / len(values) for k in ("wall", "user", "sys", "minflt")}
            lines.append(f"{name} {part} {len(values)} {mean['wall']:.2f} {mean['user']:.2f} {mean['sys']:.2f} "
                         f"{mean['minflt']:.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
