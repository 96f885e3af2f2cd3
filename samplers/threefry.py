"""Threefry-2x32 (20 rounds), the hash behind jax.random, written out round by round.

Why not jax.extend.random.threefry_2x32: on CPU, JAX lowers it as a 5-iteration while loop
(to compile faster), and inside the decode step that loop's per-iteration dispatch cost
~130 us a step, more than the hashing. Unrolled, XLA fuses the rounds into one pass. The
values are the same (tested against JAX's).
"""

import jax
import numpy as np

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _rotate_left(x: jax.Array, d: int) -> jax.Array:
    return (x << np.uint32(d)) | (x >> np.uint32(32 - d))


def threefry_2x32(
    key: tuple[jax.Array, jax.Array], x: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """The hash of the counter pairs x = (x0, x1) under key = (k0, k1), all uint32 arrays of
    one shape: what JAX's threefry_2x32 computes for each pair of its counter's two halves."""
    ks = (key[0], key[1], key[0] ^ key[1] ^ np.uint32(0x1BD11BDA))
    x0, x1 = x[0] + ks[0], x[1] + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = x0 ^ _rotate_left(x1, r)
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1
