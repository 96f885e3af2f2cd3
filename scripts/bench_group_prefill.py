"""Several short prompts in one model call against one call each: a burst's time to first token.

    python scripts/bench_group_prefill.py [--prompts 8] [--tokens 110 125] [--rounds 5]
                                          [--model NAME] [-- Engine.from_pretrained keywords]

One engine (default model), warmed up with its background compiles finished. Each round
submits a burst of `--prompts` random-token prompts (lengths spread over `--tokens`, no shared
prefix, the prefix cache forgotten before each burst) in one admission, twice: with the group
programs (engine.prefill.Prefiller.groups) and with them off, alternated. Prints the medians
over rounds of the burst's mean and last time to first token, the calls its prompts took,
and the ratio grouped / one by one.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from engine.api import Engine
from engine.requests import GenerationRequest
from samplers import SamplingParams


def burst(engine: Engine, prompts: list[list[int]]) -> tuple[float, float]:
    """(mean, last) seconds from submitting the burst to each request's first token."""
    sched = engine.scheduler
    sched.forget_cached()
    greedy = SamplingParams(temperature=0.0)
    start = time.perf_counter()
    with sched.lock:  # one admission takes every request
        handles = [
            engine.submit(GenerationRequest(tuple(p), greedy, max_tokens=1, ignore_eos=True))
            for p in prompts
        ]
    firsts = []
    for h in handles:
        for _ in h:
            pass
        firsts.append(time.perf_counter() - start)
    return statistics.mean(firsts), max(firsts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--tokens", type=int, nargs=2, default=[110, 125])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--model", default=None)
    args = p.parse_args()
    engine = Engine.from_pretrained(args.model) if args.model else Engine.from_pretrained()
    while engine.stats()["programs_pending"]:
        time.sleep(1)
    prefill = engine.scheduler.prefiller
    shapes = prefill.group_shapes
    vocab = engine.scheduler.vocab_size
    rng = np.random.default_rng(0)
    lo, hi = args.tokens
    results: dict[str, list[tuple[float, float]]] = {"grouped": [], "one by one": []}
    calls = {name: 0 for name in results}
    for r in range(args.rounds + 1):  # the first round warms both
        for name in results:
            prefill.group_shapes = shapes if name == "grouped" else []
            lengths = rng.integers(lo, hi + 1, args.prompts)
            prompts = [rng.integers(100, vocab - 100, n).tolist() for n in lengths]
            groups = prefill.groups([n - 1 for n in lengths], on_demand=False)
            mean, last = burst(engine, prompts)
            if r:
                results[name].append((mean, last))
                calls[name] = len(groups)
                print(f"round {r} {name}: mean {mean * 1e3:.0f} ms, last {last * 1e3:.0f} ms")
    prefill.group_shapes = shapes
    medians = {
        name: [statistics.median(x[i] for x in runs) * 1e3 for i in range(2)]
        for name, runs in results.items()
    }
    for name, (mean, last) in medians.items():
        print(f"{name}: {calls[name]} calls, TTFT mean {mean:.0f} ms, last {last:.0f} ms")
    g, o = medians["grouped"], medians["one by one"]
    print(f"grouped / one by one: mean {g[0] / o[0]:.3f}, last {g[1] / o[1]:.3f}")
    engine.close()


if __name__ == "__main__":
    main()
