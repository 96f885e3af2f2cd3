"""Sampling: pure functions on logits, one row of parameters per decode slot."""

from samplers.params import (
    SamplingBatch,
    SamplingParams,
    SamplingParamsError,
    clear_row,
    fork_row,
    make_row,
    write_row,
)

__all__ = [
    "SamplingBatch",
    "SamplingParams",
    "SamplingParamsError",
    "clear_row",
    "fork_row",
    "make_row",
    "write_row",
]
