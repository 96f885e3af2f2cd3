"""Two host processes run one model in lockstep (engine.lockstep), as the README starts them:
`jaxfire serve --distributed --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I`
(and `jaxfire generate --distributed ...`), jax.distributed on loopback with the CPU
collectives (gloo), each process with 2 simulated devices and one mesh over all 4 (data 2 x
model 2). Process 0 serves HTTP, process 1 only /health. Tokens are held to HF transformers'
greedy ones on the tiny random Llama (what the one-device engine tests hold it to)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from tests import engine_fixtures as F
from tests.console import JAXFIRE, REPO, cpu_env

pytest.importorskip("torch")

from checkpoints import store  # noqa: E402
from engine.lockstep import HEADER, _broadcast  # noqa: E402
from serving.testing import free_port  # noqa: E402

SMALL = ["--max-len", "64", "--max-seqs", "4", "--kv-cache-memory", "64MiB"]
MESH = ["--data-parallel", "2", "--tensor-parallel", "2"]
PROMPTS = [[101, 2045, 777, 3100, 4242, 999], [300, 301, 302], [7000, 12, 4000, 5, 9]]


class Pair:
    """Processes 0 and 1 of one distributed `jaxfire` command, each process's stdout and
    stderr in files of its own."""

    def __init__(self, tmp: Path, command: str, *flags: str, caches: Sequence[Path] = ()):
        """`caches`: each process's own JAXFIRE_CACHE_DIR (hosts that share no filesystem);
        by default the session's, the checkpoint converted there first (sooner than in each
        process: engine.loading converts in a child process under jax.distributed)."""
        model = F.tiny_model_dir()
        if not caches:
            from engine.loading import convert

            convert(str(model), progress=False)
        coordinator = f"127.0.0.1:{free_port()}"
        self.ports = [free_port(), free_port()]
        self.outs = [tmp / f"process-{i}.out" for i in range(2)]
        self.logs = [tmp / f"process-{i}.log" for i in range(2)]
        self.procs = []
        for i in range(2):
            argv = [command, "--model", str(model), *flags]
            if command == "serve":
                argv += ["--port", str(self.ports[i])]
            argv += ["--distributed", "--coordinator", coordinator]
            argv += ["--num-processes", "2", "--process-id", str(i)]
            env = cpu_env(2, JAXFIRE_CACHE_DIR=str(caches[i])) if caches else cpu_env(2)
            with open(self.outs[i], "wb") as out, open(self.logs[i], "wb") as log:
                self.procs.append(
                    subprocess.Popen(
                        [str(JAXFIRE), *argv], cwd=REPO, env=env, stdout=out, stderr=log
                    )
                )
        self.urls = [f"http://127.0.0.1:{port}" for port in self.ports]

    def out(self, i: int) -> str:
        return self.outs[i].read_text(errors="replace")

    def log(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace")

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        for i, url in enumerate(self.urls):
            while True:
                assert self.procs[i].poll() is None, f"process {i} ended:\n{self.log(i)[-3000:]}"
                assert time.monotonic() < deadline, f"process {i} not ready:\n{self.log(i)[-3000:]}"
                try:
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)

    def health(self, i: int) -> dict:
        return httpx.get(f"{self.urls[i]}/health", timeout=10).json()

    def wait_exit(self, i: int, timeout: float) -> int | None:
        try:
            return self.procs[i].wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    servers = Pair(tmp_path_factory.mktemp("pair"), "serve", *SMALL, *MESH)
    try:
        servers.wait_ready()
        yield servers
    finally:
        servers.kill()


def post(pair: Pair, path: str, body: dict) -> dict:
    r = httpx.post(f"{pair.urls[0]}{path}", json={"model": "tiny-llama", **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("size", [0, 1, HEADER - 4, HEADER - 3, 5000])
def test_a_broadcast_carries_any_length(size):
    """One process: the split into a header and a padded rest, and back."""
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert _broadcast(payload) == payload


def test_completions_equal_one_device(pair):
    """Three prompts in one request: slots 0-2, on both data shards (both processes'); the
    stop strings (never met) make the admissions' broadcast longer than its header."""
    stop = [f"{i} is never written " * 12 for i in range(4)]
    body = post(pair, "/v1/completions", dict(prompt=PROMPTS, max_tokens=12, temperature=0,
                ignore_eos=True, return_token_ids=True, stop=stop))  # fmt: skip
    got = [c["token_ids"] for c in sorted(body["choices"], key=lambda c: c["index"])]
    assert got == [F.hf_greedy(p, 12) for p in PROMPTS]
    # Process 1 ran the same loop: it decoded the same rows, and freed them.
    assert pair.health(1)["decode_width"] == pair.health(0)["decode_width"] == 4


def test_streamed_chat_equals_one_device(pair):
    body = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "Name a river."}],
        "stream": True,
        "max_tokens": 10,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    prompt, ids = None, []
    with httpx.stream("POST", f"{pair.urls[0]}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            prompt = chunk.get("prompt_token_ids", prompt)
            for choice in chunk["choices"]:
                ids += choice.get("token_ids") or []
    assert prompt and ids == F.hf_greedy(prompt, 10)


def test_a_client_gone_mid_stream_frees_its_slot_on_both_processes(pair):
    body = {
        "model": "tiny-llama",
        "prompt": PROMPTS[0],
        "stream": True,
        "max_tokens": 50,
        "ignore_eos": True,
    }
    with httpx.stream("POST", f"{pair.urls[0]}/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        assert [pair.health(i)["active_slots"] for i in range(2)] == [1, 1]
    deadline = time.monotonic() + 30
    while [pair.health(i)["active_slots"] for i in range(2)] != [0, 0]:
        assert time.monotonic() < deadline, [pair.health(i) for i in range(2)]
        time.sleep(0.1)


def test_sigterm_on_process_0_stops_both(pair):
    """The last test on this pair: process 0 broadcasts the shutdown."""
    pair.procs[0].send_signal(signal.SIGTERM)
    assert pair.wait_exit(0, 60) == 0, pair.log(0)[-3000:]
    assert pair.wait_exit(1, 60) == 0, pair.log(1)[-3000:]


def test_a_process_that_dies_ends_the_other_with_an_error(tmp_path):
    smallest = ["--max-len", "32", "--max-seqs", "2", "--kv-cache-memory", "64MiB"]
    servers = Pair(tmp_path, "serve", *smallest, *MESH)
    try:
        servers.wait_ready()
        servers.procs[1].kill()
        t0 = time.monotonic()
        status = servers.wait_exit(0, 30)
        assert status not in (None, 0), servers.log(0)[-3000:]
        assert time.monotonic() - t0 < 30
        assert "the distributed engine stopped" in servers.log(0)
    finally:
        servers.kill()


def test_generate_prints_the_text_of_one_device_on_process_0_alone(tmp_path):
    """Each process has a cache folder of its own (hosts that share no filesystem), so each
    converts the checkpoint itself, under jax.distributed."""
    flags = ["--max-len", "64", "--kv-cache-memory", "64MiB", "--max-tokens", "8", "The sea is"]
    argv = [str(JAXFIRE), "generate", "--model", str(F.tiny_model_dir()), *flags]
    one = subprocess.Popen(
        argv, env=cpu_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    caches = [tmp_path / f"cache-{i}" for i in range(2)]
    pair = Pair(tmp_path, "generate", *flags, *MESH, caches=caches)
    try:
        text, log = one.communicate(timeout=600)
        assert one.returncode == 0, log[-3000:]
        for i in range(2):
            assert pair.wait_exit(i, 600) == 0, pair.log(i)[-3000:]
    finally:
        one.kill()
        pair.kill()
    assert text.strip() and pair.out(0) == text
    assert pair.out(1) == ""
    for cache in caches:
        [folder] = cache.glob("tiny-llama-*")
        assert store.is_complete(folder)
