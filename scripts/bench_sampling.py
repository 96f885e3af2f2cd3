"""Time the jitted sampling step: greedy rows, every control on, and a full-sort pipeline.

    python scripts/bench_sampling.py [--batches 1,8,32,128] [--vocabs 49152,128256]

"every control on" sets temperature, top_k, top_p, min_p, typical_p, the three penalties
(with a prompt and generated tokens seen), logit_bias and mirostat in every row. The full-sort
pipeline is the same code with every token a candidate (num_candidates = V), i.e. a stable
full-vocabulary sort per step. Medians over repeated runs, after a warm-up (compile) call.
"""

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from samplers import SamplingParams, make_row
from samplers.pipeline import sample

EVERY_CONTROL = SamplingParams(
    temperature=0.8,
    top_k=50,
    top_p=0.9,
    min_p=0.05,
    typical_p=0.95,
    frequency_penalty=0.5,
    presence_penalty=0.3,
    repetition_penalty=1.2,
    logit_bias={11: 2.0, 42: -5.0, 1000: 1.0, 7: -100.0},
    mirostat_target=5.0,
    seed=0,
)
GREEDY = SamplingParams(temperature=0.0)
STEP = jax.jit(sample, static_argnames=("num_logprobs", "num_candidates"))


def make_batch(params: SamplingParams, slots: int, vocab: int, rng: np.random.Generator):
    row = make_row(params, vocab, 4, prompt_ids=rng.integers(0, vocab, 200))
    batch = jax.tree.map(lambda x: np.repeat(x, slots, axis=0), row)
    counts = np.zeros((slots, vocab), np.int32)
    np.add.at(counts, (np.repeat(np.arange(slots), 50), rng.integers(0, vocab, slots * 50)), 1)
    return jax.tree.map(jnp.asarray, batch.__class__(**{**batch.__dict__, "counts": counts}))


def median_ms(fn, repeats: int) -> tuple[float, float]:
    """Median wall time and median CPU time of this process (all its threads), in ms."""
    jax.block_until_ready(fn())  # compile
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return 1e3 * statistics.median(wall), 1e3 * statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--vocabs", default="49152,128256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--full-repeats", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--logprobs", type=int, default=5)
    ap.add_argument(
        "--full-max-elements",
        type=int,
        default=32 * 128_256,
        help="skip the full-sort pipeline above this many logits per step",
    )
    args = ap.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs")
    print("CPU timings on a shared machine: other processes may inflate them.\n")
    print("wall = median wall-clock ms; cpu = median CPU ms of this process (all threads)")
    head = f"{'batch':>5} {'vocab':>7} {'greedy wall/cpu':>16} {'all-on wall/cpu':>16}"
    print(head + f" {'full-sort wall':>15} {'speed-up':>8}")
    rng = np.random.default_rng(0)
    for vocab in map(int, args.vocabs.split(",")):
        for slots in map(int, args.batches.split(",")):
            logits = jnp.asarray(rng.normal(0.0, 2.0, (slots, vocab)).astype(np.float32))
            greedy, every = (make_batch(p, slots, vocab, rng) for p in (GREEDY, EVERY_CONTROL))

            def run(batch, candidates, logits=logits):
                return lambda: STEP(
                    logits, batch, num_logprobs=args.logprobs, num_candidates=candidates
                )

            g_wall, g_cpu = median_ms(run(greedy, args.candidates), args.repeats)
            e_wall, e_cpu = median_ms(run(every, args.candidates), args.repeats)
            line = (
                f"{slots:>5} {vocab:>7} {g_wall:>7.1f} /{g_cpu:>7.1f} {e_wall:>7.1f} /{e_cpu:>7.1f}"
            )
            if slots * vocab <= args.full_max_elements:
                f_wall, _ = median_ms(run(every, vocab), args.full_repeats)
                line += f" {f_wall:>15.1f} {f_wall / e_wall:>7.1f}x"
            else:
                line += f" {'skipped':>15}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
