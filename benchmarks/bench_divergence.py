"""Benchmark of DGPO's divergence pass: time and peak memory against the two-matmul floor and a naive full softmax.

For each (N tokens, V vocabulary, H hidden) it times, side by side in one process:
- floor:  the two bare LM-head projections the pass cannot avoid (policy and reference, 2 N H V FLOPs each), tiled as
          the pass tiles them, fp32 output (torch.mm with out_dtype=float32 on bf16 CUDA inputs, like TRL). Two tilings
          are timed (the torch path's token x vocabulary tiles, and TRL's larger 4096 x 32768 ones) and the faster
          one is the floor, so the ratio is never flattered by a slow floor;
- tiles:  `token_statistics(..., use_triton=False)`, the chunked torch path;
- fused:  `token_statistics(..., use_triton=True)`, the fused Triton kernel (CUDA with Triton only);
- trl_heads: TRL's fused log-prob head (`trl.kernels.ChunkedLogProbFunction`) on both models, the policy with its
          entropy: what TRL's scoring-time passes project for GRPO(beta=0.04) off-policy (old log-probs and reference
          log-probs), and what DGPO's pass replaces there. On the aligned path GRPO(beta=0.04) projects the
          reference only, about half of it;
- naive:  full-vocabulary fp32 logits and log-softmax of both models (what the tiles avoid), skipped where its
          logits would exceed --naive-max-gib.
Ratios are to the floor measured in the same run. Peak memory is the extra memory of one call beyond its inputs
(outputs included): torch.cuda.max_memory_allocated on a GPU; on CPU the process's peak RSS, reset before each call
(tracemalloc cannot see torch's allocations).

    python benchmarks/bench_divergence.py --quick     # CPU: (N, V, H) = (1024|2048, 32000, 896), (1024, 32000, 3584)
    python benchmarks/bench_divergence.py                  # CPU: adds N 512, and V 151936 at N 1024
    python benchmarks/bench_divergence.py --full           # GPU: N 512..16384, V {32000, 151936}, H {896, 3584}, bf16
    python benchmarks/bench_divergence.py --full --sweep-configs   # also time other tile shapes of the kernel
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    format_table,
    machine_info,
    median,
    peak_extra_memory,
    set_malloc,
    time_call,
    write_results,
)

from dgpo_trl.functional import (  # noqa: E402
    DEFAULT_CHUNK_SIZE,
    DEFAULT_TOKEN_CHUNK_SIZE,
    TokenStatistics,
    token_statistics,
)


def floor_pass(policy_hidden, policy_weight, ref_hidden, ref_weight, token_chunk, vocab_chunk):
    """The two LM-head projections alone, tile by tile into reused fp32 buffers (what every method must compute)."""
    n, vocab = policy_hidden.shape[0], policy_weight.shape[0]
    rows = min(token_chunk, n)
    device = policy_hidden.device
    buf_p = torch.empty(rows, min(vocab_chunk, vocab), device=device, dtype=torch.float32)
    buf_q = torch.empty_like(buf_p)
    half = device.type == "cuda" and policy_hidden.dtype in (torch.bfloat16, torch.float16)
    for t0 in range(0, n, token_chunk):
        t1 = min(t0 + token_chunk, n)
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(v0 + vocab_chunk, vocab)
            for hidden, weight, buf in ((policy_hidden, policy_weight, buf_p), (ref_hidden, ref_weight, buf_q)):
                out = buf[: t1 - t0, : v1 - v0]
                if half:
                    torch.mm(hidden[t0:t1], weight[v0:v1].t(), out_dtype=torch.float32, out=out)
                else:
                    torch.mm(hidden[t0:t1].float(), weight[v0:v1].float().t(), out=out)
    return buf_p, buf_q


def trl_heads(policy_hidden, policy_weight, ref_hidden, ref_weight, labels):
    """TRL's fused head over the same tokens for both models: policy log-probs and entropy, reference log-probs."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    common = (None, labels, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0)
    policy = ChunkedLogProbFunction.apply(policy_hidden, policy_weight, *common, ("log_probs", "entropy"))
    reference = ChunkedLogProbFunction.apply(ref_hidden, ref_weight, *common, ("log_probs",))
    return policy, reference


def naive_pass(policy_hidden, policy_weight, ref_hidden, ref_weight, labels):
    """Full-vocabulary fp32 logits of both models, then every statistic from full log-softmaxes."""

    def log_probs(hidden, weight):
        if hidden.device.type == "cuda" and hidden.dtype in (torch.bfloat16, torch.float16):
            z = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
        else:
            z = hidden.float() @ weight.float().t()
        return torch.log_softmax(z, dim=-1)

    log_p = log_probs(policy_hidden, policy_weight)
    log_q = log_probs(ref_hidden, ref_weight)
    p = log_p.exp()
    return TokenStatistics(
        policy_logps=log_p.gather(-1, labels[:, None]).squeeze(-1),
        ref_logps=log_q.gather(-1, labels[:, None]).squeeze(-1),
        hellinger=1.0 - torch.exp(0.5 * (log_p + log_q)).sum(-1),
        reverse_kl=(p * (log_p - log_q)).sum(-1),
        entropy=-(p * log_p).sum(-1),
    )


