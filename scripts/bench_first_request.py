"""A lone client right after `jaxfire serve` reports ready, against the same client later.

    python scripts/bench_first_request.py [--checkout DIR] [--later-s 120] [-- serve args]

Starts `jaxfire serve` from a checkout (default: this one) twice: the first start fills the
converted-weights and compilation caches, the second is measured. On it, the moment /health
answers 200, bench_serving.py's closed-loop client runs at concurrency 1 (~100-token
prompts, 128 tokens, T 0.7, top_p 0.9); it runs again `--later-s` seconds after ready. Prints
both output tok/s, TTFT p50, and their ratio (the target: at least 0.9). Arguments after
`--` go to `jaxfire serve` (default: --max-seqs 32).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent


def start(checkout: Path, port: int, serve_args: list[str]) -> tuple[subprocess.Popen, float]:
    """The server process and the seconds it took to answer /health with 200."""
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--port", str(port), *serve_args]
    # The log goes to a file: a pipe nobody reads would block the server once it filled.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=checkout, stdout=subprocess.DEVNULL, stderr=log)
    t = time.perf_counter()
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(log.read().decode()[-3000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, time.perf_counter() - t
        except httpx.HTTPError:
            pass
        time.sleep(0.05)


def lone_client(port: int, requests: int, offset: int) -> dict:
    """bench_serving.py's client at concurrency 1; `offset` shifts its prompts, so a second
    run does not find the first's in the prefix cache."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            [sys.executable, str(HERE / "bench_serving.py"), "--base-url",
             f"http://127.0.0.1:{port}/v1", "--concurrency", "1", "--min-requests",
             str(requests), "--requests-per-client", str(requests), "--offset", str(offset),
             "--json", out.name],
            check=True, capture_output=True,
        )  # fmt: skip
        [row] = json.loads(Path(out.name).read_text())
    return row


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    argv = sys.argv[1:]
    serve_args = argv[argv.index("--") + 1 :] if "--" in argv else ["--max-seqs", "32"]
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkout", type=Path, default=HERE.parent)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--later-s", type=float, default=120)
    p.add_argument("--requests", type=int, default=4)
    args = p.parse_args(argv)
    proc, first = start(args.checkout, args.port, serve_args)  # fills the caches
    stop(proc)
    proc, ready_s = start(args.checkout, args.port, serve_args)
    try:
        ready_at = time.perf_counter()
        now = lone_client(args.port, args.requests, offset=0)
        time.sleep(max(0.0, args.later_s - (time.perf_counter() - ready_at)))
        later = lone_client(args.port, args.requests, offset=1000)
    finally:
        stop(proc)
    ratio = now["output_tokens_per_s"] / later["output_tokens_per_s"]
    print(f"checkout {args.checkout} ({os.path.basename(sys.executable)}), serve {serve_args}")
    print(f"first start ready in {first:.1f}s, second in {ready_s:.1f}s")
    for name, row in (("at ready", now), (f"{args.later_s:.0f}s later", later)):
        print(
            f"  {name:>10}: {row['output_tokens_per_s']:.1f} output tok/s, "
            f"TTFT p50 {row['ttft_p50_ms']} ms"
        )
    print(f"  ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
