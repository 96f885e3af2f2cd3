"""Resident memory of `jaxfire serve` for a KV cache of a given number of tokens.

    python scripts/bench_memory.py [--tokens 32768] [--dtypes float32 bfloat16] [--model M]
        [-- more serve flags]

For each KV dtype, starts `jaxfire serve` with `--kv-cache-memory` sized to hold `--tokens`
tokens (plus the pad page) and `--max-seqs` sequences of the model's context, waits for
/health, sends one short chat request, waits for the RSS to settle (the programs compiled in
the background), and reads the server's VmRSS and VmHWM from /proc.
The rest of the RSS is attributed from figures the engine knows: the packed weights' bytes
and the pool's bytes (the remainder is compiled programs, the XLA runtime and Python).
Compare llama-server's RSS with `-c TOKENS` on the same GGUF file (`ps -o rss`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request

from engine.config import ModelConfig
from engine.kv_cache import default_page_size
from engine.paging import bytes_per_page

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def rss_kib(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}


def get(url: str, body: dict | None = None, timeout: float = 600) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=timeout) as r:
        return json.loads(r.read())


def settle(pid: int, quiet: float = 30.0, limit: float = 900.0) -> None:
    """Wait until the server's RSS has grown by under 1% for `quiet` seconds: the programs
    warm-up compiles in the background are in memory by then."""
    start = last_change = time.monotonic()
    last = rss_kib(pid)["VmRSS"]
    while time.monotonic() - last_change < quiet and time.monotonic() - start < limit:
        time.sleep(5)
        now = rss_kib(pid)["VmRSS"]
        if now > last * 1.01:
            last, last_change = now, time.monotonic()


def measure(args, dtype: str, port: int, config: ModelConfig) -> dict:
    page = default_page_size("cpu")
    size = bytes_per_page(config.num_layers, config.num_kv_heads, config.head_dim,
                          ITEMSIZE[dtype], page)  # fmt: skip
    budget = (args.tokens // page + 1) * size
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--model", args.model,
           "--port", str(port), "--kv-cache-memory", str(budget), "--kv-cache-dtype", dtype,
           "--max-seqs", str(args.max_seqs), "--log-level", "warning",
           *args.serve_args]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 900
        while True:
            try:
                get(f"{base}/health", timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(1)
        messages = [{"role": "user", "content": "Name three rivers."}]
        get(f"{base}/v1/chat/completions", {"model": args.model, "messages": messages,
                                           "max_tokens": 16})  # fmt: skip
        settle(server.pid)
        metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
        pages = next(
            float(line.split()[1])
            for line in metrics.splitlines()
            if line.startswith("jaxfire_kv_pages ")
        )
        return {"dtype": dtype, "pool_tokens": int(pages) * page,
                "pool_mib": (pages + 1) * size / 2**20, **rss_kib(server.pid)}  # fmt: skip
    finally:
        server.terminate()
        server.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--max-seqs", type=int, default=16)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("serve_args", nargs="*", help="more `jaxfire serve` flags, after --")
    args = ap.parse_args()
    from checkpoints import registry

    config = ModelConfig.from_hf(registry.resolve(args.model).open().config)
    for dtype in args.dtypes:
        r = measure(args, dtype, args.port, config)
        print(
            f"KV {r['dtype']}: pool {r['pool_tokens']} tokens ({r['pool_mib']:.0f} MiB); "
            f"RSS {r['VmRSS'] / 1024:.0f} MiB, peak {r['VmHWM'] / 1024:.0f} MiB; "
            f"RSS less the pool {r['VmRSS'] / 1024 - r['pool_mib']:.0f} MiB",
            flush=True,
        )


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    main()