def make_inputs(n, vocab, hidden, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    # Logit std ~3 (a trained LM's spread); the reference is the policy plus a small perturbation, as in training
    policy_weight = randn(vocab, hidden, scale=3 / math.sqrt(hidden))
    ref_weight = (policy_weight.float() + randn(vocab, hidden, scale=0.3 / math.sqrt(hidden)).float()).to(dtype)
    policy_hidden = randn(n, hidden)
    ref_hidden = (policy_hidden.float() + randn(n, hidden, scale=0.1).float()).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=g).to(device)
    return policy_hidden, policy_weight, ref_hidden, ref_weight, labels


def methods_for(device, fused_available):
    names = ["floor_tiles", "floor_large", "tiles"]
    if fused_available:
        names.append("fused")
    names += ["trl_heads", "naive"]
    return names


def run_case(n, vocab, hidden, args, device, dtype, fused_available):
    h_p, w_p, h_q, w_q, labels = make_inputs(n, vocab, hidden, dtype, device)
    calls = {
        "floor_tiles": lambda: floor_pass(h_p, w_p, h_q, w_q, DEFAULT_TOKEN_CHUNK_SIZE, DEFAULT_CHUNK_SIZE),
        "floor_large": lambda: floor_pass(h_p, w_p, h_q, w_q, 4096, 32768),
        "tiles": lambda: token_statistics(h_p, w_p, h_q, w_q, labels, use_triton=False),
        "fused": lambda: token_statistics(h_p, w_p, h_q, w_q, labels, use_triton=True),
        "trl_heads": lambda: trl_heads(h_p, w_p, h_q, w_q, labels),
        "naive": lambda: naive_pass(h_p, w_p, h_q, w_q, labels),
    }
    names = methods_for(device, fused_available)
    naive_gib = 2 * n * vocab * 4 / 2**30  # the two fp32 logit matrices alone; log-softmax and products add more
    skipped = {}
    if naive_gib > args.naive_max_gib:
        skipped["naive"] = f"logits {naive_gib:.1f} GiB > --naive-max-gib"
    names = [m for m in names if m not in skipped]

    times = {m: [] for m in names}
    memory = {}
    # Warm-up (kernel compilation, allocator), then the methods interleaved round by round so drift hits all alike
    for m in list(names):
        try:
            time_call(calls[m], device)
        except torch.OutOfMemoryError:
            skipped[m] = "out of memory"
            names.remove(m)
            torch.cuda.empty_cache()
    for _ in range(args.repeats):
        for m in names:
            times[m].append(time_call(calls[m], device))
    for m in names:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        memory[m] = peak_extra_memory(calls[m], device)

    floor = min(median(times["floor_tiles"]), median(times["floor_large"]))
    rows = []
    for m in methods_for(device, fused_available):
        row = {"N": n, "V": vocab, "H": hidden, "dtype": str(dtype).removeprefix("torch."), "method": m}
        if m in skipped:
            row["note"] = skipped[m]
        else:
            t = median(times[m])
            row.update(
                time_ms=1e3 * t,
                time_min_ms=1e3 * min(times[m]),
                ratio_to_floor=t / floor,
                peak_extra_mib=memory[m] / 2**20,
                tflops=(2 * 2 * n * hidden * vocab) / t / 1e12,
            )
        rows.append(row)
    return rows


