"""Closed-loop load generator for any OpenAI-compatible server (jaxfire, llama-server, vLLM...).

C clients each keep one streaming chat request in flight: a unique ~100-token prompt, 128
output tokens with ignore_eos, temperature 0.7, top_p 0.9. For each concurrency level it
prints requests/s, output tokens/s, time to first token and inter-token latency (p50, p99),
and the CPU load seen meanwhile (from /proc/stat), split into this client, the server
process (with --server-pid) and everything else.

    python scripts/bench_serving.py --base-url http://127.0.0.1:8000/v1
    python scripts/bench_serving.py --base-url http://127.0.0.1:8080/v1 --server-pid 1234
    python scripts/bench_serving.py --engine-baseline smollm2-135m-instruct   # no HTTP
    python scripts/bench_serving.py --engine-baseline smollm2-135m-instruct --serve

`--engine-baseline` drives jaxfire's Engine directly in this process with the same
requests, the figure the server's throughput is held to (>= 90% at C=32); with `--serve`
the same engine is then served over HTTP from this process and loaded from a child
process, so both figures come from one run and one compiled engine.

ITL is per token: a request's (last chunk - first chunk) / (tokens - 1), so servers that
batch several tokens per SSE chunk are measured fairly; the chunk gaps are reported too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import sys
import time
from dataclasses import dataclass, field

WORDS = (
    "apple river stone cloud quiet garden engine paper window silver market candle winter "
    "forest letter music bridge ocean little yellow rapid ancient simple orange mountain "
    "thunder gentle violet harbor pencil planet crystal meadow lantern whisper copper island "
    "falcon marble orchard velvet canyon ember glacier prairie saddle tundra walnut zephyr"
).split()


def make_prompt(i: int, words: int, seed: int) -> str:
    rng = random.Random(seed * 1_000_003 + i)
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"Request {i}. Continue this list of words with more words: {body}"


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ---------------------------------------------------------------------------- CPU meter


def _proc_stat() -> tuple[int, int]:
    """(busy jiffies, total jiffies) over all CPUs."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return total - idle, total


def _pid_jiffies(pid: int | None) -> int:
    if pid is None:
        return 0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except OSError:
        return 0


def _self_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class CpuMeter:
    """CPU busy over an interval, in cores: total, this process, the server, the rest."""

    def __init__(self, server_pid: int | None):
        self.server_pid = server_pid
        self.hz = os.sysconf("SC_CLK_TCK")
        self.ncpu = os.cpu_count() or 1

    def __enter__(self) -> CpuMeter:
        self.busy0, self.total0 = _proc_stat()
        self.server0 = _pid_jiffies(self.server_pid)
        self.self0 = _self_seconds()
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, total = _proc_stat()
        wall = time.monotonic() - self.t0
        self.total_cores = (busy - self.busy0) / max(1, total - self.total0) * self.ncpu
        self.server_cores = (_pid_jiffies(self.server_pid) - self.server0) / self.hz / wall
        self.client_cores = (_self_seconds() - self.self0) / wall
        self.other_cores = max(0.0, self.total_cores - self.server_cores - self.client_cores)


# ------------------------------------------------------------------------- one request


@dataclass
class Result:
    ok: bool
    ttft: float = float("nan")
    latency: float = 0.0
    tokens: int = 0
    chunk_gaps: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def itl(self) -> float | None:
        if self.tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.tokens - 1)


async def http_request(client, url: str, model: str, prompt: str, args) -> Result:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": args.max_tokens,
        "temperature": 0.7,
        "top_p": 0.9,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = last = None
    usage_tokens = None
    chunks = 0
    gaps = []
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                return Result(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Result(False, error=str(chunk["error"])[:200])
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens", usage_tokens)
                for c in chunk.get("choices") or []:
                    delta = c.get("delta") or {}
                    if delta.get("content") or c.get("text"):
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        else:
                            gaps.append(now - last)
                        last = now
                        chunks += 1
    except Exception as e:  # noqa: BLE001 - a failed request is counted, not fatal
        return Result(False, error=f"{type(e).__name__}: {e}")
    if first is None:
        return Result(False, error="no content")
    end = time.perf_counter()
    tokens = usage_tokens if usage_tokens is not None else chunks
    return Result(True, first - t0, (last or end) - t0, tokens, gaps)


# ------------------------------------------------------------------------------ a level


async def run_level(c: int, n_requests: int, send, args) -> dict:
    counter = iter(range(n_requests))
    results: list[Result] = []

    async def worker() -> None:
        for i in counter:
            results.append(
                await send(make_prompt(args.offset + c * 100_000 + i, args.words, args.seed))
            )

    with CpuMeter(args.server_pid) as cpu:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(c)])
        wall = time.perf_counter() - t0
    good = [r for r in results if r.ok]
    ttfts = [r.ttft for r in good]
    itls = [x for r in good if (x := r.itl) is not None]
    gaps = [g for r in good for g in r.chunk_gaps]
    return {
        "concurrency": c,
        "requests": len(results),
        "failed": len(results) - len(good),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "wall_s": round(wall, 3),
        "output_tokens": sum(r.tokens for r in good),
        "requests_per_s": round(len(good) / wall, 3),
        "output_tokens_per_s": round(sum(r.tokens for r in good) / wall, 1),
        "ttft_p50_ms": round(percentile(ttfts, 0.5) * 1e3, 1),
        "ttft_p99_ms": round(percentile(ttfts, 0.99) * 1e3, 1),
        "itl_p50_ms": round(percentile(itls, 0.5) * 1e3, 1),
        "itl_p99_ms": round(percentile(itls, 0.99) * 1e3, 1),
        "chunk_gap_p50_ms": round(percentile(gaps, 0.5) * 1e3, 1),
        "chunk_gap_p99_ms": round(percentile(gaps, 0.99) * 1e3, 1),
        "cpu_cores_total": round(cpu.total_cores, 2),
        "cpu_cores_server": round(cpu.server_cores, 2) if args.server_pid else None,
        "cpu_cores_client": round(cpu.client_cores, 2),
        "cpu_cores_other": round(cpu.other_cores, 2),
    }


