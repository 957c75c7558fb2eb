"""Multi-process DGPO on CPU: DDP, DeepSpeed ZeRO-2 and ZeRO-3, FSDP2, on 2 gloo ranks; bf16; two nodes; the configs.

Each backend is launched once per module with `accelerate launch` on `tests/distributed/dgpo_worker.py`, which runs a
few short trainings in the same pair of processes and dumps what they did (see its docstring): DDP, ZeRO-3 and FSDP2
run LoRA, a full model with loss-time statistics, and a full model with scoring-time statistics; ZeRO-2 the full
model; ZeRO-3 and FSDP2 a model changed in memory too, and runs on TRL's GPU LM-head path ("_compact"); FSDP2 also
generation through a stand-in vLLM server, TRL's own GRPOTrainer (the control), and a checkpoint-and-resume pair.
ZeRO-3 and FSDP2 are launched once more with bf16 mixed precision, as the GPU configs set it. FSDP2 runs on CPU through
accelerate's own FSDP plugin (`accelerate_configs/cpu_fsdp2.yaml`) with dgpo-trl's opt-in workaround for a CPU-only
accelerate defect (`DGPO_PATCH_ACCELERATE_CPU_FSDP=1`, `dgpo_trl/accelerate_cpu_fsdp.py`; without it the launch is
refused on every rank). The tests check the dumps from this process:

- the launch really had 2 ranks on the intended backend;
- after training the parameters are identical on both ranks and differ from the initial model;
- DGPO's metrics are in the log history;
- every token weight a rank used equals the weight recomputed here from scratch: a plain Hugging Face forward of
  pi_theta (the policy's parameters at that step, gathered by the worker) and of pi_ref (the initial model, loaded
  from disk), full-vocabulary float64 softmax, then `dgpo_trl.functional.token_weights`; at scoring time TRL's old
  log-probs too;
- a rank whose completions all have zero advantage at one step (nothing to score) neither deadlocks nor desynchronises
  the collectives (ZeRO-3, FSDP2: the same reference forwards and LM-head gathers per step on both ranks);
- adaptive tau (`dgpo_target_ess`) is the same on both ranks and reaches the target over both ranks' completions;
- the scoring-time path runs one policy and one reference forward per row chunk;
- LoRA: no reference model is loaded; the reference is the adapter-disabled base;
- the frozen reference is sharded (each rank holds about half of it) under ZeRO-3 and FSDP2;
- FSDP2: scoring right after an optimizer step works; GRPOTrainer trains; a resumed run reproduces the later steps;
- DDP, ZeRO-2, ZeRO-3 and FSDP2 compute the same weights and the same training updates from the same seeds;
- two single-process nodes (ZeRO-3, FSDP2) train exactly like one node with two ranks;
- other architectures (`ARCHITECTURE_LAUNCHES`: the tied-embedding Qwen2 under ZeRO-3, one more launch of ~50 s) pass
  the same weight recomputation, on their own tiny model;
- on TRL's GPU LM-head path the runs train bit for bit as on the every-position path;
- in bf16 (ZeRO-3, FSDP2): both trainers train, step-1 divergence is 0, weights match float64 within a bf16 tolerance;
- the first micro-step after a generation has TRL's PPO ratio exactly 1 (DGPO, and GRPOTrainer as the control).

Launches take their rendezvous ports outside the kernel's ephemeral range, under a lock file, write their output to
files, and get time limits that scale with the machine's load (docs/distributed.md, "Launches under load").

Cost: one launch per backend (~15-50 s each on 2 shared cores), plus DeepSpeed's one-time JIT compile of
`deepspeed_shm_comm` (~90-120 s cold), cached in $TORCH_EXTENSIONS_DIR (`make test` sets it to
.cache/torch_extensions; the launches here default to the same place), so a test run pays it at most once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed" / "dgpo_worker.py"
CONFIGS = ROOT / "accelerate_configs"
sys.path.insert(0, str(WORKER.parent))
from dgpo_worker import LORA, RESUME_FROM, RUN_SETTINGS, SETTINGS  # noqa: E402

slow = pytest.mark.slow  # every test that launches ranks

STEPS = 3
STARVE_RANK, STARVE_STEP = 1, 1
# Launch budget on an idle machine, scaled by the load when the launch starts (`_load_factor`): a ZeRO launch pays
# DeepSpeed's JIT compile (~90 s) when the cache is cold. A deadlock hangs until this limit, then the test fails;
# nothing normal comes close to it (the longest launch, cold compile and two busy loops on 2 cores: ~100 s).
LAUNCH_TIMEOUT = 480
# How long a rank may wait in one collective before it raises (a deadlock), on an idle machine; scaled the same way
DDP_TIMEOUT = 180
# float32 (trainer, tiled online log-sum-exp, batch-dependent matmuls) against float64 (here); amplified by 1/tau
WEIGHT_ATOL = 1e-3
LOGP_ATOL = 1e-4
# bf16 launches (the ranks compute in bf16) against the same float64 recomputation (pi_theta: the parameters the run
# held, bf16 values under DeepSpeed; pi_ref: the checkpoint): measured up to 1.5e-2 on the weights (loss time; 9.0e-3
# at scoring time) and 3.9e-3 on the old log-probs (docs/distributed.md). The tolerances leave ~2x for other seeds and
# cores, and stay far below what a wrong reference, step or row makes (weight errors ~1 with these weights' std ~0.27)
BF16_WEIGHT_ATOL = 3e-2
BF16_LOGP_ATOL = 1e-2


def _cases(cases: list[tuple[str, str]]) -> list:
    """`cases` as pytest params with ids "<launch>-<run>"."""
    return [pytest.param(name, run, id=f"{name}-{run}") for name, run in cases]


# The shipped opt-in (dgpo_trl.accelerate_cpu_fsdp) that lets accelerate's FSDP plugin run on CPU ranks
CPU_FSDP_OPT_IN = {"DGPO_PATCH_ACCELERATE_CPU_FSDP": "1"}

# name -> (config, runs, extra environment); a run "<run>_compact" is <run> on TRL's GPU LM-head path (the worker)
LAUNCHES = {
    "ddp": ("cpu_ddp.yaml", "lora,full,scoring,full_every_row", {"ACCELERATE_USE_CPU": "true"}),
    "zero2": ("cpu_zero2.yaml", "full", {}),
    # TRL's GPU LM-head path, full and LoRA (loss time: the scoring-time pass is DGPO's own, TRL's head path only
    # changes the training forward, which these cover): both under ZeRO-3, the full model under FSDP2
    # "_every_row": the same run without skipping the zero-advantage rows' training (its update must be the same)
    "zero3": (
        "cpu_zero3.yaml",
        "lora,full,scoring,in_memory,lora_compact,full_compact,full_every_row,scoring_every_row",
        {},
    ),
    "fsdp2": (
        "cpu_fsdp2.yaml",
        "lora,full,scoring,in_memory,server,grpo,checkpointed,resumed,full_compact,full_every_row,scoring_every_row",
        CPU_FSDP_OPT_IN,
    ),
}
COMPACT, EVERY_ROW = "_compact", "_every_row"
# The same CPU configs with bf16 mixed precision, as the GPU configs (zero3.yaml, fsdp2.yaml) set it: DGPO at loss
# and scoring time, and TRL's GRPOTrainer: name -> (fp32 launch it extends, runs)
BF16_LAUNCHES = {"zero3_bf16": ("zero3", "full,scoring,grpo"), "fsdp2_bf16": ("fsdp2", "full,scoring,grpo")}
# Two single-process "nodes" on this host (`num_machines: 2`, static rendezvous on 127.0.0.1), launched with the
# commands docs/distributed.md gives (`_two_node_commands` reads them from there); each must train exactly like the
# same backend's 1 node x 2 ranks launch: name -> (one-node launch it must match, runs)
NODE_LAUNCHES = {"zero3_nodes": ("zero3", "full,scoring"), "fsdp2_nodes": ("fsdp2", "full,scoring")}
# Other architectures (`dgpo_trl.tiny.ARCHITECTURES`), each launched once on its own tiny model and checked by
# `test_architecture_on_two_ranks`: name -> (architecture, config, runs, extra environment)
ARCHITECTURE_LAUNCHES = {
    # Tied embeddings under ZeRO-3: the LM head DGPO gathers for its divergence pass is the partitioned input embedding
    "zero3_qwen2": ("qwen2", "cpu_zero3.yaml", "full,scoring", {}),
}
SHARDED = ("zero3", "fsdp2")  # backends whose forwards are collectives


def _base(run: str) -> str:
    return run.removesuffix(COMPACT).removesuffix(EVERY_ROW)


def _load_factor() -> float:
    """How much slower than idle this machine runs now (1-minute load average per core, at least 1)."""
    return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


def _port_candidates() -> list[int]:
    """Ports the kernel never hands out by itself: below and above its ephemeral range. A port in that range, found
    free and closed, can be given to any socket on the host (an outgoing connection, a `bind(0)`) before the launcher
    binds it, and the launch then fails with EADDRINUSE."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return [*range(max(low - 12000, 10000), low), *range(high + 1, 65536)]


