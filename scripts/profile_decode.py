"""Where a decode step's time goes: the model with and without its LM head, and the head alone.

    python scripts/profile_decode.py [--batch 1] [--model smollm2-135m-instruct]
    taskset -c 0 python scripts/profile_decode.py    # one core: compute- or memory-bound?

Runs `steps` model steps (one token per row, packed weights when the CPU kernels apply,
attention over a 256-position window) in one jitted loop, so the figures are the model's
own, without the scheduler or the sampler. Medians over repeated runs, in ms a step.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import jax
import jax.numpy as jnp
from bench_sampling import median_ms  # scripts/ is on sys.path when run as a script

from engine import cpu_kernels
from engine.kv_cache import init_cache, one_page_per_slot
from engine.loading import load_model
from engine.model import Rows, Transformer, logits_from_hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    packed = cpu_kernels.available()
    model = load_model(args.model, packed=packed)
    config, params, batch, steps = model.config, model.params, args.batch, args.steps
    net = Transformer(config, jnp.float32, packed)
    cache = init_cache(config, batch, 1024, jnp.float32)
    tokens = jnp.ones((batch, 1), jnp.int32)
    positions = jnp.full((batch, 1), 150, jnp.int32)
    table = one_page_per_slot(batch)

    def loop(head: bool) -> Callable:
        @jax.jit
        def run(params, cache, tokens):
            def body(i, carry):
                cache, tokens = carry
                block = Rows(tokens, positions + i, table, kv_len=256, head=head)
                (out,), cache = net.apply({"params": params}, [block], cache)
                # The next token depends on this step's output, as in decoding.
                nxt = jnp.argmax(out[:, 0], axis=-1)[:, None].astype(jnp.int32)
                return cache, nxt % config.vocab_size

            return jax.lax.fori_loop(0, steps, body, (cache, tokens))

        return run

    with_head, without_head = loop(True), loop(False)
    hidden = jnp.ones((batch, 1, config.hidden_size), jnp.float32)
    head_only = jax.jit(lambda p, h: logits_from_hidden(p, h, config, packed))
    # Wall-clock medians (bench_sampling's helper), per model step.
    full = median_ms(lambda: with_head(params, cache, tokens), args.repeats)[0] / steps
    layers = median_ms(lambda: without_head(params, cache, tokens), args.repeats)[0] / steps
    head = median_ms(lambda: head_only(params, hidden), args.repeats * 4)[0]
    kernels = "the CPU kernels" if packed else "XLA's ops"
    print(f"batch {batch}, {kernels}, {jax.device_count()} device(s):")
    print(f"  model step, logits and argmax: {full:6.2f} ms")
    print(f"  model step without the head:   {layers:6.2f} ms  (the layers)")
    print(f"  difference:                    {full - layers:6.2f} ms  (head, argmax)")
    print(f"  the LM head alone:             {head:6.2f} ms")


if __name__ == "__main__":
    main()
