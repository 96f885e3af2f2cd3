"""Compiled programs kept by the engine itself, so jax's caches can be emptied.

A jitted function keeps, per argument signature, its traced jaxpr and lowering in jax's
caches as well as its executable: on the CPU ~220 MiB of a warmed-up server's memory was
those caches' (jaxprs and MLIR of every program, most never needed again). Every program a
step calls is held here (or as the decode and extension programs, by Programs), compiled
ahead of its call, so `forget_traces` can empty jax's caches once warm-up or a background
compilation is done without dropping an executable.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def signature(args: tuple) -> tuple:
    """What picks a compiled program for these arguments: their tree, and each leaf's shape,
    dtype (a Python scalar's type) and, for a jax array, placement (a numpy array or scalar
    is placed by the program). Read off the leaves, not resolved by jax: ~3x faster."""
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple(
        (
            np.shape(x),
            getattr(x, "dtype", type(x)),
            x.sharding if isinstance(x, jax.Array | jax.ShapeDtypeStruct) else None,
        )
        for x in leaves
    )


class Held:
    """A jitted function called through the programs it compiled, one per signature."""

    def __init__(self, jitted: Any):
        self.jitted = jitted
        self._programs: dict[tuple, Any] = {}

    def compiled(self, *args: Any) -> Any:
        """The program for these arguments (arrays or jax.ShapeDtypeStructs), compiled on
        first use."""
        key = signature(args)
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = self.jitted.lower(*args).compile()
        return program

    def __call__(self, *args: Any) -> Any:
        return self.compiled(*args)(*args)


def forget_traces() -> None:
    """Empty jax's tracing, lowering and executable caches (jax.clear_caches): what the held
    programs need they hold. A jitted call not held retraces afterwards, and its executable
    comes from the persistent compilation cache."""
    jax.clear_caches()
