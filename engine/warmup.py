"""Warm-up: the programs serving uses, compiled (and run on the pad page) before the first
request, so no request waits for a compilation; the rest compiled afterwards.

Slot start/stop, page copy, the full-width decode programs attending up to WARM_KV_LEN
positions, the extension by a chunk and what a short prompt takes are compiled first: on
XLA's ops each prefill bucket up to a chunk with its insert and prompt logprobs (run,
writing only into the pad page), on the CPU kernels each extension bucket up to a chunk and
the prefill, insert and prompt logprobs of a chunk (a short prompt with prompt logprobs is
prefilled whole in it). Longer prompts are prefilled in chunks; only a prompt with prompt
logprobs is prefilled whole, in a larger bucket: those are compiled last, without running
them, for the persistent cache.

The narrowest decode program (a lone request) compiles before serving too: on the full-width
one a lone client got half its speed until the background caught up, minutes on a cold cache.

What `warm_up` returns compiles the rest, one program at a time and only while the engine is
idle, so it never slows what runs (on a 2-core CPU a compilation took a core from decoding):
the mixed decode programs (all slots, carrying a chunk of a long prompt; none on the CPU
kernels: Programs.mixes_chunks), the other decode programs narrower than all slots or
attending past WARM_KV_LEN, the programs computing several short prompts in one call, the
extensions shorter than a chunk and the whole prompts with prompt logprobs. Until one is
ready the scheduler runs a chunk alone before the decode call, uses the next wider decode
and pads a short extension to a chunk (a decode of a longer context compiles on first use),
so startup does not grow with max_len.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

import samplers
from engine.held import forget_traces
from engine.loading import return_freed_memory
from engine.scheduler import Scheduler

log = logging.getLogger("jaxfire.engine")

# Decode programs attending to at most this many positions compile before serving; longer
# ones in the background (or on first use), so startup does not grow with max_len.
WARM_KV_LEN = 2048


class Later:
    """Programs left for after warm-up, compiled one at a time once `idle()` has held for
    `quiet_s` (a closed-loop client's next request follows its last within milliseconds: a
    compilation started in that gap slowed it); run() stops early once `closing` is set.
    `pending` counts the programs not compiled yet."""

    def __init__(
        self,
        jobs: list[Callable[[], object]],
        idle: Callable[[], bool],
        closing: threading.Event,
        quiet_s: float = 2.0,
    ):
        self.jobs, self.idle, self.closing, self.quiet_s = jobs, idle, closing, quiet_s
        self.pending = len(jobs)

    def run(self) -> None:
        if not self.jobs:
            return
        log.info("compiling %d more programs in the background, while idle", self.pending)
        start = time.perf_counter()
        for job in self.jobs:
            if not self._quiet():
                return
            job()
            self.pending -= 1
            forget_traces()
            return_freed_memory()
        log.info("background compilation done in %.1fs", time.perf_counter() - start)

    def _quiet(self) -> bool:
        """Wait until the engine has been idle for quiet_s; False if closing meanwhile."""
        since = None
        while not self.closing.is_set():
            now = time.monotonic()
            since = (since or now) if self.idle() else None
            if since is not None and now - since >= self.quiet_s:
                return True
            self.closing.wait(0.05)
        return False


def warm_up(s: Scheduler, vocab_size: int, closing: threading.Event) -> Later:
    """Compile and run what the first requests use; returns what compiles the rest."""
    p, prefill = s.p, s.prefiller
    pad_row = np.zeros(p.pages_per_seq, np.int32)  # every page the pad page
    fresh = [b for b in prefill.scored_buckets if b <= prefill.chunk_bucket]
    for T in fresh:
        tokens = np.zeros((1, T), np.int32)
        rows, hidden = p.prefill(s.params, tokens, np.int32(T))
        s.cache = p.insert(s.cache, rows, pad_row)
        jax.block_until_ready(p.prompt_logprobs(s.params, hidden, tokens))
    row = samplers.make_row(samplers.SamplingParams(), vocab_size, s.s.max_bias, [0], 0)
    zero = np.int32(0)
    yes = np.bool_(True)
    s.state = p.start_slot(s.state, zero, zero, zero, zero, yes, yes, row)
    s.state = p.start_slot(s.state, zero, zero, zero, zero, yes, yes, p.sampling_row(s.state, zero))
    s.state = p.stop_slot(s.state, zero)
    s.cache = p.copy_page(s.cache, zero, zero)
    jax.block_until_ready((s.state, s.cache))
    shapes = s.program_shapes()
    k, widest = s.s.decode_steps, s.slot_buckets[-1]
    first = [kv for kv in s.kv_buckets if kv <= WARM_KV_LEN] or s.kv_buckets[:1]
    now = [(kv, rows) for kv in first for rows in sorted({s.slot_buckets[0], widest})]
    for kv_len, rows in now:
        p.decoder(*shapes, k=k, kv_len=kv_len, rows=rows)
    # A long prompt's chunks; on the CPU kernels every prompt's extension, of each bucket.
    for T in prefill.extend_buckets if not prefill.fresh_prefill else [prefill.chunk_bucket]:
        p.extender(*shapes[:2], T)

    # Mixed programs (a decode call carrying a prompt chunk), when prompts get chunked.
    width = s.s.max_num_batched_tokens - widest
    chunked = p.mixes_chunks and s.s.max_num_batched_tokens < s.s.max_len
    mixed = [kv for kv in first if width > 0 and chunked]
    s.compile_on_demand = False
    jobs = [
        lambda kv=kv: p.decoder(*shapes, k=k, kv_len=kv, rows=widest, chunk=width) for kv in mixed
    ]
    decodes = [(kv, r) for r in s.slot_buckets for kv in s.kv_buckets]
    jobs += [
        lambda kv=kv, r=r: p.decoder(*shapes, k=k, kv_len=kv, rows=r)
        for kv, r in decodes
        if (kv, r) not in now
    ]
    if p.branchless and k > 1 and s.s.stream_rows:  # GPU: one-step programs of their own
        jobs += [
            lambda kv=kv, r=r: p.decoder(*shapes, k=1, kv_len=kv, rows=r)
            for kv, r in decodes
            if r <= s.s.stream_rows
        ]
    # Short prompts admitted together, several to a call (Prefiller.groups).
    jobs += [lambda G=G, T=T: p.extender(*shapes[:2], T, G) for G, T in prefill.group_shapes]
    short = [T for T in prefill.extend_buckets if not p.extend_ready(T)]
    jobs += [lambda T=T: p.extender(*shapes[:2], T) for T in short]
    # A whole prompt with prompt logprobs, in the buckets no served prompt has run yet.
    scored = [T for T in prefill.scored_buckets if T not in fresh]
    jobs += [lambda T=T: p.compile_prefill(*shapes[:2], T) for T in scored]
    forget_traces()
    return_freed_memory()
    return Later(jobs, lambda: not s._busy(), closing)