@contextlib.contextmanager
def _reserved_ports(count: int):
    """`count` free ports for the rendezvous of the launches inside the block: outside the ephemeral range, bindable
    now, and each held under an exclusive lock file so that no other test process of this suite (another session on
    the same host) takes it before the block ends."""
    locks = Path(tempfile.gettempdir()) / "dgpo-trl-test-ports"
    locks.mkdir(exist_ok=True)
    held, ports = [], []
    try:
        for port in random.sample(_port_candidates(), 500):
            if len(ports) == count:
                break
            lock = open(locks / f"{port}.lock", "w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                with socket.socket() as probe:  # as the rendezvous store binds it (TIME_WAIT does not count)
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(("", port))
            except OSError:
                lock.close()
                continue
            held.append(lock)
            ports.append(port)
        assert len(ports) == count, "no free port outside the ephemeral range"
        yield ports
    finally:
        for lock in held:
            lock.close()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from dgpo_trl.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("dist") / "tiny", hidden_size=64, num_layers=2, num_heads=4)


def _launch_environment(extra_env: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    for key, value in extra_env.items():
        env[key] = os.pathsep.join([value, env[key]]) if key == "PYTHONPATH" and env.get(key) else value
    return env


def _two_node_commands(config: str, port: int) -> list[list[str]]:
    """The two `accelerate launch` commands of docs/distributed.md's two-node check, one per machine rank, with its
    placeholders filled in (the backend's CPU config, a free port)."""
    text = (ROOT / "docs" / "distributed.md").read_text()
    block = text.split("<!-- two-node check: tests/test_distributed.py runs this block -->", 1)[1]
    block = block.split("```bash", 1)[1].split("```", 1)[0]
    command = " ".join(line.rstrip("\\").strip() for line in block.splitlines() if not line.lstrip().startswith("#"))
    command = command.split("accelerate launch", 1)[1].split(" &", 1)[0]
    commands = []
    for rank in (0, 1):
        filled = command.replace("<cpu config>", config).replace("<port>", str(port)).replace("<rank>", str(rank))
        assert "<" not in filled.split("--model")[0], filled  # every placeholder before the worker's own is known
        commands.append(filled.split())
    return commands


def _run_process_groups(commands: list[list[str]], env: dict, name: str, logs: Path) -> list[tuple[int, str]]:
    """Runs the commands side by side (the nodes of one launch), each in a process group of its own, and returns each
    one's (return code, output). The output goes to files under `logs`, not pipes: a pipe read only after an earlier
    command ended would block a later one that filled it, and the nodes would wait on each other. Whatever happens (a
    deadlock hits the launch timeout, a test is interrupted), every group still running at the end is killed by its
    id, ranks included."""
    logs.mkdir(parents=True, exist_ok=True)
    timeout = LAUNCH_TIMEOUT * _load_factor()
    procs, files = [], []
    try:
        for index, command in enumerate(commands):
            files.append(open(logs / f"launch{index}.log", "ab"))
            procs.append(
                subprocess.Popen(
                    command, cwd=ROOT, env=env, stdout=files[-1], stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name}: launch did not finish in {timeout:.0f} s (deadlock?)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for file in files:
            file.close()
    return [
        (proc.returncode, (logs / f"launch{index}.log").read_text(errors="replace"))
        for index, proc in enumerate(procs)
    ]


def _launch(name: str, model: str, out: Path) -> dict:
    extra_args = []
    if name in NODE_LAUNCHES:
        backend, runs = NODE_LAUNCHES[name]
        config, _, extra_env = LAUNCHES[backend]

        def commands(port):
            return [
                launch[: launch.index("tests/distributed/dgpo_worker.py")]
                for launch in _two_node_commands(f"accelerate_configs/{config}", port)
            ]

    else:
        if name in BF16_LAUNCHES:
            fp32_launch, runs = BF16_LAUNCHES[name]
            config, _, extra_env = LAUNCHES[fp32_launch]
            extra_args = ["--mixed_precision", "bf16"]
        else:
            config, runs, extra_env = LAUNCHES[name] if name in LAUNCHES else ARCHITECTURE_LAUNCHES[name][1:]

        def commands(port):
            return [["--config_file", str(CONFIGS / config), *extra_args, "--main_process_port", str(port)]]

    worker_args = [
        str(WORKER), "--model", model, "--out", str(out), "--runs", runs, "--steps", str(STEPS),
        "--starve-rank", str(STARVE_RANK), "--starve-step", str(STARVE_STEP),
        "--ddp-timeout", str(round(DDP_TIMEOUT * _load_factor())),
    ]  # fmt: skip
    if name in ARCHITECTURE_LAUNCHES:
        worker_args.append("--char-tokenizer")  # the saved char tokenizer (AutoProcessor picks Qwen2Tokenizer)
    start = time.perf_counter()
    with _reserved_ports(1) as (port,):
        outcomes = _run_process_groups(
            [
                [sys.executable, "-m", "accelerate.commands.launch", *launch_args, *worker_args]
                for launch_args in commands(port)
            ],
            _launch_environment(extra_env),
            name,
            out / "logs",
        )
    wall = time.perf_counter() - start
    for returncode, log in outcomes:
        assert returncode == 0, f"{name}: launch failed with {returncode}\n{log[-8000:]}"
    results = {
        run: [torch.load(out / f"{run}_rank{rank}.pt", weights_only=False) for rank in (0, 1)]
        for run in runs.split(",")
    }
    summary = {
        "launch": name,
        "wall_seconds": round(wall, 1),
        "max_rss_mb_per_rank": [round(max(r[rank]["max_rss_mb"] for r in results.values())) for rank in (0, 1)],
        "train_seconds": {run: round(r[0]["train_seconds"], 2) for run, r in results.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary))
    print(f"\n[distributed] {json.dumps(summary)}")
    return results


_launched: dict[str, dict] = {}


@pytest.fixture(scope="module")
def launched(tiny_model, tmp_path_factory):
    """`launched(backend)` -> {run: [rank0 result, rank1 result]}; each backend launched at most once per module."""

    def get(name: str) -> dict:
        if name not in _launched:
            try:
                _launched[name] = _launch(name, tiny_model, tmp_path_factory.mktemp(name))
            except BaseException as error:  # a failed launch fails every test that needs it, without relaunching
                _launched[name] = error
                raise
        if isinstance(_launched[name], BaseException):
            pytest.fail(f"the {name} launch failed (see the first test that used it): {_launched[name]}"[:2000])
        return _launched[name]

    yield get
    _launched.clear()


# The runs of a model loaded from the checkpoint the tests recompute against ("in_memory" has its own test)
# (the others: "in_memory" and "grpo" have their own tests, "resumed" is compared with "checkpointed")
RUNS = [
    (backend, run)
    for backend, (_, runs, _) in LAUNCHES.items()
    for run in runs.split(",")
    if run not in ("in_memory", "grpo", "resumed")
]  # on TRL's GPU LM-head path too (the "_compact" runs): the same checks hold there
RUN_IDS = [f"{backend}-{run}" for backend, run in RUNS]


# ----------------------------------------------------------------------------------------------------------------
# Single-process recomputation


def _policy_at(model_dir: str, state: dict[str, torch.Tensor], peft: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if peft:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
    names = {name for name, _ in model.named_parameters()}
    assert names == set(state), sorted(names ^ set(state))[:10]
    model.load_state_dict(state, strict=False)
    return model.eval()


@torch.no_grad()
def _naive_statistics(policy, reference, record, temperature):
    """Full-vocabulary float64 statistics of the recorded completions: squared Hellinger, entropy, label log-probs."""
    ids = torch.cat([record["prompt_ids"], record["completion_ids"]], dim=1)
    attention = torch.cat([record["prompt_mask"], record["completion_mask"]], dim=1)
    width = record["completion_ids"].size(1)

    def log_probs(model):
        logits = model(input_ids=ids, attention_mask=attention).logits[:, -width - 1 : -1]
        return torch.log_softmax(logits.double() / temperature, dim=-1)

    log_p, log_q = log_probs(policy), log_probs(reference)
    hellinger = 1.0 - torch.exp(0.5 * (log_p + log_q)).sum(-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    label_logps = log_p.gather(-1, record["completion_ids"].unsqueeze(-1)).squeeze(-1)
    return hellinger, entropy, label_logps


def _check_weights(model_dir, result_pair, peft, reference_state=None, weight_atol=WEIGHT_ATOL, logp_atol=LOGP_ATOL):
    """Recomputes every recorded weight (both ranks) and returns (#tokens compared, their weights' std).

    pi_ref is the checkpoint in `model_dir`, or that architecture with `reference_state`'s parameters; pi_theta the
    parameters the run held at that step (bf16 values under DeepSpeed's bf16), both computed in float64. At scoring
    time TRL's old log-probs are checked against float64 too, and must be those TRL's own fused head computes, to the
    bit."""
    from transformers import AutoModelForCausalLM

    from dgpo_trl.functional import token_weights

    settings = result_pair[0]["settings"]
    states = result_pair[0]["states"]
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if reference_state is not None:
        reference = _policy_at(model_dir, reference_state, peft=False)
    vocab = reference.config.vocab_size
    policies = {}
    compared, all_weights, errors = 0, [], {"weights": 0.0, "old log-probs": 0.0, "old log-probs vs TRL's": 0.0}
    for result in result_pair:
        for record in result["records"]:
            if len(record["rows"]) == 0:
                continue
            step = record["step"]
            if step not in policies:
                policies[step] = _policy_at(model_dir, {name: p.float() for name, p in states[step].items()}, peft)
            d, h, label_logps = _naive_statistics(policies[step], reference, record, settings["temperature"])
            mask = record["completion_mask"].bool()
            expected = token_weights(
                d.float(), h.float(), mask, tau=record["tau"], kappa=settings["dgpo_kappa"], vocab_size=vocab
            )
            where = f"rank {result['rank']} step {step} ({record['path']})"
            torch.testing.assert_close(
                record["weights"], expected, atol=weight_atol, rtol=0, msg=lambda m: f"{where}: {m}"
            )
            # The advantages TRL's loss receives are A_i * w_t
            token_advantages = record["advantages"][record["rows"]].unsqueeze(1) * expected
            torch.testing.assert_close(record["token_advantages"], token_advantages, atol=5 * weight_atol, rtol=0)
            if "old_per_token_logps" in record:
                # Scoring time: TRL's old log-probs came out of the joint pass that also gave the statistics
                torch.testing.assert_close(
                    record["old_per_token_logps"][mask], label_logps[mask].float(), atol=logp_atol, rtol=0,
                    msg=lambda m: f"{where} old log-probs: {m}",
                )  # fmt: skip
                # ... and they are TRL's own, which its fused LM head computes (same parameters, any dtype)
                trl_logps = record["trl_old_per_token_logps"][mask]
                assert torch.equal(record["old_per_token_logps"][mask], trl_logps), f"{where}: old log-probs vs TRL's"
                error = (record["old_per_token_logps"][mask] - label_logps[mask]).abs().max().item()
                errors["old log-probs"] = max(errors["old log-probs"], error)
                error = (record["old_per_token_logps"][mask] - record["trl_old_per_token_logps"][mask]).abs().max()
                errors["old log-probs vs TRL's"] = max(errors["old log-probs vs TRL's"], error.item())
            compared += int(mask.sum())
            all_weights.append(record["weights"][mask])
            errors["weights"] = max(errors["weights"], (record["weights"][mask] - expected[mask]).abs().max().item())
    first = result_pair[0]
    label = (
        f"{first['distributed_type']} {first['mixed_precision']} {first['run']} "
        f"({first['machine']['LOCAL_WORLD_SIZE']} per node)"
    )
    print(
        f"\n[distributed] {label}: max error vs float64 over {compared} tokens: "
        + ", ".join(f"{k} {v:.2e}" for k, v in errors.items())
    )
    return compared, torch.cat(all_weights).std().item()


# ----------------------------------------------------------------------------------------------------------------
# Tests


@slow
@pytest.mark.parametrize("backend", list(LAUNCHES))
def test_two_ranks_on_the_intended_backend(launched, backend):
    expected = {
        "ddp": ("MULTI_CPU", None), "zero2": ("DEEPSPEED", 2), "zero3": ("DEEPSPEED", 3), "fsdp2": ("FSDP", None)
    }[backend]  # fmt: skip
    for run, pair in launched(backend).items():
        assert [r["rank"] for r in pair] == [0, 1]
        for r in pair:
            assert r["world_size"] == 2 and r["num_processes"] == 2, (run, r["rank"])
            assert (r["distributed_type"], r["zero_stage"]) == expected, (run, r["distributed_type"], r["zero_stage"])


@slow
@pytest.mark.parametrize(("backend", "run"), RUNS, ids=RUN_IDS)
def test_parameters_equal_across_ranks_and_trained(launched, tiny_model, backend, run):
    from transformers import AutoModelForCausalLM

    rank0, rank1 = launched(backend)[run]
    assert rank0["final_params"].keys() == rank1["final_params"].keys()
    for name, value in rank0["final_params"].items():
        assert torch.equal(value, rank1["final_params"][name]), f"{name} differs between ranks"
    initial = rank0["states"][0]
    trainable = [n for n in initial if _base(run) != "lora" or "lora_" in n]
    changed = [n for n in trainable if not torch.equal(initial[n], rank0["final_params"][n])]
    assert len(changed) == len(trainable), f"unchanged after training: {sorted(set(trainable) - set(changed))[:5]}"
    if _base(run) == "lora":  # the frozen base did not move
        assert all(torch.equal(initial[n], rank0["final_params"][n]) for n in initial if "lora_" not in n)
    else:  # the initial state the worker gathered is the checkpoint on disk (ZeRO-3: a correct gather)
        disk = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
        for name, value in initial.items():
            assert torch.equal(value, disk[name]), name


@slow
@pytest.mark.parametrize(("backend", "run"), RUNS, ids=RUN_IDS)
def test_dgpo_metrics_logged(launched, backend, run):
    history = [h for h in launched(backend)[run][0]["log_history"] if "loss" in h]
    max_steps = launched(backend)[run][0]["settings"]["max_steps"]
    assert len(history) == max_steps
    scored = [h for h in history if "dgpo/divergence/mean" in h]  # logged at every generation
    generations = max_steps // launched(backend)[run][0]["settings"]["steps_per_generation"]
    assert len(scored) == generations
    for h in scored:
        for key in ("dgpo/entropy_normalized/mean", "dgpo/weight/max", "dgpo/weight/std", "dgpo/ess", "dgpo/tau"):
            assert key in h, key
        assert 0.0 <= h["dgpo/divergence/mean"] <= 1.0 and h["dgpo/nonfinite_sequences"] == 0
    # At the first step pi_theta == pi_ref (LoRA: B = 0), so d = 0 and w = 1; later the policy has moved
    assert scored[0]["dgpo/divergence/mean"] == 0.0 and scored[0]["dgpo/weight/max"] == 1.0
    assert scored[-1]["dgpo/divergence/mean"] > 0.0 and scored[-1]["dgpo/weight/std"] > 0.0


@slow
@pytest.mark.parametrize(("backend", "run"), RUNS, ids=RUN_IDS)
def test_weights_match_single_process_recomputation(launched, tiny_model, backend, run):
    pair = launched(backend)[run]
    for result in pair:  # every rank scored something at a step where the weights are not trivially 1
        assert any(len(r["rows"]) and r["step"] > 0 for r in result["records"]), result["rank"]
    compared, spread = _check_weights(tiny_model, pair, peft=_base(run) == "lora")
    assert compared > 100
    # The comparison only means something if the weights are far from uniform (a wrong reference, stale parameters or
    # misaligned rows then move them by much more than the tolerance)
    assert spread > 0.02, spread


@slow
@pytest.mark.parametrize("backend", list(LAUNCHES))
def test_adaptive_tau_is_global(launched, backend):
    """dgpo_target_ess (the "full" runs): each step's tau is bisected on the mean ESS over both ranks' completions, so
    both ranks use the same tau and the weights of all ranks together reach the target (the starved rank too, with
    no completion of its own: its reduces still match the other rank's, or the run would hang)."""
    from dgpo_trl.functional import effective_sample_size

    rank0, rank1 = launched(backend)["full"]
    target, fallback = RUN_SETTINGS["full"]["dgpo_target_ess"], SETTINGS["dgpo_tau"]
    for step in range(STEPS):
        records = [next(r for r in result["records"] if r["step"] == step) for result in (rank0, rank1)]
        assert records[0]["tau"] == records[1]["tau"], step
        ess = torch.cat(
            [effective_sample_size(r["weights"], r["completion_mask"])[r["completion_mask"].any(-1)] for r in records]
        )
        if step == 0:  # pi_theta == pi_ref: w = 1, ESS = 1 whatever tau; no tau reaches the target
            assert records[0]["tau"] == fallback and torch.allclose(ess, torch.ones_like(ess))
        else:
            assert records[0]["tau"] != fallback
            assert abs(ess.mean().item() - target) < 2e-3, (step, ess.mean().item())


# Runs that skip zero-advantage rows (the default): with every row trained, every row is scored too
LOSS_TIME_RUNS = [
    (backend, run) for backend, run in RUNS if _base(run) in ("full", "lora") and not run.endswith(EVERY_ROW)
]


@slow
@pytest.mark.parametrize(("backend", "run"), LOSS_TIME_RUNS, ids=[f"{b}-{r}" for b, r in LOSS_TIME_RUNS])
def test_rank_with_nothing_to_score_does_not_deadlock(launched, backend, run):
    """At step STARVE_STEP every completion on rank STARVE_RANK has a zero advantage, so that rank scores no row."""
    rank0, rank1 = launched(backend)[run]  # the launch finished (gloo timeout 180 s, launch timeout): no deadlock
    starved = [r for r in rank1["records"] if r["step"] == STARVE_STEP]
    assert len(starved) == 1 and len(starved[0]["rows"]) == 0
    assert not starved[0]["advantages"].any()
    other = [r for r in rank0["records"] if r["step"] == STARVE_STEP]
    assert len(other) == 1 and len(other[0]["rows"]) > 0  # the other rank had work at the same step
    # Loss-time scoring: only completions with A_i != 0 are scored
    for result in (rank0, rank1):
        for record in result["records"]:
            assert record["path"] == "loss"
            assert torch.equal(record["rows"], record["advantages"].nonzero().squeeze(-1))
    history = rank0["log_history"]
    assert sum("loss" in h for h in history) == STEPS
    starved_log = [h for h in history if h.get("step") == STARVE_STEP + 1 and "dgpo/scored_fraction" in h]
    assert starved_log and starved_log[0]["dgpo/scored_fraction"] <= 0.5
    steps = range(STEPS)
    sharded = backend in SHARDED
    # Reference forwards and divergence passes (LM-head gathers under ZeRO-3 and FSDP2) per step. Sharded forwards are
    # collectives: there the starved rank still runs one forward (on a dummy row) and one gather, like the other rank.
    # Without sharding it skips them.
    expected = {0: [1] * STEPS, 1: [0 if s == STARVE_STEP and not sharded else 1 for s in steps]}
    for rank, result in enumerate((rank0, rank1)):
        for counter in ("ref_forwards", "divergence_passes"):
            assert [result[counter].get(s, 0) for s in steps] == expected[rank], (rank, counter)
        # pi_theta's hidden states come from TRL's training forward: no policy forward of DGPO's own (with LoRA the
        # adapter-disabled reference pass through the same backbone is counted as a reference forward)
        assert [result["policy_forwards"].get(s, 0) for s in steps] == [1] * STEPS, rank


@slow
@pytest.mark.parametrize("backend", SHARDED)
def test_scoring_time_path_runs_one_joint_pass_per_chunk(launched, backend):
    """steps_per_generation=2 > gradient_accumulation_steps=1: DGPO's joint pass replaces TRL's old-log-prob pass."""
    rank0, rank1 = launched(backend)["scoring"]
    chunks = RUN_SETTINGS["scoring"]["steps_per_generation"]  # TRL scores per_device_train_batch_size rows per chunk
    rows = SETTINGS["per_device_train_batch_size"] * chunks
    for result in (rank0, rank1):
        records = result["records"]
        assert [(r["step"], r["path"]) for r in records] == [(0, "scoring"), (2, "scoring")]
        for record in records:  # every completion of the generation batch is scored (advantages are not known yet)
            assert torch.equal(record["rows"], torch.arange(rows))
        # Per generation step: one policy and one reference forward per chunk, plus the training forward; no second
        # policy pass by TRL and no reference pass by TRL. Steps in between: the training forward only.
        assert result["policy_forwards"] == {0: chunks + 1, 1: 1, 2: chunks + 1, 3: 1}
        assert result["ref_forwards"] == {0: chunks, 2: chunks}
        assert result["divergence_passes"] == {0: chunks, 2: chunks}
    # Weights and old log-probs: test_weights_match_single_process_recomputation[<backend>-scoring]


@slow
def test_fsdp2_scoring_right_after_an_optimizer_step(launched):
    """Generation on a server runs nothing on the trainer's model, so DGPO's scoring-time forwards are the first
    forwards after the optimizer step, when FSDP2 has resharded the root's own parameters (the embedding among them):
    a backbone called directly failed here ("FSDP requires a single root module", or "mixed torch.Tensor and
    DTensor"). Through the root, every step scores (TRL's importance-sampling correction asks for old log-probs)."""
    rank0, rank1 = launched("fsdp2")["server"]
    for result in (rank0, rank1):
        assert [(r["step"], r["path"]) for r in result["records"]] == [(s, "scoring") for s in range(STEPS)]
        # Per step: DGPO's joint pass (one policy and one reference forward) and the training forward, nothing else
        assert result["policy_forwards"] == {s: 2 for s in range(STEPS)}
        assert result["ref_forwards"] == {s: 1 for s in range(STEPS)}
    # Weights and old log-probs against the float64 recomputation: test_weights_match_single_process_recomputation


@slow
def test_fsdp2_grpo_trainer_trains_on_the_same_launch(launched, tiny_model):
    """The control: TRL's own GRPOTrainer trains under the same FSDP2 launch (the harness, not DGPO, makes it run)."""
    from transformers import AutoModelForCausalLM

    rank0, rank1 = launched("fsdp2")["grpo"]
    assert rank0["distributed_type"] == rank1["distributed_type"] == "FSDP"
    assert rank0["policy_bytes"]["fsdp_layers"] == rank0["policy_bytes"]["layers"] > 0
    assert all(torch.equal(value, rank1["final_params"][name]) for name, value in rank0["final_params"].items())
    disk = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    assert all(not torch.equal(value, disk[name]) for name, value in rank0["final_params"].items())
    assert len([h for h in rank0["log_history"] if "loss" in h]) == STEPS
    assert not any(key.startswith("dgpo/") for h in rank0["log_history"] for key in h)


@slow
def test_fsdp2_resume_from_checkpoint_reproduces_the_later_steps(launched):
    """A trainer resumed from the step-2 checkpoint of a 4-step run (model, optimizer, scheduler, RNG states, all
    sharded by FSDP2) draws the same completions at steps 2 and 3, computes the same token weights, and ends at the
    same parameters as the run that was never interrupted."""
    checkpointed, resumed = launched("fsdp2")["checkpointed"], launched("fsdp2")["resumed"]
    for rank in (0, 1):
        later = [r for r in checkpointed[rank]["records"] if r["step"] >= RESUME_FROM]
        assert [r["step"] for r in resumed[rank]["records"]] == [r["step"] for r in later] == [2, 3]
        for before, after in zip(later, resumed[rank]["records"]):
            assert torch.equal(before["completion_ids"], after["completion_ids"]), (rank, before["step"])
            assert torch.equal(before["rows"], after["rows"])
            torch.testing.assert_close(after["weights"], before["weights"], atol=1e-6, rtol=0)
        for name, value in checkpointed[rank]["final_params"].items():
            torch.testing.assert_close(resumed[rank]["final_params"][name], value, atol=1e-6, rtol=0, msg=name)
    # The resumed log history is the checkpoint's (steps 1-2) plus its own steps 3-4, with the same losses
    logged = [
        [(h["step"], h["loss"]) for h in run[0]["log_history"] if "loss" in h] for run in (checkpointed, resumed)
    ]
    assert [step for step, _ in logged[1]] == [1, 2, 3, 4]
    for (step, loss), (_, resumed_loss) in zip(*logged):
        assert resumed_loss == pytest.approx(loss, rel=1e-5, abs=1e-7), step


def _example_script_command(model: str, output_dir: Path, port: int) -> list[str]:
    """`examples/dgpo.py` under `cpu_fsdp2.yaml` (2 CPU ranks), as fsdp2.yaml's header launches it, on a tiny model."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(CONFIGS / "cpu_fsdp2.yaml"), "--main_process_port", str(port),
        "examples/dgpo.py", "--model_name_or_path", model, "--dataset_name", "reversal",
        "--reward_funcs", "toolkit_fixtures.length_reward", "--max_train_samples", "64",
        "--max_steps", "2", "--per_device_train_batch_size", "8", "--num_generations", "4",
        "--max_completion_length", "8", "--learning_rate", "1e-3", "--logging_steps", "1", "--bf16", "False",
        "--gradient_checkpointing", "False", "--report_to", "none", "--save_strategy", "no", "--ddp_backend", "gloo",
        "--output_dir", str(output_dir),
    ]  # fmt: skip


@slow
def test_fsdp2_example_script_trains_and_saves(tiny_model, tmp_path):
    """`examples/dgpo.py` under `cpu_fsdp2.yaml` with the shipped CPU FSDP opt-in, launched as fsdp2.yaml's header
    says (a CPU config, a tiny model): two ranks train two steps with DGPO's metrics, and the saved model (FSDP2's full
    state dict) is the trained one."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    output_dir = tmp_path / "run"
    env = _launch_environment({**CPU_FSDP_OPT_IN, "PYTHONPATH": str(ROOT / "tests")})
    with _reserved_ports(1) as (port,):
        command = _example_script_command(tiny_model, output_dir, port)
        [(returncode, log)] = _run_process_groups([command], env, "examples/dgpo.py", tmp_path / "logs")
    assert returncode == 0, log[-8000:]
    assert "Model saved to" in log
    logged = [line for line in log.splitlines() if "'dgpo/scored_fraction'" in line]
    assert len(logged) == 2, log[-4000:]  # both steps, logged by the main process
    saved = load_file(output_dir / "model.safetensors")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    assert saved.keys() <= initial.keys() and "model.layers.0.self_attn.q_proj.weight" in saved
    assert all(saved[name].shape == initial[name].shape for name in saved)  # whole tensors, not one rank's shards
    assert any(not torch.equal(saved[name], initial[name]) for name in saved)  # trained


@slow
def test_cpu_fsdp_launch_without_the_opt_in_fails_fast_on_every_rank(tiny_model, tmp_path):
    """The same launch without `DGPO_PATCH_ACCELERATE_CPU_FSDP=1`, on which accelerate would not enable FSDP on this
    CPU host (dgpo_trl.accelerate_cpu_fsdp): each rank refuses it while it builds its DGPOConfig, with a message naming
    the defect and the fix, before any model, process group or step (without the check this launch trained on rank 0
    alone, logging dgpo/tau 0.25 for 0.5, and rank 1 failed: "IndexError: index is out of bounds" in TRL's
    shuffle_sequence_dict).

    torchrun stops the other ranks as soon as one fails, so the launch shows the refusal of the rank that got there
    first (often both); the two ranks' processes are then also run side by side without a launcher, with the
    environment the launch gives them, where each must refuse by itself."""
    env = _launch_environment({"PYTHONPATH": str(ROOT / "tests")})
    env.pop("DGPO_PATCH_ACCELERATE_CPU_FSDP", None)
    script = _example_script_command(tiny_model, tmp_path / "run", 0)
    script = script[script.index("examples/dgpo.py") :]

    def refusals(log: str) -> dict[int, str]:
        found = {}
        for line in log.splitlines():
            if line.startswith("RuntimeError: Rank ") and "of an FSDP launch" in line:
                found[int(line.split()[2])] = line
        return found

    def check(message: str) -> None:
        for words in ("never enables FSDP (a defect in accelerate/state.py", "set DGPO_PATCH_ACCELERATE_CPU_FSDP=1"):
            assert words in message, (words, message)

    with _reserved_ports(1) as (port,):
        command = _example_script_command(tiny_model, tmp_path / "run", port)
        [(returncode, log)] = _run_process_groups([command], env, "examples/dgpo.py", tmp_path / "launch")
    assert returncode != 0 and refusals(log), log[-8000:]
    for message in refusals(log).values():
        check(message)
    print(f"\n[distributed] refused in the launch by rank(s) {sorted(refusals(log))}")
    for later in ("Loading weights", "'loss'", "_apply_token_weights"):  # no model loaded, no step
        assert later not in log, later

    launch_env = ["WORLD_SIZE=2", "ACCELERATE_USE_FSDP=true"]
    ranks = [["env", f"RANK={rank}", f"LOCAL_RANK={rank}", *launch_env, sys.executable, *script] for rank in (0, 1)]
    for rank, (returncode, log) in enumerate(_run_process_groups(ranks, env, "the ranks", tmp_path / "ranks")):
        assert returncode != 0 and list(refusals(log)) == [rank], log[-4000:]
        check(refusals(log)[rank])
        assert "Loading weights" not in log


@slow
@pytest.mark.parametrize("backend", SHARDED)
def test_reference_is_sharded(launched, backend):
    """Each rank holds about half of the frozen reference's parameter bytes (ZeRO-3 partitions, FSDP2 shards); under
    FSDP2 every decoder layer of the reference is a unit of its own, as in the policy, so a reference forward gathers
    one layer at a time rather than the whole model."""
    rank0, rank1 = launched(backend)["full"]
    local = [r["reference_bytes"]["local"] for r in (rank0, rank1)]
    total = rank0["reference_bytes"]["total"]
    print(f"\n[distributed] {backend} reference bytes per rank {local} of {total} ({[x / total for x in local]})")
    for share in local:
        assert abs(share / total - 0.5) < 0.02, (local, total)
    assert sum(local) >= total
    if backend == "fsdp2":
        layers = rank0["reference_bytes"]
        assert layers["fsdp_layers"] == layers["layers"] > 0, layers


@slow
@pytest.mark.parametrize("backend", SHARDED)
def test_reference_of_a_model_changed_in_memory_is_a_copy_of_it(launched, tiny_model, backend):
    """A model loaded and noised in memory, then passed as an object: its reference is a copy of it, not the checkpoint
    its config names. Under ZeRO-3 it is loaded after the config, so zero.Init partitions it and the copy is made
    shard by shard; under FSDP2 the copy is sharded like the policy."""
    from transformers import AutoModelForCausalLM

    rank0, rank1 = launched(backend)["in_memory"]
    disk = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    for result in (rank0, rank1):
        assert result["in_memory"]["partitioned"] == (backend == "zero3")  # ZeRO-3: the zero.Init path of the copy
        passed, reference = result["in_memory"]["passed"], result["in_memory"]["reference"]
        assert passed.keys() == reference.keys()
        assert all(torch.equal(reference[name], passed[name]) for name in passed)
        assert all(not torch.equal(passed[name], disk[name]) for name in passed)
        # The passed model plus one copy: nothing else loaded (the disk reload gave a third)
        assert result["causal_lms_after"] - result["causal_lms_before"] == 2
    scored = [h for h in rank0["log_history"] if "dgpo/divergence/max" in h]
    # Step 1: pi_theta == pi_ref exactly (reloading the path gave d ~ 0.03 with this noise); then the policy moves
    assert scored[0]["dgpo/divergence/max"] == 0.0 and scored[0]["dgpo/weight/std"] == 0.0
    assert scored[-1]["dgpo/divergence/max"] > 0.0
    compared, spread = _check_weights(tiny_model, (rank0, rank1), peft=False, reference_state=rank0["states"][0])
    assert compared > 100 and spread > 0.02


@slow
@pytest.mark.parametrize("backend", ["ddp", "zero3", "fsdp2"])
def test_lora_reference_is_the_adapter_disabled_policy(launched, backend):
    for result in launched(backend)["lora"]:
        assert result["ref_model_is_none"]
        # The launch's first run: no causal LM existed before the trainer, exactly one (the policy) after it
        assert (result["causal_lms_before"], result["causal_lms_after"]) == (0, 1)
        # Its forward counts: test_rank_with_nothing_to_score_does_not_deadlock[<backend>-lora]
    for result in launched(backend)["full"]:
        # A full model gets a frozen reference: the trainer adds two causal LMs (a finished ZeRO-3 run's engine can
        # keep the earlier LoRA model alive in this process, so count the difference)
        assert not result["ref_model_is_none"]
        assert result["causal_lms_after"] - result["causal_lms_before"] == 2
    # That the reference really is the adapter-disabled base (the checkpoint on disk):
    # test_weights_match_single_process_recomputation[<backend>-lora]


CROSS_BACKEND = {
    "full": ("ddp", "zero2", "zero3", "fsdp2"), "lora": ("ddp", "zero3", "fsdp2"), "scoring": ("ddp", "zero3", "fsdp2")
}  # fmt: skip


@slow
@pytest.mark.parametrize("run", list(CROSS_BACKEND))
def test_weights_identical_whichever_backend(launched, run):
    """DDP, ZeRO-2, ZeRO-3 and FSDP2 run the same seeds on the same data. Where a rank drew the same completions at a
    step (all of them here: sampling is seeded per rank, and the parameters agree to float precision), it must have
    computed the same token weights; with the same completions throughout, training ends at the same parameters
    (ZeRO-3, FSDP2 and LoRA included: DGPO's extra forwards and LM-head gathers between the training forward and
    backward do not disturb the gradients)."""
    backends = CROSS_BACKEND[run]
    results = {backend: launched(backend)[run] for backend in backends}
    compared = identical = 0
    for rank in (0, 1):
        base = results["ddp"][rank]["records"]
        for backend in backends[1:]:
            other = results[backend][rank]["records"]
            assert [r["step"] for r in other] == [r["step"] for r in base]
            for a, b in zip(base, other):
                identical += 1
                if not torch.equal(a["completion_ids"], b["completion_ids"]):
                    identical -= 1
                    continue  # a sampling flip after a float-level parameter difference: nothing to compare
                assert torch.equal(a["rows"], b["rows"])
                torch.testing.assert_close(b["weights"], a["weights"], atol=WEIGHT_ATOL, rtol=0)
                compared += int(a["step"] > 0 and len(a["rows"]) > 0)
    assert compared >= 2 * (len(backends) - 1), compared
    if identical == sum(len(results["ddp"][rank]["records"]) for rank in (0, 1)) * (len(backends) - 1):
        # Compare each tensor's training update (final - initial) in norm: Adam turns float-level gradient noise on
        # near-zero gradients into visible elementwise differences, a corrupted gradient changes the update itself
        initial = results["ddp"][0]["states"][0]
        for backend in backends[1:]:
            for name, start in initial.items():
                reference_update = results["ddp"][0]["final_params"][name] - start
                update = results[backend][0]["final_params"][name] - start
                if not reference_update.any():  # frozen (LoRA base)
                    assert not update.any(), (backend, name)
                    continue
                relative = ((update - reference_update).norm() / reference_update.norm()).item()
                assert relative < 1e-2, (backend, name, relative)


@slow
@pytest.mark.parametrize("name", list(NODE_LAUNCHES))
def test_two_nodes_train_like_one_node(launched, tiny_model, name):
    """Two `accelerate launch` processes, `num_machines: 2`, machine ranks 0 and 1, one process each, static
    rendezvous on 127.0.0.1 (docs/distributed.md's commands): the same global ranks as the 1 node x 2 ranks launch of
    that backend, so the same completions, the same token weights and the same trained parameters, bit for bit."""
    one_node, runs = NODE_LAUNCHES[name]
    two_nodes = launched(name)
    for run in runs.split(","):
        for rank in (0, 1):
            result, single = two_nodes[run][rank], launched(one_node)[run][rank]
            # One process per machine: each is local rank 0 of a node of its own
            assert result["world_size"] == 2 and result["machine"]["LOCAL_WORLD_SIZE"] == "1", result["machine"]
            assert result["machine"]["LOCAL_RANK"] == "0" and result["machine"]["GROUP_RANK"] == str(rank)
            assert result["distributed_type"] == single["distributed_type"]
            assert [r["step"] for r in result["records"]] == [r["step"] for r in single["records"]]
            for ours, theirs in zip(result["records"], single["records"]):
                assert torch.equal(ours["completion_ids"], theirs["completion_ids"]), (run, rank, ours["step"])
                assert torch.equal(ours["weights"], theirs["weights"]), (run, rank, ours["step"])
            for param, value in single["final_params"].items():
                assert torch.equal(result["final_params"][param], value), (run, rank, param)
        compared, spread = _check_weights(tiny_model, two_nodes[run], peft=False)
        assert compared > 100 and spread > 0.02


@slow
@pytest.mark.parametrize("name", list(ARCHITECTURE_LAUNCHES))
def test_architecture_on_two_ranks(tmp_path_factory, name):
    """A non-Llama tiny model on 2 ranks: the backend, equal trained parameters on both ranks, the starved rank at
    loss time, and every token weight (and at scoring time TRL's old log-probs) against the single-process float64
    recomputation, as `test_weights_match_single_process_recomputation` checks Llama."""
    from transformers import AutoModelForCausalLM

    from dgpo_trl.tiny import build_tiny_model

    architecture, config, runs, _ = ARCHITECTURE_LAUNCHES[name]
    model_dir = build_tiny_model(
        tmp_path_factory.mktemp(name) / "tiny", hidden_size=64, num_layers=2, num_heads=4, architecture=architecture
    )
    disk = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert disk.config.model_type == architecture
    tied = disk.get_output_embeddings().weight is disk.get_input_embeddings().weight
    assert tied == disk.config.tie_word_embeddings
    results = _launch(name, model_dir, tmp_path_factory.mktemp(f"{name}_out"))
    backend = {"cpu_zero3.yaml": ("DEEPSPEED", 3), "cpu_zero2.yaml": ("DEEPSPEED", 2)}.get(config)
    disk_state = disk.state_dict()
    for run, pair in results.items():
        assert [r["rank"] for r in pair] == [0, 1]
        for r in pair:
            assert r["world_size"] == 2 and (r["distributed_type"], r["zero_stage"]) == backend, (run, r["rank"])
            assert not r["ref_model_is_none"]
        rank0, rank1 = pair
        for param, value in rank0["final_params"].items():
            assert torch.equal(value, rank1["final_params"][param]), f"{run}: {param} differs between ranks"
        initial = rank0["states"][0]  # gathered under ZeRO-3: the checkpoint on disk
        assert all(torch.equal(value, disk_state[param]) for param, value in initial.items()), run
        assert all(not torch.equal(initial[n], rank0["final_params"][n]) for n in initial), f"{run}: not trained"
        if run == "full":  # the rank with nothing to score at STARVE_STEP still ran its collectives
            starved = [r for r in rank1["records"] if r["step"] == STARVE_STEP]
            assert len(starved) == 1 and len(starved[0]["rows"]) == 0
        else:
            assert {r["path"] for result in pair for r in result["records"]} == {"scoring"}
        for result in pair:
            assert any(len(r["rows"]) and r["step"] > 0 for r in result["records"]), (run, result["rank"])
        compared, spread = _check_weights(model_dir, pair, peft=False)
        assert compared > 100, (run, compared)
        assert spread > 0.02, (run, spread)


# ----------------------------------------------------------------------------------------------------------------
# TRL's GPU LM-head path, bf16 mixed precision, TRL's first-micro-step ratio

COMPACT_RUNS = [(backend, run) for backend, run in RUNS if run.endswith(COMPACT)]


@slow
@pytest.mark.parametrize(("backend", "run"), COMPACT_RUNS, ids=[f"{b}-{r}" for b, r in COMPACT_RUNS])
def test_compact_lm_head_trains_bit_for_bit_like_every_position(launched, backend, run):
    """TRL 1.16's fused LM head projects only the labelled positions where Triton runs (GPUs), every position on CPU.
    A "_compact" run switches that choice alone (`tests/trl_head.py`, entered around training; leaving it fails the
    run if TRL never asked) and must train exactly as its every-position run of the same launch: the same completions,
    rows, token weights, per-token advantages and old log-probs at every step, the same PPO log ratios, and the same
    parameters at the end, bit for bit. Its weights against float64: test_weights_match_single_process_recomputation
    (and the rest of the per-run checks) with the same id."""
    compact, every_position = launched(backend)[run], launched(backend)[_base(run)]
    for ours, theirs in zip(compact, every_position):
        assert ours["compact_lm_head"] > 0 and theirs["compact_lm_head"] == 0, "TRL asked which positions to project"
        assert [r["step"] for r in ours["records"]] == [r["step"] for r in theirs["records"]]
        for a, b in zip(ours["records"], theirs["records"]):
            for key in ("completion_ids", "rows", "weights", "token_advantages", "old_per_token_logps"):
                assert (key in a) == (key in b) and (key not in a or torch.equal(a[key], b[key])), (key, a["step"])
        assert ours["log_ratios"] == theirs["log_ratios"]
        for name, value in theirs["final_params"].items():
            assert torch.equal(ours["final_params"][name], value), name


EVERY_ROW_RUNS = [(backend, run) for backend, run in RUNS if run.endswith(EVERY_ROW)]


@slow
@pytest.mark.parametrize(("backend", "run"), EVERY_ROW_RUNS, ids=[f"{b}-{r}" for b, r in EVERY_ROW_RUNS])
def test_skipping_zero_advantage_rows_leaves_the_update_as_it_was(launched, backend, run):
    """`dgpo_skip_zero_advantage` (the default) trains only the completions with a nonzero advantage: on 2 ranks the
    parameters after training agree with a run that trains every row to float32 rounding, also at the loss-time runs'
    step where one rank has no row to train at all (`--starve-step`: every completion of that rank is constant), which
    still runs one forward and backward (under ZeRO-3 and FSDP2 a collective; under DDP the gradient all-reduce)."""
    skipped, every_row = launched(backend)[_base(run)], launched(backend)[run]
    fractions = [row["dgpo/trained_fraction"] for row in skipped[0]["log_history"] if "dgpo/trained_fraction" in row]
    assert fractions and min(fractions) < 1.0, fractions  # rows were skipped
    assert all(row.get("dgpo/trained_fraction", 1.0) == 1.0 for row in every_row[0]["log_history"])
    if _base(run) == "full":  # the starved step: rank 1 trained nothing, rank 0 only its nonzero-advantage rows
        assert fractions[STARVE_STEP] <= 0.5, fractions
    initial = every_row[0]["states"][0]
    for ours, theirs in zip(skipped, every_row):
        difference = max((ours["final_params"][n] - v).abs().max().item() for n, v in theirs["final_params"].items())
        moved = max((v - initial[n]).abs().max().item() for n, v in theirs["final_params"].items())
        print(
            f"\n[distributed] {backend} {_base(run)}: skipping vs every row, largest parameter difference "
            f"{difference:.1e} (moved {moved:.1e})"
        )
        assert moved > 1e-3 and difference < 1e-5, (difference, moved)


BF16_RUNS = [(name, run) for name, (_, runs) in BF16_LAUNCHES.items() for run in runs.split(",")]
BF16_DGPO_RUNS = [(name, run) for name, run in BF16_RUNS if run != "grpo"]


@slow
@pytest.mark.parametrize(("name", "run"), BF16_RUNS, ids=[f"{n}-{r}" for n, r in BF16_RUNS])
def test_bf16_launch_trains(launched, name, run):
    """`--mixed_precision bf16` on the CPU configs, as zero3.yaml and fsdp2.yaml set it: 2 ranks on the intended
    backend, computing in bf16 (DeepSpeed holds the models in bf16; FSDP2 keeps fp32 shards and casts each unit to bf16
    for its forward), DGPOTrainer and GRPOTrainer train (every parameter moved, equal on both ranks)."""
    pair = launched(name)[run]
    backend = BF16_LAUNCHES[name][0]
    for result in pair:
        assert result["world_size"] == 2 and result["mixed_precision"] == "bf16"
        if backend == "zero3":
            assert (result["distributed_type"], result["zero_stage"]) == ("DEEPSPEED", 3)
            assert result["parameter_dtypes"] == ["torch.bfloat16"]
        else:
            assert result["distributed_type"] == "FSDP" and result["fsdp_param_dtype"] == "torch.bfloat16"
            assert result["parameter_dtypes"] == ["torch.float32"]
    rank0, rank1 = pair
    initial = rank0["states"][0]
    for param, value in rank0["final_params"].items():
        assert torch.equal(value, rank1["final_params"][param]), f"{param} differs between ranks"
        assert not torch.equal(value, initial[param]), f"{param} did not move"
    history = rank0["log_history"]
    assert len([h for h in history if "loss" in h]) == rank0["settings"]["max_steps"]
    dgpo_keys = {key for h in history for key in h if key.startswith("dgpo/")}
    if run == "grpo":
        assert not dgpo_keys
    else:
        assert {"dgpo/divergence/max", "dgpo/weight/max", "dgpo/tau", "dgpo/nonfinite_sequences"} <= dgpo_keys
        assert all(h["dgpo/nonfinite_sequences"] == 0 for h in history if "dgpo/nonfinite_sequences" in h)


@slow
@pytest.mark.parametrize(("name", "run"), _cases(BF16_DGPO_RUNS))
def test_bf16_step_one_divergence_is_zero(launched, name, run):
    """At step 1 pi_theta == pi_ref: in bf16 too, d_t must be exactly 0 and every weight exactly 1."""
    rank0, rank1 = launched(name)[run]
    scored = [h for h in rank0["log_history"] if "dgpo/divergence/max" in h]
    assert scored[0]["dgpo/divergence/max"] == 0.0, scored[0]
    assert scored[-1]["dgpo/divergence/max"] > 0.0  # later the policy has moved
    for result in (rank0, rank1):
        first = [r for r in result["records"] if r["step"] == 0]
        assert first and all(torch.equal(r["weights"], r["completion_mask"].float()) for r in first)


@slow
@pytest.mark.parametrize(("name", "run"), BF16_DGPO_RUNS, ids=[f"{n}-{r}" for n, r in BF16_DGPO_RUNS])
def test_bf16_weights_match_float64_recomputation(launched, tiny_model, name, run):
    """Every token weight of both bf16 ranks (and at scoring time TRL's old log-probs) against the single-process
    float64 recomputation from the parameters the run held, within the bf16 tolerances (BF16_WEIGHT_ATOL,
    BF16_LOGP_ATOL: their measured errors in docs/distributed.md); spread enough for a wrong reference, step or row to
    fail them."""
    pair = launched(name)[run]
    for result in pair:
        assert any(len(r["rows"]) and r["step"] > 0 for r in result["records"]), result["rank"]
    compared, spread = _check_weights(
        tiny_model, pair, peft=False, weight_atol=BF16_WEIGHT_ATOL, logp_atol=BF16_LOGP_ATOL
    )
    assert compared > 100 and spread > 0.02, (compared, spread)


LAUNCHED_RUNS = {**{n: r for n, (_, r, _) in LAUNCHES.items()}, **{n: r for n, (_, r) in BF16_LAUNCHES.items()}}
RATIO_RUNS = [
    (name, run)
    for name, runs in LAUNCHED_RUNS.items()
    for run in runs.split(",")
    if _base(run) in ("scoring", "server", "grpo")
]


@slow
@pytest.mark.parametrize(("name", "run"), _cases(RATIO_RUNS))
def test_first_micro_step_log_ratio_is_zero(launched, name, run):
    """Where TRL has old log-probs (scoring time, a server's importance sampling), the first training micro-step after
    a generation comes before any update: TRL's ratio pi_theta / pi_old must be exactly 1, so max |log pi_theta -
    old_per_token_logps| exactly 0, in fp32 and bf16, as GRPOTrainer gives (the "grpo" runs: TRL's own old
    log-probs). DGPO hands TRL the old log-probs of its own pass, which must be TRL's to the bit."""
    pair = launched(name)[run]
    per_generation = pair[0]["settings"]["steps_per_generation"]
    for result in pair:
        first = [(step, ratio) for step, ratio in result["log_ratios"] if step % per_generation == 0]
        assert len(first) == -(-result["settings"]["max_steps"] // per_generation), result["log_ratios"]
        print(f"\n[distributed] {name} {run} rank {result['rank']}: first-micro-step max |log ratio| {first}")
        assert all(ratio == 0.0 for _, ratio in first), (result["rank"], first)


def test_cpu_fsdp_launch_is_refused_or_patched(monkeypatch, tmp_path):
    """dgpo_trl.accelerate_cpu_fsdp on one rank of a 2-process FSDP launch on this CPU host (no process started):
    without the opt-in the check, and DGPOConfig, refuse it naming the defect and the fix; with it, accelerate's own
    backend choice becomes MULTI_CPU over gloo (which AcceleratorState then upgrades to FSDP: the FSDP2 launches)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    from dgpo_trl import DGPOConfig
    from dgpo_trl.accelerate_cpu_fsdp import PATCH_VARIABLE, check_cpu_fsdp_launch

    original = PartialState._prepare_backend
    monkeypatch.setattr(PartialState, "_prepare_backend", original)  # both restored after the test
    monkeypatch.setattr(AcceleratorState, "__init__", AcceleratorState.__init__)
    monkeypatch.setattr(PartialState, "_shared_state", {})  # accelerate's state not set up yet in this "rank"
    for key, value in {"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(PATCH_VARIABLE, raising=False)
    rank = object.__new__(PartialState)
    assert original(rank) == (None, DistributedType.NO)  # the defect: no distributed type on CPU ranks

    with pytest.raises(RuntimeError, match=r"never enables FSDP \(a defect in accelerate/state\.py") as error:
        check_cpu_fsdp_launch()
    assert f"Fix: set {PATCH_VARIABLE}=1 in the launch's environment" in str(error.value)
    assert "every rank but the first would fail" in str(error.value)
    with pytest.raises(RuntimeError, match="MULTI_CPU.*silently train with DDP"):
        check_cpu_fsdp_launch(use_cpu=True)
    with pytest.raises(RuntimeError, match="never enables FSDP"):
        DGPOConfig(output_dir=str(tmp_path), bf16=False)
    assert PartialState._shared_state == {}  # refused before accelerate set anything up
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    check_cpu_fsdp_launch()  # not an FSDP launch: nothing to say
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")

    monkeypatch.setenv(PATCH_VARIABLE, "1")
    check_cpu_fsdp_launch()
    patched = PartialState._prepare_backend
    assert patched is not original and patched(rank) == ("gloo", DistributedType.MULTI_CPU)
    check_cpu_fsdp_launch()  # applied once
    assert PartialState._prepare_backend is patched
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    assert patched(rank) == (None, DistributedType.NO)  # other launches keep accelerate's choice


def test_cpu_fsdp_patch_after_accelerate_state_is_refused(monkeypatch):
    """Too late to patch: accelerate's state already says NO for an FSDP launch (a GRPOConfig built first)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    from dgpo_trl.accelerate_cpu_fsdp import patch_accelerate_cpu_fsdp

    monkeypatch.setattr(PartialState, "_prepare_backend", PartialState._prepare_backend)
    monkeypatch.setattr(AcceleratorState, "__init__", AcceleratorState.__init__)
    monkeypatch.setattr(PartialState, "_shared_state", {"distributed_type": DistributedType.NO})
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="came too late"):
        patch_accelerate_cpu_fsdp()


EXPECTED_CONFIGS = {
    # file: (distributed type, processes, machines, mixed precision, ZeRO stage)
    "zero3.yaml": ("DEEPSPEED", 8, 1, "bf16", 3),
    "zero3_2nodes.yaml": ("DEEPSPEED", 16, 2, "bf16", 3),
    "zero2.yaml": ("DEEPSPEED", 8, 1, "bf16", 2),
    "multi_gpu.yaml": ("MULTI_GPU", 8, 1, "bf16", None),
    "single_gpu.yaml": ("NO", 1, 1, "bf16", None),
    "fsdp2.yaml": ("FSDP", 8, 1, "bf16", None),
    "cpu_ddp.yaml": ("MULTI_GPU", 2, 1, "no", None),
    "cpu_zero2.yaml": ("DEEPSPEED", 2, 1, "no", 2),
    "cpu_zero3.yaml": ("DEEPSPEED", 2, 1, "no", 3),
    "cpu_fsdp2.yaml": ("FSDP", 2, 1, "no", None),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_CONFIGS))
def test_accelerate_config(name):
    """Each config parses with accelerate's own loader, is what its name says, and documents its launch command."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = CONFIGS / name
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    header = "\n".join(header)
    assert header, f"{name} must start with a comment saying what it is for"
    assert "accelerate launch" in header and f"--config_file accelerate_configs/{name}" in header, name
    config = load_config_from_file(str(path))
    kind, processes, machines, precision, stage = EXPECTED_CONFIGS[name]
    assert config.distributed_type.value == kind
    assert (config.num_processes, config.num_machines, str(config.mixed_precision)) == (processes, machines, precision)
    assert (config.deepspeed_config or {}).get("zero_stage") == stage
    if name in ("fsdp2.yaml", "cpu_fsdp2.yaml"):
        assert config.fsdp_config["fsdp_version"] == 2
    if name == "cpu_fsdp2.yaml":  # the CPU check shards like the GPU config
        gpu = load_config_from_file(str(CONFIGS / "fsdp2.yaml")).fsdp_config
        assert {k: v for k, v in config.fsdp_config.items()} == gpu
    if machines > 1:
        assert "--machine_rank" in header and "--main_process_ip" in header


def test_every_config_is_checked():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED_CONFIGS)
