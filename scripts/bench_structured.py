"""Constrained (response_format json_schema) against free decoding, on one engine, alternated.

bench_serving.py's closed loop (C clients, ~100-token prompts, up to 128 tokens, T 0.7,
top_p 0.9) run on jaxfire's Engine in this process, each level once free and once with a
JSON schema (a list of words, so replies run to max_tokens like the free ones), `--repeats`
times alternated; prints the median output tok/s of each, their ratio, and the host time per
decode call spent filling the constrained rows' masks (p50, p99).

    python scripts/bench_structured.py --concurrency 1 8 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_serving import Result, percentile, run_level  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "words": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 60}
    },
    "required": ["words"],
}


async def level(engine, c: int, grammar: str | None, args) -> dict:
    from engine.requests import GenerationRequest
    from samplers import SamplingParams

    params = SamplingParams(temperature=0.7, top_p=0.9)

    async def send(prompt: str) -> Result:
        ids = engine.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        request = GenerationRequest(
            tuple(ids), params, max_tokens=args.max_tokens, ignore_eos=True, grammar=grammar
        )
        t0 = time.perf_counter()
        first = last = None
        tokens = 0
        async for u in engine.submit(request):
            now = time.perf_counter()
            if u.token_ids:
                first = first or now
                last = now
                tokens += len(u.token_ids)
        return Result(first is not None, (first or t0) - t0, (last or t0) - t0, tokens, [])

    n = max(args.min_requests, args.requests_per_client * c)
    return await run_level(c, n, send, args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--words", type=int, default=75)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--schema", type=json.loads, default=SCHEMA, help="JSON schema (JSON text)")
    args = p.parse_args(argv)
    args.server_pid = None

    from engine.api import Engine
    from serving.structured import response_format_grammar

    grammar = response_format_grammar(
        {"type": "json_schema", "json_schema": {"name": "bench", "schema": args.schema}}
    )
    engine = Engine.from_pretrained(
        args.model,
        max_slots=max(args.concurrency),
        max_len=args.max_len,
        background_compile=False,
    )
    masks = engine.scheduler.masks
    try:

        async def run() -> None:
            for g in (None, grammar):  # warm: the one-step programs compile on first need
                await level(engine, max(args.concurrency), g, args)
            for c in args.concurrency:
                rates: dict[str, list[float]] = {"free": [], "json_schema": []}
                fills: list[float] = []
                for r in range(args.repeats):
                    for name, g in [("free", None), ("json_schema", grammar)][:: 1 - 2 * (r % 2)]:
                        masks.fill_seconds.clear()
                        args.offset += 1000
                        row = await level(engine, c, g, args)
                        assert row["failed"] == 0, row["errors"]
                        rates[name].append(row["output_tokens_per_s"])
                        fills += list(masks.fill_seconds)
                free, constrained = (statistics.median(rates[k]) for k in rates)
                out = {
                    "concurrency": c,
                    "free_tok_s": free,
                    "json_schema_tok_s": constrained,
                    "ratio": round(constrained / free, 3),
                    "runs": rates,
                    "mask_fill_ms_p50": round(percentile(fills, 0.5) * 1e3, 3),
                    "mask_fill_ms_p99": round(percentile(fills, 0.99) * 1e3, 3),
                }
                print(json.dumps(out), flush=True)

        asyncio.run(run())
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
