"""Streams one step per call against k steps per call: `jaxfire serve --stream-rows 8` vs 0.

    python scripts/bench_streams.py [--concurrency 1 8] [--rounds 3] [-- serve args]

Starts `jaxfire serve` (default model, `--max-seqs 32`) with each setting in turn, round
after round (alternated, same machine, same hour), waits for its background compiles, and
loads it with bench_serving.py's closed-loop streaming client (~100-token prompts, 128
tokens, T 0.7, top_p 0.9) at each concurrency. Prints the medians over rounds of output
tok/s, TTFT p50 and the gap between a stream's chunks (p50, p99): with k steps a call, a
stream's tokens come k at a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_first_request import HERE, start, stop  # noqa: E402
from bench_meshes import load, settled  # noqa: E402

CONFIGS = {"k steps a call": ["--stream-rows", "0"], "one step a call": ["--stream-rows", "8"]}
KEYS = ("output_tokens_per_s", "ttft_p50_ms", "chunk_gap_p50_ms", "chunk_gap_p99_ms")


def main() -> None:
    argv = sys.argv[1:]
    serve_args = argv[argv.index("--") + 1 :] if "--" in argv else ["--max-seqs", "32"]
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--port", type=int, default=8767)
    args = p.parse_args(argv)
    rows: dict[str, list[list[dict]]] = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name, extra in CONFIGS.items():
            proc, _ = start(HERE.parent, args.port, [*serve_args, *extra])
            try:
                settled(args.port, 1800)
                rows[name].append(load(args.port, args.concurrency, offset=1000 * r))
            finally:
                stop(proc)
            got = "; ".join(
                f"{c} clients " + " ".join(f"{run[key]}" for key in KEYS)
                for c, run in zip(args.concurrency, rows[name][-1], strict=True)
            )
            print(f"round {r + 1} {name}: {got}", file=sys.stderr, flush=True)
    print(f"serve {serve_args}, {args.rounds} rounds, medians: {', '.join(KEYS)}")
    for i, c in enumerate(args.concurrency):
        for name in CONFIGS:
            tok_s, ttft, gap50, gap99 = (
                statistics.median(run[i][key] for run in rows[name]) for key in KEYS
            )
            print(
                f"  {c:>3} clients, {name:>15}: {tok_s:7.1f} output tok/s, TTFT p50 "
                f"{ttft:7.1f} ms, chunk gap p50 {gap50:6.1f} ms, p99 {gap99:6.1f} ms"
            )


if __name__ == "__main__":
    main()
