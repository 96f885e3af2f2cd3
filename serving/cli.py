"""`jaxfire serve | generate | convert`: the command line.

A user's mistake (a flag value out of range, a model that cannot be found or used) ends the
command with one line on stderr and exit status 2; anything else is a bug, logged with its
traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TextIO

import jax

from checkpoints import CheckpointError, registry
from engine import lockstep
from engine.admission import MAX_TOP_LOGPROBS
from engine.config import ConfigError
from engine.kv_cache import KV_CACHE_DTYPES, KV_DTYPE_ALIASES, CacheConfigError
from engine.loading import limit_heap_arenas
from engine.paging import parse_bytes
from engine.requests import (
    ContextLengthExceeded,
    InvalidRequest,
    SamplingParams,
    SamplingParamsError,
)
from engine.sharding import MeshError, make_mesh

log = logging.getLogger("jaxfire.cli")
LOG_LEVELS = ("debug", "info", "warning", "error")
# The project's typed errors that mean "the user asked for something impossible".
USER_ERRORS = (
    CheckpointError,
    ConfigError,
    CacheConfigError,
    SamplingParamsError,
    InvalidRequest,
    ContextLengthExceeded,
    MeshError,
)


def _int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi]; argparse names the flag in its error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            rule = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
            raise argparse.ArgumentTypeError(f"must be {rule}: {value}")
        return value

    return parse


def _bytes(text: str) -> int:
    """An argparse type: a size in bytes ("4GiB", "512MiB", "1000000")."""
    try:
        value = parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte: {text!r}")
    return value


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level", choices=LOG_LEVELS, default="info", help="jaxfire's (and uvicorn's)"
    )


def _engine_args(p: argparse.ArgumentParser) -> None:
    _common_args(p)
    p.add_argument(
        "--model", default=registry.DEFAULT_MODEL, help="registered name, HF folder or .gguf"
    )
    p.add_argument(
        "--max-seqs",
        "--max-slots",
        dest="max_seqs",
        type=_int_in(1),
        default=16,
        help="sequences decoded together (--max-slots: the old name)",
    )
    p.add_argument(
        "--max-len",
        type=_int_in(1),
        help="context window per sequence (default: the model's context length)",
    )
    p.add_argument(
        "--kv-cache-memory",
        type=_bytes,
        help="KV cache size, e.g. 4GiB (default: 90%% of free accelerator memory; 2GiB on CPU)",
    )
    p.add_argument(
        "--page-size", type=_int_in(1), help="tokens per KV cache page (default: per backend)"
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=("auto", *KV_CACHE_DTYPES, *KV_DTYPE_ALIASES),
        default="auto",
        help="KV cache storage (auto: the compute dtype; bfloat16/float16 halve a float32 "
        "cache and what each decode step reads, fp8 (e4m3) quarters it on XLA's ops)",
    )
    p.add_argument(
        "--tensor-parallel",
        type=_int_in(1),
        default=1,
        help='devices each model is split over (the mesh\'s "model" axis: heads, MLP '
        "columns, vocabulary)",
    )
    p.add_argument(
        "--data-parallel",
        type=_int_in(1),
        default=1,
        help='groups of devices decoding their own sequences (the mesh\'s "data" axis)',
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="compute dtype (auto: float32 on CPU, bfloat16 on GPU and TPU)",
    )
    p.add_argument(
        "--quantize",
        choices=("auto", "none", "int8", "fp8"),
        default="auto",
        help="weight-only quantization of the layers' matrices on XLA's path (auto: int8 for "
        "a GGUF file's 4/8-bit matrices on GPU and TPU, else none)",
    )
    p.add_argument("--decode-steps", type=_int_in(1), default=8, help="decode steps per host sync")
    p.add_argument(
        "--stream-rows",
        type=_int_in(0),
        default=8,
        help="while a request streams and at most this many sequences decode, one decode step "
        "per host sync, so each token is sent as it is made (0: never; wider batches that stream "
        "take at most 4 steps a sync)",
    )
    p.add_argument(
        "--prefill-budget",
        type=_int_in(1),
        default=4096,
        help="prompt tokens prefilled between two decode calls (lower: smoother streams)",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        "--prefill-chunk",
        dest="max_num_batched_tokens",
        type=_int_in(1),
        default=512,
        help="tokens one model call computes: a longer prompt is prefilled in chunks, each "
        "riding with the decoding sequences' next step (--prefill-chunk: the old name)",
    )
    p.add_argument(
        "--max-top-logprobs",
        type=_int_in(0, MAX_TOP_LOGPROBS),
        default=5,
        help=f"largest top_logprobs (0-{MAX_TOP_LOGPROBS})",
    )


def _configure_logging(level: str) -> None:
    """--log-level sets jaxfire's own loggers; other libraries (jax, orbax) log warnings and
    worse only, so `info` is jaxfire's progress, not theirs."""
    chosen = getattr(logging, level.upper())
    logging.basicConfig(
        level=max(chosen, logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        force=True,  # importing orbax already ran absl's own logging.basicConfig()
    )
    logging.getLogger("jaxfire").setLevel(chosen)


def _distributed_args(p: argparse.ArgumentParser, leader: str) -> None:
    p.add_argument(
        "--distributed",
        action="store_true",
        help="one of several host processes running the model together (jax.distributed; "
        f"detected on Cloud TPU VMs, else the three flags below): process 0 {leader}",
    )
    p.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address and a port")
    p.add_argument("--num-processes", type=_int_in(1), help="processes in all")
    p.add_argument("--process-id", type=_int_in(0), help="this process's number, from 0")


def _start_distributed(args: argparse.Namespace) -> None:
    """Join the other processes (before anything asks jax for devices)."""
    lockstep.initialize(args.coordinator, args.num_processes, args.process_id)
    # uvicorn raises SIGTERM again once it has shut down, under the handler it found: exit
    # through the engine's close (process 0's broadcasts the shutdown), rather than being
    # killed (or, under jax.distributed's preemption notifier, ignoring it).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def _load(args: argparse.Namespace, warmup: bool = True):
    """The engine; `warmup=False` compiles only what the first requests use (a one-shot
    `generate`), instead of every program a server needs."""
    registry.resolve(args.model)  # a wrong --model fails now, not after the kernels build
    limit_heap_arenas()
    distributed = getattr(args, "distributed", False)  # serve's and generate's flag
    if distributed:
        _start_distributed(args)
    mesh = make_mesh(args.data_parallel, args.tensor_parallel)  # likewise a mesh too big
    if distributed:
        lockstep.check_mesh(mesh)
    from engine.api import Engine

    log.info(
        "loading %s and compiling (first start converts and compiles; later starts reuse "
        "the cache)...",
        args.model,
    )
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(
        args.model,
        mesh=mesh,
        max_seqs=args.max_seqs,
        max_len=args.max_len,
        kv_cache_memory=args.kv_cache_memory,
        page_size=args.page_size,
        kv_cache_dtype=None if args.kv_cache_dtype == "auto" else args.kv_cache_dtype,
        dtype=None if args.dtype == "auto" else args.dtype,
        quantize=None if args.quantize == "auto" else args.quantize,
        decode_steps=args.decode_steps,
        stream_rows=args.stream_rows,
        prefill_budget=args.prefill_budget,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_top_logprobs=args.max_top_logprobs,
        warmup=warmup,
    )
    log.info("ready in %.1fs", time.perf_counter() - t0)
    return engine


def cmd_serve(args: argparse.Namespace) -> None:
    from serving.app import serve

    engine = _load(args)
    if args.distributed and jax.process_index() != 0:
        from serving.follower import follow

        follow(engine, args.host, args.port, log_level=args.log_level)
        return
    print(f"jaxfire serving {engine.name} on http://{args.host}:{args.port}/v1", flush=True)
    try:
        serve(
            engine,
            args.host,
            args.port,
            log_level=args.log_level,
            api_key=args.api_key or os.environ.get("JAXFIRE_API_KEY") or None,
            max_body_bytes=args.max_body_bytes,
        )
    finally:
        engine.close()  # stops the background compilation too, so Ctrl-C exits promptly


def _text_only_stdout() -> TextIO:
    """This process's stdout, kept for the generated text alone: file descriptor 1 goes to
    stderr from now on, where gloo's "[Gloo] Rank 1 is connected" lines then land (its CPU
    collectives print them on stdout, every process)."""
    sys.stdout.flush()
    text = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return text


def cmd_generate(args: argparse.Namespace) -> None:
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    request = dict(max_tokens=args.max_tokens)
    stdout = _text_only_stdout() if args.distributed else sys.stdout
    engine = _load(args, warmup=False)
    if args.distributed and jax.process_index() != 0:
        # Process 0 submits the request and broadcasts it (engine.lockstep); this process
        # runs the same programs with it until process 0 stops the engine, and prints nothing.
        engine.close()
        return
    try:
        if args.chat:
            [out] = engine.chat([{"role": "user", "content": args.prompt}], params, **request)
        else:
            [out] = engine.generate([args.prompt], params, **request)
    finally:
        engine.close()
    print(out.text, file=stdout, flush=True)


def cmd_convert(args: argparse.Namespace) -> None:
    from engine.loading import convert

    print(convert(args.src, args.dst, dtype=None if args.dtype == "auto" else args.dtype))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxfire", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI/Fireworks-compatible HTTP API")
    _engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_int_in(1, 65535), default=8000)
    serve.add_argument("--api-key", help="require this Bearer key (or set JAXFIRE_API_KEY)")
    serve.add_argument("--max-body-bytes", type=_int_in(1), default=2_000_000)
    _distributed_args(serve, "serves HTTP")
    serve.set_defaults(run=cmd_serve)

    gen = sub.add_parser("generate", help="complete one prompt and print the text")
    _engine_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--max-tokens", type=_int_in(0), default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    _distributed_args(gen, "prints the text, the others nothing")
    gen.set_defaults(run=cmd_generate, max_seqs=1)

    conv = sub.add_parser("convert", help="convert weights into a jaxfire (orbax) checkpoint")
    _common_args(conv)
    conv.add_argument("src", help="registered name, HF folder or .gguf file")
    conv.add_argument("dst", help="output folder")
    conv.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="the matrices' dtype (auto: the source's; a quantized GGUF tensor becomes "
        "float32); norm weights stay float32",
    )
    conv.set_defaults(run=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    alone = ("coordinator", "num_processes", "process_id")
    if not getattr(args, "distributed", True) and any(getattr(args, a) is not None for a in alone):
        parser.error("--coordinator, --num-processes and --process-id need --distributed")
    _configure_logging(args.log_level)
    try:
        args.run(args)
    except USER_ERRORS as e:
        message = " ".join(str(e).splitlines())  # one line, whatever the message holds
        print(f"jaxfire {args.command}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except Exception:
        log.exception("jaxfire %s failed unexpectedly (a bug)", args.command)
        sys.exit(1)


if __name__ == "__main__":
    main()
