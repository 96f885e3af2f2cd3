"""Serving throughput on one device against meshes of two: data parallel 2, tensor parallel 2.

    python scripts/bench_meshes.py [--concurrency 8 32] [--rounds 2] [-- serve args]

Starts `jaxfire serve` (default model, `--max-seqs 32 --max-len 1024`) once per configuration
and round, in turn, waits for its background compiles to finish, and loads it with
bench_serving.py's closed-loop client (~100-token prompts, 128 tokens, T 0.7, top_p 0.9) at
each concurrency. On a CPU the two devices of a mesh are simulated
(XLA_FLAGS=--xla_force_host_platform_device_count=2, sharing the same cores) and a mesh runs
XLA's ops where one device runs jaxfire's C++ kernels: the figures check that the mesh paths
serve, they are no speed-up here. Prints output tok/s, TTFT p50 and ITL p50 per
configuration (the median over rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_first_request import HERE, start, stop  # noqa: E402

CONFIGS = {
    "1 device": [],
    "data 2": ["--data-parallel", "2"],
    "model 2": ["--tensor-parallel", "2"],
}


def settled(port: int, limit_s: float) -> float:
    """Seconds until the server's background compiles are done (programs_pending 0): the
    figures are the steady state, not a program compiling in the middle of the load."""
    t = time.perf_counter()
    while time.perf_counter() - t < limit_s:
        if httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["programs_pending"] == 0:
            break
        time.sleep(2)
    return time.perf_counter() - t


def load(port: int, concurrency: list[int], offset: int) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            [sys.executable, str(HERE / "bench_serving.py"), "--base-url",
             f"http://127.0.0.1:{port}/v1", "--concurrency", *map(str, concurrency),
             "--offset", str(offset), "--json", out.name],
            check=True, capture_output=True,
        )  # fmt: skip
        return json.loads(Path(out.name).read_text())


def main() -> None:
    argv = sys.argv[1:]
    default = ["--max-seqs", "32", "--max-len", "1024"]  # fewer attended-length buckets
    serve_args = argv[argv.index("--") + 1 :] if "--" in argv else default
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--port", type=int, default=8766)
    p.add_argument("--settle-s", type=float, default=1800, help="wait at most this long")
    args = p.parse_args(argv)
    if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    rows: dict[str, list[list[dict]]] = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name, mesh in CONFIGS.items():
            proc, ready_s = start(HERE.parent, args.port, [*serve_args, *mesh])
            try:
                settle_s = settled(args.port, args.settle_s)
                rows[name].append(load(args.port, args.concurrency, offset=1000 * r))
            finally:
                stop(proc)
            # Each result as it comes: a run cut short still leaves what it measured.
            got = ", ".join(
                f"{c} clients {run['output_tokens_per_s']:.1f} tok/s"
                for c, run in zip(args.concurrency, rows[name][-1], strict=True)
            )
            print(
                f"round {r + 1} {name}: ready in {ready_s:.0f}s, compiled in {settle_s:.0f}s "
                f"more; {got}",
                file=sys.stderr,
                flush=True,
            )
    print(f"serve {serve_args}, {args.rounds} rounds, median per configuration")
    for i, c in enumerate(args.concurrency):
        for name in CONFIGS:
            tok_s, ttft, itl = (
                statistics.median(run[i][key] for run in rows[name])
                for key in ("output_tokens_per_s", "ttft_p50_ms", "itl_p50_ms")
            )
            print(
                f"  {c:>3} clients, {name:>8}: {tok_s:7.1f} output tok/s, "
                f"TTFT p50 {ttft:7.1f} ms, ITL p50 {itl:6.1f} ms"
            )


if __name__ == "__main__":
    main()
