"""The sampler's shortcuts (skip a pass no row needs, fall back when a cheap path fails) as
either a lax.cond or a branch-free select, chosen by the caller at trace time.

On CPU and TPU a lax.cond runs only the branch taken, which is what makes the shortcuts pay.
On GPU a conditional in the step reads its predicate back to the host, a sync per branch per
token; there `branchless=True` computes both branches and selects one. The select is on the
same scalar predicate, so every row gets exactly the values lax.cond would have given it.
"""

from collections.abc import Callable
from typing import Any

import jax


def when(
    pred: jax.Array,
    true_fn: Callable[..., Any],
    false_fn: Callable[..., Any],
    *operands: Any,
    branchless: bool,
) -> Any:
    """true_fn(*operands) if pred (a bool scalar) else false_fn(*operands): lax.cond, or both
    evaluated and selected when `branchless` (a static Python bool)."""
    if not branchless:
        return jax.lax.cond(pred, true_fn, false_fn, *operands)
    # lax.select, like lax.cond, insists both branches give the same shapes and dtypes.
    return jax.tree.map(
        lambda a, b: jax.lax.select(pred, a, b), true_fn(*operands), false_fn(*operands)
    )