def sweep_configs(args, device, dtype):
    """Times several tile shapes of the fused kernel on two LM-sized cases; prints the best per case."""
    from dgpo_trl.kernels import divergence
    from dgpo_trl.kernels.divergence import KernelConfig

    configs = [
        KernelConfig(64, 128, 64, 8, 3),
        KernelConfig(128, 128, 64, 8, 3),
        KernelConfig(128, 128, 64, 8, 4),
        KernelConfig(64, 128, 64, 4, 3),
        KernelConfig(128, 64, 64, 4, 3),
        KernelConfig(64, 256, 64, 8, 3),
        KernelConfig(128, 256, 64, 8, 3),
        KernelConfig(128, 128, 128, 8, 2),
    ]
    rows = []
    for n, vocab, hidden in ((4096, 151936, 896), (4096, 151936, 3584)):
        h_p, w_p, h_q, w_q, labels = make_inputs(n, vocab, hidden, dtype, device)
        floor = min(
            median([time_call(lambda: floor_pass(h_p, w_p, h_q, w_q, 4096, 32768), device) for _ in range(4)]),
            median([time_call(lambda: floor_pass(h_p, w_p, h_q, w_q, 1024, 8192), device) for _ in range(4)]),
        )
        for config in configs:
            call = lambda: divergence.fused_token_statistics(h_p, w_p, h_q, w_q, labels, config=config)  # noqa: E731
            try:
                call()
                t = median([time_call(call, device) for _ in range(args.repeats)])
                rows.append(
                    dict(N=n, V=vocab, H=hidden, config=str(tuple(config)), time_ms=1e3 * t, ratio_to_floor=t / floor)
                )
            except Exception as error:  # a shape that does not fit the GPU's registers or shared memory
                rows.append(dict(N=n, V=vocab, H=hidden, config=str(tuple(config)), note=type(error).__name__))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="three CPU cases (~3-4 minutes on 2 cores)")
    parser.add_argument("--full", action="store_true", help="the full grid (meant for a GPU)")
    parser.add_argument("--n", type=int, nargs="+", help="token counts (overrides the preset)")
    parser.add_argument("--v", type=int, nargs="+", help="vocabulary sizes (overrides the preset)")
    parser.add_argument("--h", type=int, nargs="+", help="hidden sizes (overrides the preset)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per method (median reported)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--naive-max-gib", type=float, default=None, help="skip naive above this much logit memory")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--sweep-configs", action="store_true", help="also time other kernel tile shapes (GPU)")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results)")
    args = parser.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        set_malloc("reuse")  # timings without page faults (peak_extra_memory switches for its own calls)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.full:
        cases = list(itertools.product([512, 1024, 2048, 4096, 8192, 16384], [32000, 151936], [896, 3584]))
        repeats, naive_gib = 10, 24.0
    elif args.quick:
        # Two N above one token tile (1024) show the flat memory; one H = 3584 case shows the ratio falling with H
        cases = [(1024, 32000, 896), (2048, 32000, 896), (1024, 32000, 3584)]
        repeats, naive_gib = 3, 2.0
    else:
        # Reduced CPU grid (the full one would take hours on a few cores)
        cases = [(n, 32000, 896) for n in (512, 1024, 2048)] + [(1024, 151936, 896), (1024, 32000, 3584)]
        repeats, naive_gib = 3, 2.0
    if args.n or args.v or args.h:
        ns, vs, hs = zip(*cases)
        ns, vs, hs = args.n or sorted(set(ns)), args.v or sorted(set(vs)), args.h or sorted(set(hs))
        cases = list(itertools.product(ns, vs, hs))
    args.repeats = args.repeats or repeats
    args.naive_max_gib = args.naive_max_gib if args.naive_max_gib is not None else naive_gib

    from dgpo_trl.kernels import triton_available

    fused_available = device.type == "cuda" and triton_available()
    meta = machine_info(device) | {
        "argv": sys.argv,
        "dtype": str(dtype),
        "repeats": args.repeats,
        "fused_kernel": fused_available,
        "tiles": {"token_chunk": DEFAULT_TOKEN_CHUNK_SIZE, "vocab_chunk": DEFAULT_CHUNK_SIZE},
    }
    where = meta.get("gpu", meta["cpu"])
    print(f"# divergence pass on {where}, {dtype}, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for n, vocab, hidden in cases:
        case_rows = run_case(n, vocab, hidden, args, device, dtype, fused_available)
        rows += case_rows
        columns = ["N", "V", "H", "method", "time_ms", "ratio_to_floor", "peak_extra_mib", "note"]
        print(format_table(case_rows, columns), flush=True)
    stem = f"divergence_{device.type}" + ("_full" if args.full else "_quick" if args.quick else "")
    if args.sweep_configs and fused_available:
        sweep = sweep_configs(args, device, dtype)
        print(format_table(sweep, ["N", "V", "H", "config", "time_ms", "ratio_to_floor", "note"]))
        write_results(stem + "_sweep", sweep, meta, args.out)

    summary = []
    for m in methods_for(device, fused_available):
        for (vocab, hidden), group in itertools.groupby(
            sorted((r for r in rows if r["method"] == m and "time_ms" in r), key=lambda r: (r["V"], r["H"], r["N"])),
            key=lambda r: (r["V"], r["H"]),
        ):
            group = list(group)
            mem = [r["peak_extra_mib"] for r in group]
            summary.append(
                dict(
                    method=m,
                    V=vocab,
                    H=hidden,
                    ratio_min=min(r["ratio_to_floor"] for r in group),
                    ratio_max=max(r["ratio_to_floor"] for r in group),
                    # N-independence: the extra memory at the smallest and the largest N measured
                    N_range=f"{group[0]['N']}-{group[-1]['N']}",
                    mem_first_mib=mem[0],
                    mem_last_mib=mem[-1],
                )
            )
    print("\n# summary: time / floor over N, and extra memory at the smallest and largest N")
    columns = ["method", "V", "H", "N_range", "ratio_min", "ratio_max", "mem_first_mib", "mem_last_mib"]
    print(format_table(summary, columns))
    csv_path, json_path = write_results(stem, rows, meta | {"summary": summary}, args.out)
    print(f"\nwrote {csv_path} and {json_path}")


if __name__ == "__main__":
    main()
