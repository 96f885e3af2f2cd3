"""Perplexity of a model over a text file, from the engine's logits.

    python scripts/eval_perplexity.py FILE [--model NAME_OR_PATH] [--window 512]
        [--kv-cache-dtype fp8]

The text is cut into non-overlapping windows; each window's next-token cross-entropy
(optax) is averaged over every predicted token, and the perplexity is exp(mean loss). Every
position attends through the KV cache, stored as --kv-cache-dtype (default: the model's).
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from engine.kv_cache import init_cache, kv_dtype_named, one_page_per_slot
from engine.loading import LoadedModel, load_model
from engine.model import Rows, Transformer


def window_losses(model: LoadedModel, ids: np.ndarray, kv_dtype: jnp.dtype) -> np.ndarray:
    """Per-token cross-entropy of ids[1:] given the prefix, for one window [T]."""
    net = Transformer(model.config, model.dtype)
    cache = init_cache(model.config, 1, len(ids), kv_dtype)
    positions = np.arange(len(ids))[None]
    table = one_page_per_slot(1)
    (logits,), _ = jax.jit(net.apply)(
        {"params": model.params}, [Rows(ids[None], positions, table)], cache
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits[0, :-1], jnp.asarray(ids[1:]))
    return np.asarray(losses)


def perplexity(
    model: LoadedModel, text: str, window: int = 512, kv_dtype: str | jnp.dtype | None = None
) -> float:
    """exp(mean next-token loss) over `text`, the KV cache in `kv_dtype` (default: the
    model's dtype; "fp8" and the other KV cache dtypes of engine.kv_cache)."""
    kv_dtype = kv_dtype_named(kv_dtype or model.dtype)
    ids = np.asarray(model.tokenizer.encode(text, add_special_tokens=False), np.int32)
    losses = [
        window_losses(model, ids[i : i + window], kv_dtype)
        for i in range(0, len(ids) - 1, window)
        if len(ids[i : i + window]) > 1
    ]
    return math.exp(float(np.concatenate(losses).mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--kv-cache-dtype")
    args = parser.parse_args()
    model = load_model(args.model)
    with open(args.file, encoding="utf-8") as f:
        text = f.read()
    print(f"perplexity {perplexity(model, text, args.window, args.kv_cache_dtype):.4f}")


if __name__ == "__main__":
    main()
