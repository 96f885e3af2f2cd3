"""Long context on a paged KV cache: a few long sequences and many short ones together.

    python scripts/bench_long_context.py [--long 4 --long-tokens 7000 --short 16 --new 64]

`--long` prompts of `--long-tokens` tokens and `--short` prompts of `--short-tokens` are
submitted at once to an engine with the default context (the model's) and KV budget (or
`--kv-cache-memory`); every request generates `--new` tokens (greedy, ignore_eos). Reported:
the wall time and generated tokens/s of the whole load, the short requests' median time to
first token, and, sampled every 50 ms, the KV cache in use: pages held x page bytes against
the live tokens' own bytes (the rest is rounding up to pages), its peak, and the pool's size.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import jax.numpy as jnp
import numpy as np

from engine.api import Engine
from engine.paging import bytes_per_page
from engine.requests import GenerationRequest, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--long", type=int, default=4)
    ap.add_argument("--long-tokens", type=int, default=7000)
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--short-tokens", type=int, default=100)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--kv-cache-memory", default=None, help="e.g. 2GiB (default: the engine's)")
    args = ap.parse_args()

    engine = Engine.from_pretrained(
        args.model, max_seqs=args.long + args.short, kv_cache_memory=args.kv_cache_memory
    )
    cfg, stats = engine.config, engine.stats()
    itemsize = jnp.dtype(engine.scheduler.cache[0][0].dtype).itemsize
    page_bytes = bytes_per_page(
        cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, itemsize, stats["kv_page_size"]
    )
    token_bytes = page_bytes // stats["kv_page_size"]
    rng = np.random.default_rng(0)
    vocab = engine.vocab_size

    def prompt(n: int) -> tuple[int, ...]:
        return tuple(int(t) for t in rng.integers(100, vocab - 100, n))

    greedy = SamplingParams(temperature=0.0)
    requests = [prompt(args.long_tokens) for _ in range(args.long)]
    requests += [prompt(args.short_tokens) for _ in range(args.short)]
    samples: list[tuple[int, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            s = engine.stats()
            samples.append((s["kv_pages_used"], s["kv_tokens"]))

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    handles = [
        engine.submit(GenerationRequest(p, greedy, max_tokens=args.new, ignore_eos=True))
        for p in requests
    ]
    generated = sum(len(u.token_ids) for h in handles for u in h)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    ttft_short = statistics.median(h.timing.time_to_first_token_s for h in handles[args.long :])
    peak_pages, peak_tokens = max(samples, default=(0, 0))
    used = [p * page_bytes for p, _ in samples if p]
    live = [t * token_bytes for p, t in samples if p]
    print(f"model {args.model}, page {stats['kv_page_size']} tokens = {page_bytes / 2**20:.2f} MiB")
    print(f"pool: {stats['kv_pages']} pages = {stats['kv_pages'] * page_bytes / 2**30:.2f} GiB")
    print(f"load: {args.long} x {args.long_tokens} + {args.short} x {args.short_tokens} tokens")
    print(f"wall {wall:.1f} s, {generated} tokens generated: {generated / wall:.1f} tok/s")
    print(f"short requests' median time to first token: {ttft_short:.2f} s")
    print(f"preemptions: {engine.stats()['preemptions']}")
    ratio = statistics.median(u / max(v, 1) for u, v in zip(used, live, strict=True))
    print(
        f"KV in use at peak: {peak_pages * page_bytes / 2**30:.3f} GiB for "
        f"{peak_tokens} live tokens ({peak_tokens * token_bytes / 2**30:.3f} GiB); "
        f"median in use / live {ratio:.3f}"
    )
    engine.close()


if __name__ == "__main__":
    main()
