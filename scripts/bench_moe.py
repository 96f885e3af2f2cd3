"""A small mixture-of-experts model on this machine: the routed layer per dispatch, and decode
tokens/s through the engine with each dispatch forced and with the automatic choice.

    python scripts/bench_moe.py [--batches 1 8 32] [--new 64] [--repeats 3]

The model is Mixtral-shaped, scaled down to fit a small machine (random weights, written
once into --folder by transformers, the default model's tokenizer): 8 layers, hidden 512,
8 experts of width 1536, top 2. Part 1 times engine.moe.routed_mlp alone on layer-sized
inputs of N tokens (median of many calls). Part 2 runs scripts/bench_decode.py's engine
round (B slots all decoding, 128-token prompts, greedy) in a fresh process per dispatch,
with engine.moe.dispatch replaced by the forced choice ("auto" keeps the engine's rule).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHAPE = dict(
    architectures=["MixtralForCausalLM"],
    model_type="mixtral",
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    tie_word_embeddings=False,
    sliding_window=None,
)
DISPATCHES = ("auto", "gather", "dense", "grouped")


def make_model(folder: Path) -> Path:
    """The random Mixtral-shaped HF folder, written once."""
    if (folder / "model.safetensors").exists():
        return folder
    import torch
    import transformers

    from checkpoints import registry

    tokenizer = registry.resolve(registry.DEFAULT_MODEL).open()
    vocab = tokenizer.config["vocab_size"]
    config = transformers.MixtralConfig(**SHAPE, vocab_size=vocab, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(folder)
    tokenizer.save_tokenizer(folder)
    return folder


def time_layer(tokens: int, how: str, repeats: int = 50) -> float:
    """Median seconds of one routed layer call on `tokens` tokens."""
    import jax
    import numpy as np

    from engine import moe
    from engine.config import ModelConfig

    config = ModelConfig.from_hf({**SHAPE, "vocab_size": 1000})
    rng = np.random.default_rng(0)
    e, d, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
    params = {
        "router": {"kernel": rng.normal(0, 1, (d, e)).astype(np.float32)},
        "experts": {
            "gate_up_proj": {"kernel": rng.normal(0, 0.02, (e, d, 2, i)).astype(np.float32)},
            "down_proj": {"kernel": rng.normal(0, 0.02, (e, i, d)).astype(np.float32)},
        },
    }
    params = jax.device_put(params)
    run = jax.jit(lambda x, p: moe.routed_mlp(x, p, config, jax.nn.silu, how))
    x = jax.device_put(rng.normal(size=(tokens, d)).astype(np.float32))
    run(x, params).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(x, params).block_until_ready()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode_run(folder: str, how: str, batches: list[int], new: int, repeats: int) -> None:
    """One process: the engine with `how` forced, decode tok/s per batch, as JSON lines."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_decode import bench_engine

    from engine import moe

    if how != "auto":
        moe.dispatch = lambda tokens, config, platform: how
    for batch in batches:
        r = bench_engine(folder, batch, new, repeats, max_len=512, k=4, quantize=None)
        print(json.dumps({"dispatch": how, "batch": batch, "decode_tps": r["decode_tps"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--folder", type=Path, default=Path("/tmp/jaxfire-bench-moe"))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--decode-run", nargs=1, help=argparse.SUPPRESS)  # internal: one dispatch
    args = p.parse_args()
    if args.decode_run:
        decode_run(str(args.folder), args.decode_run[0], args.batches, args.new, args.repeats)
        return
    print("routed layer alone (hidden 512, 8 experts of 1536, top 2), median ms per call:")
    for tokens in args.batches:
        row = {how: 1e3 * time_layer(tokens, how) for how in DISPATCHES[1:]}
        print(f"  {tokens:>3} tokens: " + "  ".join(f"{h} {ms:.3f}" for h, ms in row.items()))
    folder = make_model(args.folder)
    results: dict[tuple[str, int], float] = {}
    for how in DISPATCHES:
        cmd = [sys.executable, __file__, "--folder", str(folder), "--decode-run", how]
        cmd += ["--batches", *map(str, args.batches), "--new", str(args.new)]
        cmd += ["--repeats", str(args.repeats)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                results[(r["dispatch"], r["batch"])] = r["decode_tps"]
    print("engine decode tok/s (Mixtral-shaped random model, greedy, 128-token prompts):")
    for batch in args.batches:
        cells = "  ".join(f"{how} {results[(how, batch)]:7.1f}" for how in DISPATCHES)
        print(f"  batch {batch:>2}: {cells}")


if __name__ == "__main__":
    main()
