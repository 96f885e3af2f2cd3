"""Sampling: pure functions on logits, one row of parameters per decode slot."""

from samplers import mask
from samplers.params import (
    SamplingBatch,
    SamplingParams,
    SamplingParamsError,
    clear_row,
    fork_row,
    make_row,
    write_row,
)
from samplers.pipeline import LogprobInfo, filtered_logits, sample

__all__ = [
    "LogprobInfo",
    "SamplingBatch",
    "SamplingParams",
    "SamplingParamsError",
    "clear_row",
    "filtered_logits",
    "fork_row",
    "make_row",
    "mask",
    "sample",
    "write_row",
]
