"""float8 e4m3 (e4m3fn) storage with a scale, as vLLM's fp8 KV cache keeps K and V:
stored = e4m3(value / scale), read = stored * scale.

e4m3fn has 3 mantissa bits, so rounding to it is off by at most 2^-4 of the value in its
normal range (|x| >= 2^-6), and by at most 2^-10 (half its smallest subnormal) below that;
both scale with `scale`. It has no infinity: a cast past its largest finite value (448)
gives NaN, so values are clipped to +-448 first and saturate instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

E4M3 = jnp.dtype(jnp.float8_e4m3fn)
E4M3_MAX = float(jnp.finfo(E4M3).max)  # 448
RELATIVE_ERROR = 2.0**-4  # rounding, normal range
SUBNORMAL_ERROR = 2.0**-10  # rounding, absolute, below 2^-6


def to_e4m3(x: jax.Array, scale: float) -> jax.Array:
    """e4m3 codes of x / scale, saturated at +-448."""
    return jnp.clip(x.astype(jnp.float32) / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def from_e4m3(codes: jax.Array, scale: float, dtype: jnp.dtype) -> jax.Array:
    """The values e4m3 `codes` stand for, in `dtype`: cast (exact for bfloat16 and wider),
    times scale."""
    return codes.astype(dtype) * jnp.asarray(scale, dtype)
