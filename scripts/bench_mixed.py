"""Mixed load: streams decoding while a long prompt arrives (issue 16's benchmark).

`--streams` sequences decode (ignore_eos, greedy) while a `--long`-token prompt is submitted;
the long prompt is prefilled whole (every stream waits for all of it), in chunks of
`--chunks` tokens run alone between two decode calls ("alone", the behaviour before mixed
steps), or in chunks riding in the streams' decode calls ("mixed": the call's token budget
less its decode rows, one model call for both; the default). Reported per mode, medians
over `--repeats` rounds alternated in one process on one compiled engine:
the streams' inter-token gaps while the long prompt is in flight (p50, p99, max; a gap is
the time between two updates of a stream divided by the tokens the second one brought, max
is the longest wait between two updates), the long prompt's time to first token, and its
time to first token alone (no streams).

    python scripts/bench_mixed.py --long 4000 --streams 8 --chunks 512 256
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import threading
import time

import numpy as np

from engine.api import Engine
from engine.requests import GenerationRequest, SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q * 100)) if xs else float("nan")


def ids(rng: np.random.Generator, n: int, vocab: int) -> tuple[int, ...]:
    return tuple(int(t) for t in rng.integers(100, vocab - 100, n))


def alone(engine: Engine, long: tuple[int, ...]) -> float:
    handle = engine.submit(GenerationRequest(long, GREEDY, max_tokens=1))
    list(handle)
    return handle.timing.time_to_first_token_s


def mixed(engine: Engine, long: tuple[int, ...], streams: list[tuple[int, ...]]) -> dict:
    """Start the streams, submit the long prompt once all decode, measure until its first
    token (plus the same time again, so gaps right after the prefill count too)."""
    arrivals: list[list[tuple[float, int]]] = [[] for _ in streams]
    started = threading.Barrier(len(streams) + 1)
    stop = threading.Event()

    def read(i: int) -> None:
        handle = engine.submit(
            GenerationRequest(streams[i], GREEDY, max_tokens=4000, ignore_eos=True)
        )
        first = True
        for update in handle:
            arrivals[i].append((time.perf_counter(), len(update.token_ids)))
            if first:
                started.wait()
                first = False
            if stop.is_set():
                handle.cancel()

    readers = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for t in readers:
        t.start()
    started.wait()
    t0 = time.perf_counter()
    handle = engine.submit(GenerationRequest(long, GREEDY, max_tokens=1))
    list(handle)
    ttft = time.perf_counter() - t0
    time.sleep(ttft)
    stop.set()
    for t in readers:
        t.join()
    gaps, longest = [], 0.0
    for seq in arrivals:
        for (a, _), (b, k) in zip(seq, seq[1:], strict=False):
            if b >= t0 and k:
                gaps += [(b - a) / k] * k
                longest = max(longest, b - a)
    return {
        "ttft": ttft,
        "p50": percentile(gaps, 0.5),
        "p99": percentile(gaps, 0.99),
        "max": longest,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--long", type=int, default=4000, help="tokens of the long prompt")
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--stream-prompt", type=int, default=100, help="tokens of each stream's prompt")
    ap.add_argument("--chunks", type=int, nargs="+", default=[512], help="chunk sizes to compare")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=8192)
    args = ap.parse_args()

    engine = Engine.from_pretrained(
        args.model,
        max_slots=args.streams + 1,
        max_len=args.max_len,
        max_num_batched_tokens=max(args.chunks),
        background_compile=False,
    )
    sched = engine.scheduler
    base = sched.s
    rng = np.random.default_rng(0)
    vocab = engine.vocab_size
    modes = {"whole": (args.max_len, False)}
    for c in args.chunks:
        modes |= {f"alone {c}": (c, False), f"mixed {c}": (c, True)}
    mix_rows = sched._mixed_rows
    results: dict[str, list[dict]] = {m: [] for m in modes}
    standalone: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(args.repeats + 1):  # round 0 compiles what each mode uses: not counted
        for mode, (size, mix) in modes.items():
            sched.s = dataclasses.replace(base, max_num_batched_tokens=size)
            # Round 0 compiles the mixed programs a mode uses; "alone" never mixes.
            sched.mix_on_demand = True
            sched._mixed_rows = mix_rows if mix else lambda *a: None
            long = ids(rng, args.long, vocab)
            streams = [ids(rng, args.stream_prompt, vocab) for _ in range(args.streams)]
            sched.forget_cached()  # every prompt is new: no prefix reuse between rounds
            solo = alone(engine, long)
            sched.forget_cached()
            result = mixed(engine, ids(rng, args.long, vocab), streams)
            if r:
                standalone[mode].append(solo)
                results[mode].append(result)
    engine.close()
    print(
        f"{args.model}: {args.streams} streams, a {args.long}-token prompt arriving; "
        f"medians of {args.repeats}"
    )
    print(
        f"{'mode':>12} {'gap p50 ms':>11} {'p99 ms':>8} {'max s':>7} {'TTFT s':>7} "
        f"{'alone s':>8} {'ratio':>6}"
    )
    for mode in modes:
        med = {k: statistics.median(x[k] for x in results[mode]) for k in results[mode][0]}
        solo = statistics.median(standalone[mode])
        print(
            f"{mode:>12} {med['p50'] * 1e3:11.1f} {med['p99'] * 1e3:8.1f} {med['max']:7.2f} "
            f"{med['ttft']:7.2f} {solo:8.2f} {med['ttft'] / solo:6.2f}"
        )


if __name__ == "__main__":
    main()