async def bench_http(args) -> list[dict]:
    import httpx

    base = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
    async with httpx.AsyncClient(timeout=args.timeout, headers=headers, limits=limits) as client:
        deadline = time.monotonic() + args.wait_s
        while True:  # wait for a server that is still starting
            try:
                r = await client.get(f"{base}/models")
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1)
        model = args.model or r.json()["data"][0]["id"]
        url = f"{base}/chat/completions"

        async def send(prompt: str) -> Result:
            return await http_request(client, url, model, prompt, args)

        if args.warmup:
            await send(make_prompt(-1, args.words, args.seed))
        out = []
        for c in args.concurrency:
            row = await run_level(
                c, max(args.min_requests, args.requests_per_client * c), send, args
            )
            row["target"] = base
            out.append(row)
            print(json.dumps(row), flush=True)
        return out


def load_engine(args):
    from engine.api import Engine

    max_slots = max(args.concurrency)
    return Engine.from_pretrained(  # every decode width compiled first: steady-state figures
        args.engine_baseline,
        max_slots=max_slots,
        max_len=args.max_len,
        prefill_budget=args.prefill_budget,
        decode_steps=args.decode_steps,
        background_compile=False,
    )


async def bench_engine(engine, args) -> list[dict]:
    """The same load on jaxfire's Engine in this process, no HTTP: the baseline."""
    from engine.requests import GenerationRequest
    from samplers import SamplingParams

    params = SamplingParams(temperature=0.7, top_p=0.9)

    async def send(prompt: str) -> Result:
        ids = engine.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        request = GenerationRequest(tuple(ids), params, max_tokens=args.max_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        handle = engine.submit(request)
        first = last = None
        tokens = 0
        gaps = []
        async for u in handle:
            now = time.perf_counter()
            if u.token_ids:
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                tokens += len(u.token_ids)
        return Result(first is not None, (first or t0) - t0, (last or t0) - t0, tokens, gaps)

    if args.warmup:
        await send(make_prompt(-1, args.words, args.seed))
    out = []
    for c in args.concurrency:
        row = await run_level(c, max(args.min_requests, args.requests_per_client * c), send, args)
        row["target"] = f"engine:{args.engine_baseline}"
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def serve_and_bench(engine, args) -> list[dict]:
    """Serve the same engine over HTTP from this process; load it from a child process."""
    import subprocess
    import tempfile

    from serving.app import create_app
    from serving.testing import background_server

    with background_server(create_app(engine)) as url, tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [
            sys.executable,
            __file__,
            "--base-url",
            f"{url}/v1",
            "--server-pid",
            str(os.getpid()),
        ]
        cmd += ["--concurrency", *map(str, args.concurrency), "--json", out]
        cmd += ["--max-tokens", str(args.max_tokens), "--words", str(args.words)]
        cmd += ["--requests-per-client", str(args.requests_per_client)]
        cmd += ["--min-requests", str(args.min_requests), "--offset", str(args.offset + 7)]
        subprocess.run(cmd, check=False)
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--engine-baseline", metavar="MODEL", help="drive jaxfire's Engine directly")
    p.add_argument(
        "--serve",
        action="store_true",
        help="with --engine-baseline: then serve that engine over HTTP and load it too",
    )
    p.add_argument("--model", help="model name (default: the first of GET /models)")
    p.add_argument("--api-key")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--words", type=int, default=75, help="prompt words (~100 tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--offset", type=int, default=0, help="shift prompts (defeat prefix caches)")
    p.add_argument("--max-len", type=int, default=512, help="engine baseline context")
    p.add_argument(
        "--prefill-budget", type=int, default=4096, help="engine baseline: prompt tokens per step"
    )
    p.add_argument("--decode-steps", type=int, default=4, help="engine baseline: k")
    p.add_argument("--server-pid", type=int, help="attribute this process's CPU to the server")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--wait-s", type=float, default=120, help="wait this long for the server")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if not (args.base_url or args.engine_baseline):
        p.error("give --base-url and/or --engine-baseline")
    rows = []
    if args.engine_baseline:
        engine = load_engine(args)
        try:
            rows += asyncio.run(bench_engine(engine, args))
            if args.serve:
                rows += serve_and_bench(engine, args)
        finally:
            engine.close()
    if args.base_url:
        rows += asyncio.run(bench_http(args))
    _table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


def _table(rows: list[dict]) -> None:
    cols = [
        ("target", 28),
        ("concurrency", 4),
        ("requests_per_s", 7),
        ("output_tokens_per_s", 8),
        ("ttft_p50_ms", 9),
        ("ttft_p99_ms", 9),
        ("itl_p50_ms", 8),
        ("itl_p99_ms", 8),
        ("cpu_cores_other", 6),
        ("failed", 4),
    ]
    heads = [
        "target",
        "C",
        "req/s",
        "tok/s",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "other",
        "fail",
    ]
    print("  ".join(h.rjust(w) for h, (_, w) in zip(heads, cols, strict=True)), file=sys.stderr)
    for r in rows:
        print("  ".join(str(r[k])[-w:].rjust(w) for k, w in cols), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
