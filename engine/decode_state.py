"""What the decode programs carry between calls and hand back: the per-slot decode state,
a prompt chunk riding in a mixed step, and the k steps' outputs (engine.step)."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

import samplers
from engine.model import Rows


@flax.struct.dataclass
class DecodeState:
    tokens: jax.Array  # i32[S] the next input token of each slot
    positions: jax.Array  # i32[S] its position in the sequence
    active: jax.Array  # bool[S]
    remaining: jax.Array  # i32[S] tokens the slot may still generate
    stop_on_eos: jax.Array  # bool[S] false under ignore_eos
    logprobs: jax.Array  # bool[S] the request reads its tokens' logprobs
    # i32[S, pages_per_seq] the pages of each slot's sequence, sharded as the other per-slot
    # rows. The scheduler replaces it (a host copy) before a decode call when a sequence
    # gained or lost pages; an idle slot's row is all PAD_PAGE, where its writes land.
    page_table: jax.Array
    sampling: samplers.SamplingBatch

    @staticmethod
    def empty(page_table: np.ndarray, vocab_size: int, max_bias: int) -> DecodeState:
        """No slot active; `page_table` [S, pages_per_seq] is where each idle slot's decode
        writes land (every step writes each row's K/V at its position): the pad page."""
        slots = page_table.shape[0]
        # Separate buffers: the state is donated, and one buffer may be donated only once.
        zeros = lambda: jnp.zeros((slots,), jnp.int32)  # noqa: E731
        return DecodeState(
            tokens=zeros(),
            positions=zeros(),
            active=jnp.zeros((slots,), bool),
            remaining=zeros(),
            stop_on_eos=jnp.ones((slots,), bool),
            logprobs=jnp.zeros((slots,), bool),
            page_table=jnp.array(page_table, jnp.int32),
            sampling=samplers.SamplingBatch.empty(slots, vocab_size, max_bias),
        )

    def start(
        self,
        slot: jax.Array,
        token: jax.Array,
        position: jax.Array,
        remaining: jax.Array,
        stop_on_eos: jax.Array,
        logprobs: jax.Array,
        row: samplers.SamplingBatch,
    ) -> DecodeState:
        """Slot `slot` decoding from `token` at `position`, with the sampling state `row`."""
        return self.replace(
            tokens=self.tokens.at[slot].set(token),
            positions=self.positions.at[slot].set(position),
            active=self.active.at[slot].set(True),
            remaining=self.remaining.at[slot].set(remaining),
            stop_on_eos=self.stop_on_eos.at[slot].set(stop_on_eos),
            logprobs=self.logprobs.at[slot].set(logprobs),
            sampling=samplers.write_row(self.sampling, slot, row),
        )

    def stop(self, slot: jax.Array) -> DecodeState:
        return self.replace(
            active=self.active.at[slot].set(False),
            sampling=samplers.clear_row(self.sampling, slot),
        )

    def sampling_row(self, slot: jax.Array) -> samplers.SamplingBatch:
        """Slot `slot`'s sampling state (seed stream, penalty counts, mirostat mu) as a
        one-slot batch for start: a preempted sequence resumes drawing where it stopped."""
        return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1), self.sampling)


@flax.struct.dataclass
class Chunk:
    """A prompt chunk carried by a decode call's first step (a mixed step): tokens i32[1, C]
    (the first `length` real) at positions start .. start + C - 1 of the sequence whose pages
    are `pages` (a page-table row), whose positions before `start` hold it already."""

    tokens: jax.Array
    start: jax.Array  # i32 scalar
    length: jax.Array  # i32 scalar
    pages: jax.Array  # i32[pages_per_seq]

    def block(self) -> Rows:
        positions = self.start + jnp.arange(self.tokens.shape[1], dtype=jnp.int32)[None]
        return Rows(self.tokens, positions, self.pages[None], self.length, head=False)


@flax.struct.dataclass
class StepOutput:
    """What k decode steps produced; every field is [k, S, ...]."""

    tokens: jax.Array  # i32
    logprob: jax.Array  # f32 raw log-probability of the token
    sampling_logprob: jax.Array  # f32 under the distribution drawn from
    top_ids: jax.Array  # i32[k, S, N]
    top_logprobs: jax.Array  # f32[k, S, N]
    valid: jax.Array  # bool: the slot was live at this step
    finished: jax.Array  # bool: EOS or the token limit ended the slot at this step
