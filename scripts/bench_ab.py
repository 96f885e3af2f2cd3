"""A/B decode throughput of two checkouts of jaxfire, alternated in short bursts.

    python scripts/bench_ab.py BASE_TREE NEW_TREE [--batches 1 8 32] [--rounds 6]
    python scripts/bench_ab.py . . --base-kw '{"page_size": 512}' --new-kw '{"page_size": 16}'
    python scripts/bench_ab.py BASE_TREE NEW_TREE --stream   # requests streamed
    python scripts/bench_ab.py BASE_TREE NEW_TREE --batches 3 5 --base-kw '{"max_slots": 16}' \
        --new-kw '{"max_slots": 16}'   # fewer requests than slots (default: as many)
    python scripts/bench_ab.py . . --new-env MALLOC_ARENA_MAX=2   # an environment setting

On a noisy machine (the read bandwidth of these VMs swings by a third within minutes) two
runs minutes apart differ more than the change being measured. This starts one worker
process per checkout (PYTHONPATH=tree, so each imports its own engine/), each holding a
compiled engine per batch size, and asks them in turn for one burst each: B requests of
128-token prompts decoding `--new` tokens (greedy, ignore_eos). A burst's decode rate is the
tokens after each request's first update over the time from the first of those updates to
the last token. Reported per batch size: each side's median rate and the median of the
per-round ratios new / base (the two bursts of a round run back to back, so they share the
machine's state), and the same for the bursts' mean time to first token (a 128-token
prefill at B=1). `--stream` marks the requests streamed (one decode step a call at small
batch, engine.decoding).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, time
import numpy as np
from engine.api import Engine
from engine.requests import GenerationRequest, SamplingParams
batches, new, kw = json.loads(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
stream = sys.argv[4] == "1"
settings = {"max_len": 512, "background_compile": False}
engines = {b: Engine.from_pretrained("smollm2-135m-instruct", **{"max_slots": b, **settings, **kw})
           for b in batches}
rng = np.random.default_rng(0)
greedy = SamplingParams(temperature=0.0)
def burst(b):
    engine = engines[b]
    prompts = [tuple(int(t) for t in rng.integers(100, 40000, 128)) for _ in range(b)]
    start = time.perf_counter()
    handles = [engine.submit(GenerationRequest(p, greedy, max_tokens=new, ignore_eos=True,
                                               stream=stream)) for p in prompts]
    firsts, last, tokens = [], 0.0, 0
    for h in handles:
        first = True
        for u in h:
            now = time.perf_counter()
            if first:
                firsts.append(now)
                first = False
            else:
                tokens += len(u.token_ids)
            last = max(last, now)
    return [tokens / (last - min(firsts)), sum(firsts) / len(firsts) - start]
for b in batches:
    burst(b)  # warm
print("ready", flush=True)
for line in sys.stdin:
    print(json.dumps(burst(int(line))), flush=True)
for engine in engines.values():  # not left to interpreter exit, mid-call in a daemon thread
    engine.close()
"""


def start(
    tree: str, batches: list[int], new: int, kw: str, stream: bool, extra_env: list[str]
) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    env.update(item.split("=", 1) for item in extra_env)
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps(batches), str(new), kw, str(int(stream))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=os.path.abspath(tree),
    )
    while worker.stdout.readline().strip() != "ready":
        if worker.poll() is not None:
            raise RuntimeError(f"the worker for {tree} failed")
    return worker


def ask(worker: subprocess.Popen, batch: int) -> tuple[float, float]:
    """(decode tok/s, mean time to first token in s) of one burst."""
    worker.stdin.write(f"{batch}\n")
    worker.stdin.flush()
    rate, ttft = json.loads(worker.stdout.readline())
    return rate, ttft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base")
    ap.add_argument("new")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--base-kw", default="{}", help="JSON: Engine.from_pretrained arguments")
    ap.add_argument("--new-kw", default="{}", help="JSON: the same for the new side")
    ap.add_argument("--new-env", nargs="+", default=[], help="KEY=VALUE set for the new side")
    ap.add_argument("--stream", action="store_true", help="requests streamed")
    args = ap.parse_args()
    sides = (
        ("base", args.base, args.base_kw, []),
        ("new", args.new, args.new_kw, args.new_env),
    )
    new, stream = args.new_tokens, args.stream
    workers = {
        side: start(tree, args.batches, new, kw, stream, env) for side, tree, kw, env in sides
    }
    for b in args.batches:
        runs: dict[str, list[tuple[float, float]]] = {"base": [], "new": []}
        for r in range(args.rounds):
            order = ("base", "new") if r % 2 == 0 else ("new", "base")
            for side in order:
                runs[side].append(ask(workers[side], b))
        rates = {side: [rate for rate, _ in x] for side, x in runs.items()}
        ttfts = {side: [ttft * 1e3 for _, ttft in x] for side, x in runs.items()}
        ratios = [n / o for n, o in zip(rates["new"], rates["base"], strict=True)]
        ttft_ratios = [n / o for n, o in zip(ttfts["new"], ttfts["base"], strict=True)]
        print(
            f"B={b:3d}: base {statistics.median(rates['base']):7.1f} tok/s, "
            f"new {statistics.median(rates['new']):7.1f} tok/s, "
            f"median ratio new/base {statistics.median(ratios):.3f} "
            f"(per round: {', '.join(f'{x:.2f}' for x in ratios)}); TTFT base "
            f"{statistics.median(ttfts['base']):.0f} ms, new {statistics.median(ttfts['new']):.0f}"
            f" ms, median ratio {statistics.median(ttft_ratios):.3f}",
            flush=True,
        )
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()


if __name__ == "__main__":
    main()
