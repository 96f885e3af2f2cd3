"""Decode throughput of the default model, beside HF transformers on the same weights.

    python scripts/bench_decode.py [--quick] [--batches 1 8 32 64] [--repeats 3]

For each batch size B, an engine with exactly B slots (all busy) serves B requests of
128-token prompts and 128 new tokens (ignore_eos, greedy). The engine prefills the whole
batch before it decodes (as HF's static batch does), and decode tokens/s is the tokens
generated after each request's first update over the wall time from the first of those
updates to the last token. Beside it, HF transformers (PyTorch CPU) on the same GGUF
weights, float32 and bfloat16: `generate` on a static batch, decode rate =
B * (new - 1) / (time(new tokens) - time(1 token)). Also: time to first token for one
128-token prompt, the batch-1 bytes read per token against the memory read bandwidth
measured in the same run, and decode_steps k in {1, 4, 8} at batch 8. Every figure is a median
over repeats; the other CPU load seen during each phase is printed beside it (thread
barriers make 2-core figures sensitive to it).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from pathlib import Path

import numpy as np

PROMPT = 128
DEVICE = "cpu"  # HF's device: set to "cuda" in main() when torch sees a GPU


# ---- the machine ---------------------------------------------------------------------
class Load:
    """CPU time used by other processes during a phase, in cores (from /proc/stat)."""

    def __enter__(self) -> Load:
        self.t, self.busy, self.own = time.perf_counter(), _busy_s(), _own_s()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t
        self.other = max(0.0, (_busy_s() - self.busy) - (_own_s() - self.own)) / max(wall, 1e-9)


def _busy_s() -> float:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def read_bandwidth(mb: int = 1024, repeats: int = 5) -> float:
    """GB/s read by summing a touched buffer, one slice per CPU in threads (numpy releases
    the GIL), as the decode's matrix-vector products read the weights: the best repeat."""
    import concurrent.futures

    buf = np.ones(mb * 2**20 // 4, np.float32)
    parts = np.array_split(buf, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(len(parts)) as pool:
        times = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            list(pool.map(np.sum, parts))
            times.append(time.perf_counter() - t)
    return buf.nbytes / min(times[1:]) / 1e9


def copy_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """GB/s of a numpy copy between two preallocated, touched buffers (bytes copied / s;
    the best of the repeats, as a limit should be)."""
    src = np.ones(mb * 2**20 // 8)
    dst = np.zeros_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return src.nbytes / min(times) / 1e9


# ---- jaxfire -------------------------------------------------------------------------
def prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(100, vocab, size=(n, PROMPT)).tolist()


def engine_round(engine, batch: int, new: int, seed: int) -> dict:
    """B requests at once; decode tokens/s after the first update, and time to first token."""
    from engine.requests import GenerationRequest
    from samplers import SamplingParams

    greedy = SamplingParams(temperature=0.0)
    handles = [
        engine.submit(GenerationRequest(tuple(p), greedy, max_tokens=new, ignore_eos=True))
        for p in prompts(batch, engine.vocab_size, seed)
    ]
    first_tokens, total = 0, 0
    for h in handles:
        for i, u in enumerate(h):
            first_tokens += len(u.token_ids) if i == 0 else 0
            total += len(u.token_ids)
    assert total == batch * new, (total, batch * new)
    firsts = [h.submitted + h.timing.time_to_first_token_s for h in handles]
    ends = [f + h.timing.decode_s for f, h in zip(firsts, handles, strict=True)]
    return {
        "decode_tps": (total - first_tokens) / (max(ends) - min(firsts)),
        "ttft_s": statistics.median(h.timing.time_to_first_token_s for h in handles),
    }


def bench_engine(
    model: str, batch: int, new: int, repeats: int, max_len: int, k: int, quantize: str | None
) -> dict:
    from engine.api import Engine

    t = time.perf_counter()
    # The whole batch is prefilled before decoding starts, as HF's static batch is: the
    # decode rate is then measured over a window where every slot is decoding.
    engine = Engine.from_pretrained(
        model,
        max_slots=batch,
        max_len=max_len,
        decode_steps=k,
        max_queue=max(256, batch),
        prefill_budget=batch * PROMPT,
        warmup=False,
        quantize=quantize,
    )
    engine_round(engine, batch, 2 * k, seed=0)  # compiles what the rounds use, no more
    startup = time.perf_counter() - t
    runs = []
    with Load() as load:
        for r in range(repeats):
            runs.append(engine_round(engine, batch, new, seed=1 + r))
    params = engine.scheduler.params
    packed = engine.programs.model.packed
    weights = sum(x.nbytes for x in _leaves(params))
    if packed and "embed_tokens" in params:  # untied: the embedding is only looked up
        weights -= params["embed_tokens"].nbytes
    cfg = engine.config
    engine.close()
    return {
        "decode_tps": statistics.median(x["decode_tps"] for x in runs),
        "ttft_s": statistics.median(x["ttft_s"] for x in runs),
        "startup_s": startup,
        "other_load": load.other,
        "weight_bytes": weights,
        "packed": packed,
        "config": cfg,
    }


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


# ---- HF transformers -----------------------------------------------------------------
def hf_model(name: str, dtype_name: str):
    """The same weights in transformers, on the GPU when there is one."""
    import torch
    from transformers import AutoModelForCausalLM

    from checkpoints import registry

    if (Path(name) / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(name)
    else:
        gguf = registry.resolve(name).source
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.to(DEVICE, getattr(torch, dtype_name)).eval()


def hf_generate(model, batch: int, new: int, seed: int) -> tuple[float, float]:
    """One static-batch greedy generate; (time to first token, decode tokens/s).

    A pass-through logits processor stamps every step, so the decode phase is timed
    inside the same generate call (no subtraction of two noisy runs)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if DEVICE == "cuda":
                torch.cuda.synchronize()  # the step's kernels are queued, not yet run
            stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor(prompts(batch, model.config.vocab_size, seed), device=DEVICE)
    kw = dict(
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        min_new_tokens=new,
        max_new_tokens=new,
        pad_token_id=0,
        logits_processor=LogitsProcessorList([Stamp()]),
    )
    with torch.inference_mode():
        t = time.perf_counter()
        out = model.generate(ids, **kw)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter()
    assert out.shape == (batch, PROMPT + new) and len(stamps) == new
    return stamps[0] - t, batch * (new - 1) / (end - stamps[0])


def bench_hf(model, batch: int, new: int, repeats: int) -> dict:
    hf_generate(model, batch, 2, seed=0)  # warm
    with Load() as load:
        runs = [hf_generate(model, batch, new, seed=r) for r in range(repeats)]
    return {
        "ttft_s": statistics.median(r[0] for r in runs),
        "decode_tps": statistics.median(r[1] for r in runs),
        "other_load": load.other,
    }


# ---- report --------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batches 1 and 8, 32 new tokens")
    parser.add_argument("--batches", type=int, nargs="*", default=None)
    parser.add_argument("--new", type=int, default=None, help="new tokens (default 128)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--k", type=int, default=8, help="decode_steps (the engine's default)")
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument(
        "--quantize", choices=("none", "int8", "fp8"), help="jaxfire's --quantize (default: auto)"
    )
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="registered name, checkpoint or HF folder (scripts/random_model.py makes one)",
    )
    args = parser.parse_args()
    batches = args.batches or ([1, 8] if args.quick else [1, 8, 32, 64])
    new = args.new or (32 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)
    ks = [1, 8] if args.quick else [1, 4, 8]

    import jax
    import torch

    global DEVICE
    DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    on_cpu = jax.default_backend() == "cpu"
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, ", end="")
    print(f"torch {torch.__version__} on {DEVICE}, ", end="")
    print(f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}; model {args.model}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if on_cpu:
        bandwidth = read_bandwidth()
        print(
            f"memory read bandwidth (threaded sum): {bandwidth:.1f} GB/s; "
            f"numpy copy between touched buffers: {copy_bandwidth():.1f} GB/s"
        )
    print(f"prompts {PROMPT} tokens, {new} new tokens, medians of {repeats} (fewer at B>=32)\n")

    jf: dict[int, dict] = {}
    for b in batches:
        reps = repeats if b <= 8 else max(1, repeats - 1)
        jf[b] = bench_engine(args.model, b, new, reps, args.max_len, args.k, args.quantize)
        print(
            f"jaxfire B={b:3d} k={args.k}: {jf[b]['decode_tps']:8.1f} tok/s decode, "
            f"median TTFT in the burst {jf[b]['ttft_s'] * 1e3:6.0f} ms  "
            f"(start-up {jf[b]['startup_s']:.0f} s, "
            f"other load {jf[b]['other_load']:.2f} cores)",
            flush=True,
        )

    hf: dict[str, dict[int, dict]] = {}
    if not args.no_hf:
        for dtype in ("float32", "bfloat16"):
            model = hf_model(args.model, dtype)
            hf[dtype] = {}
            for b in batches:
                reps = repeats if b <= 8 else max(1, repeats - 1)
                hf[dtype][b] = bench_hf(model, b, new, reps)
                r = hf[dtype][b]
                print(
                    f"HF {dtype:8s} B={b:3d}: {r['decode_tps']:8.1f} tok/s decode, "
                    f"TTFT {r['ttft_s'] * 1e3:6.0f} ms  (other load {r['other_load']:.2f} cores)",
                    flush=True,
                )
            del model

    print("\nk sweep at batch 8:")
    sweep = {}
    for k in ks:
        if k == args.k and 8 in jf:
            sweep[k] = jf[8]
        else:
            sweep[k] = bench_engine(args.model, 8, new, repeats, args.max_len, k, args.quantize)
        print(
            f"  k={k}: {sweep[k]['decode_tps']:8.1f} tok/s "
            f"(other load {sweep[k]['other_load']:.2f} cores)",
            flush=True,
        )
    best = max(sweep, key=lambda k: sweep[k]["decode_tps"])
    print(f"  best k at batch 8: {best}")

    print("\nsummary (decode tok/s; ratio = jaxfire / HF):")
    print(f"{'B':>4} {'jaxfire':>9} {'HF fp32':>9} {'ratio':>6} {'HF bf16':>9} {'ratio':>6}")
    for b in batches:
        row = f"{b:4d} {jf[b]['decode_tps']:9.1f}"
        for dtype in hf:
            h = hf[dtype][b]["decode_tps"]
            row += f" {h:9.1f} {jf[b]['decode_tps'] / h:6.2f}"
        print(row)
    if 1 in jf:
        b1 = jf[1]
        line = f"TTFT (128-token prompt, B=1, includes k={args.k} decode steps): "
        line += f"jaxfire {b1['ttft_s'] * 1e3:.0f} ms"
        for dtype in hf:
            h = hf[dtype][1]["ttft_s"]
            line += f", HF {dtype} {h * 1e3:.0f} ms (ratio {h / b1['ttft_s']:.2f}x faster)"
        print(line)
        if hf:
            best_hf = max(hf[d][1]["decode_tps"] for d in hf)
            print(f"batch-1 vs HF's best batch-1: {b1['decode_tps'] / best_hf:.2f}x")
    if 1 in jf and on_cpu:  # the memory-bandwidth bound of a CPU's batch-1 decode
        b1 = jf[1]
        cfg = b1["config"]
        # The CPU attention kernel reads the positions each token sees (on average the prompt
        # and half the new tokens); XLA's attention reads the whole bucket above them.
        if b1["packed"]:
            kv_len, seen = PROMPT + new // 2, "mean positions seen"
        else:
            kv_len, seen = (256 if PROMPT + new <= 256 else args.max_len), "attended bucket"
        kv = cfg.num_layers * 2 * cfg.num_kv_heads * kv_len * cfg.head_dim * 4
        weights = b1["weight_bytes"]
        per_token = weights + kv
        limit = bandwidth * 1e9 / per_token
        print(
            f"batch-1 bytes per token: {weights / 1e6:.0f} MB weights + {kv / 1e6:.1f} MB KV "
            f"({seen} {kv_len}) = {per_token / 1e6:.0f} MB; at {bandwidth:.1f} GB/s "
            f"the limit is {limit:.1f} tok/s; measured {b1['decode_tps']:.1f} tok/s = "
            f"{100 * b1['decode_tps'] / limit:.0f}% of it"
        )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
