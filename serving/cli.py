"""`jaxfire serve | generate | convert`: the command line."""

from __future__ import annotations

import argparse
import os
import sys
import time

from checkpoints.registry import DEFAULT_MODEL


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help="registered name, HF folder or .gguf")
    p.add_argument("--max-slots", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-len", type=int, default=2048, help="context window per sequence")
    p.add_argument("--decode-steps", type=int, default=4, help="decode steps per host sync")
    p.add_argument(
        "--prefill-budget",
        type=int,
        default=4096,
        help="prompt tokens prefilled between two decode calls (lower: smoother streams)",
    )
    p.add_argument("--max-top-logprobs", type=int, default=5, help="largest top_logprobs (<=20)")


def _load(args: argparse.Namespace, warmup: bool = True):
    """The engine; `warmup=False` compiles only what the first requests use (a one-shot
    `generate`), instead of every program a server needs."""
    from engine.api import Engine

    print(
        f"loading {args.model} and compiling (first start converts and compiles; "
        "later starts reuse the cache)...",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(
        args.model,
        max_slots=args.max_slots,
        max_len=args.max_len,
        decode_steps=args.decode_steps,
        prefill_budget=args.prefill_budget,
        max_top_logprobs=args.max_top_logprobs,
        warmup=warmup,
    )
    print(f"ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return engine


def cmd_serve(args: argparse.Namespace) -> None:
    from serving.app import serve

    engine = _load(args)
    print(f"jaxfire serving {engine.name} on http://{args.host}:{args.port}/v1", flush=True)
    try:
        serve(
            engine,
            args.host,
            args.port,
            api_key=args.api_key or os.environ.get("JAXFIRE_API_KEY") or None,
            max_body_bytes=args.max_body_bytes,
        )
    finally:
        engine.close()  # stops the background compilation too, so Ctrl-C exits promptly


def cmd_generate(args: argparse.Namespace) -> None:
    from samplers import SamplingParams

    engine = _load(args, warmup=False)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    request = dict(max_tokens=args.max_tokens)
    if args.chat:
        [out] = engine.chat([{"role": "user", "content": args.prompt}], params, **request)
    else:
        [out] = engine.generate([args.prompt], params, **request)
    print(out.text)
    engine.close()


def cmd_convert(args: argparse.Namespace) -> None:
    from engine.loading import convert

    print(convert(args.src, args.dst))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jaxfire", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI/Fireworks-compatible HTTP API")
    _engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require this Bearer key (or set JAXFIRE_API_KEY)")
    serve.add_argument("--max-body-bytes", type=int, default=2_000_000)
    serve.set_defaults(run=cmd_serve)

    gen = sub.add_parser("generate", help="complete one prompt and print the text")
    _engine_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.set_defaults(run=cmd_generate, max_slots=1, max_len=1024)

    conv = sub.add_parser("convert", help="convert weights into a jaxfire (orbax) checkpoint")
    conv.add_argument("src", help="registered name, HF folder or .gguf file")
    conv.add_argument("dst", help="output folder")
    conv.set_defaults(run=cmd_convert)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
