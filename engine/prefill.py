"""Computing a sequence's K/V into its pages before it decodes: the device side of a fill.

On XLA's ops a prompt that is all new and fits one chunk goes through the prefill program
(attention within the new tokens only; on a GPU cuDNN's flash attention) and is inserted
into its pages; anything else (the rest after the prefix cache's pages, a chunk of a long
prompt, a preempted sequence's recompute) extends what its pages hold. On the CPU kernels
every prompt is an extension: from position 0 the same kernel does a fresh prefill's
arithmetic, straight into the pages. A request asking for prompt logprobs is prefilled
whole, for the hidden states of every prompt position.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from engine.buckets import bucket_for, buckets
from engine.handle import Handle
from engine.requests import TokenLogprob
from engine.step import Programs


class Prefiller:
    def __init__(self, programs: Programs, params: Any, min_bucket: int, max_len: int, chunk: int):
        self.p, self.params = programs, params
        # Prompts pad to the next bucket. On XLA's ops a prefill costs its padded length:
        # with midpoints a prompt pays less than half again its own length, not up to
        # double. The CPU kernels skip padding rows, so there few buckets do (each compiled
        # program holds ~30 MB of the server's memory).
        packed = programs.model.packed
        sizes = buckets(min_bucket, max_len, not packed, 4 if packed else 2)
        # A chunk (the token budget of a call) is a bucket of its own: the largest program a
        # chunk needs; warm-up compiles up to it only.
        self.chunk_bucket = min(chunk, max_len)
        self.buckets = sorted({*sizes, self.chunk_bucket})
        # Extensions shorter than a chunk (a chat turn after its template's cached page, and
        # on the kernels a short prompt) take their own buckets: the kernels skip padding
        # rows, but the XLA ops between them and the zero fill of their outputs do not (a
        # 100-token extension took 164.7 ms padded to 512 tokens, 145.0 ms to 256).
        self.extend_buckets = [b for b in self.buckets if b <= self.chunk_bucket]
        # Whether a prompt all new is prefilled by the prefill program and inserted. On the
        # CPU kernels an extension from position 0 is the same arithmetic, with no prefill
        # and insert programs to hold (~33 MiB a bucket with prompt logprobs'): only prompt
        # logprobs use them there, from a chunk's bucket up (a short prompt's padding costs
        # its LM head rows, for the rare request that scores a prompt).
        self.fresh_prefill = not packed
        self.scored_buckets = [b for b in self.buckets if not packed or b >= self.chunk_bucket]
        # Short prompts admitted together are computed several to a call, each a row of
        # chunk / G tokens, sharing each weight read (G in 8, 4, 2; none below a bucket).
        self.group_shapes = [
            (G, self.chunk_bucket // G) for G in (8, 4, 2) if self.chunk_bucket // G >= min_bucket
        ]
        # The CPU kernels compute each row's padding but the last one's: there a group must
        # not compute more than a quarter again its tokens. On an accelerator a short call
        # costs its weight reads far more than its tokens.
        self.slack = 1.25 if packed else None

    def compute(
        self, cache: Any, ids: np.ndarray, start: int, n: int, whole: bool, pages: np.ndarray
    ) -> Any:
        """The cache with the K/V of ids[start : start + n] at those positions of the
        sequence whose page-table row is `pages`. `whole`: these are all its positions
        (start = 0), computed by the prefill program where there is one (fresh_prefill)."""
        T = bucket_for(n, self.buckets)
        if whole and self.fresh_prefill:
            tokens = np.zeros((1, T), np.int32)
            tokens[0, :n] = ids[:n]
            rows, _ = self.p.prefill(self.params, tokens, np.int32(n))
            return self.p.insert(cache, rows, pages)
        if n <= self.chunk_bucket:
            T = self.extend_bucket(n)
        return self._extend(cache, [(ids[start : start + n], start, pages)], T)

    def extend_bucket(self, n: int) -> int:
        """The program extending a sequence by n tokens (at most a chunk): the smallest
        extension bucket holding them if compiled, else the chunk's (compiled at warm-up: a
        padded chunk beats a compile now)."""
        T = bucket_for(n, self.extend_buckets)
        return T if self.p.extend_ready(T) else self.chunk_bucket

    def groups(self, sizes: list[int], on_demand: bool) -> list[list[int]]:
        """The spans of `sizes` tokens each (at most a chunk), as the calls that compute them:
        lists of indices, several to a call (shortest first, so a group pads little) where
        a group program is compiled (or `on_demand`) and its padding costs little."""
        order = sorted((i for i in range(len(sizes)) if sizes[i]), key=lambda i: sizes[i])
        out = [[i] for i in range(len(sizes)) if not sizes[i]]  # nothing to compute
        while order:
            size = 1
            for G, T in self.group_shapes:
                take = [sizes[i] for i in order[:G]]
                if (
                    len(take) == G
                    and take[-1] <= T
                    and (on_demand or self.p.extend_ready(T, G))
                    and (self.slack is None or (G - 1) * T + take[-1] <= self.slack * sum(take))
                ):
                    size = G
                    break
            out.append(order[:size])
            order = order[size:]
        return out

    def compute_group(self, cache: Any, spans: list[tuple[np.ndarray, int, np.ndarray]]) -> Any:
        """The cache with the K/V of G spans (a sequence's new token ids, the position of the
        first, its page-table row) computed in one call of a group program."""
        [T] = [T for G, T in self.group_shapes if G == len(spans)]
        return self._extend(cache, spans, T)

    def _extend(self, cache: Any, spans: list[tuple[np.ndarray, int, np.ndarray]], T: int) -> Any:
        G = len(spans)
        tokens = np.zeros((G, T), np.int32)
        for g, (ids, _, _) in enumerate(spans):
            tokens[g, : len(ids)] = ids
        starts = np.asarray([start for _, start, _ in spans], np.int32)
        lengths = np.asarray([len(ids) for ids, _, _ in spans], np.int32)
        pages = np.stack([row for _, _, row in spans])
        extend = self.p.extender(self.params, cache, T, G)
        return extend(self.params, cache, tokens, starts, lengths, pages)

    def scored(self, handle: Handle, ids: np.ndarray) -> Any:
        """Prefill the whole prompt (all but its last token), setting the handle's prompt
        logprobs; the K/V rows to insert (None for a one-token prompt)."""
        P, n_top = len(ids), handle.request.top_logprobs or 0
        if P == 1:
            handle.prompt_logprobs = (TokenLogprob(int(ids[0]), None, None),)
            return None
        T = bucket_for(P - 1, self.scored_buckets)
        tokens, targets = np.zeros((2, 1, T), np.int32)
        tokens[0, : P - 1], targets[0, : P - 1] = ids[:-1], ids[1:]
        rows, hidden = self.p.prefill(self.params, tokens, np.int32(P - 1))
        chosen, top_ids, top_lp = jax.device_get(
            self.p.prompt_logprobs(self.params, hidden, targets)
        )
        # Entry i is token i of the prompt given tokens < i; the first has no context.
        entries = [TokenLogprob(int(ids[0]), None, None)]
        for i in range(1, P):
            top = zip(top_ids[i - 1, :n_top].tolist(), top_lp[i - 1, :n_top].tolist(), strict=True)
            entries.append(TokenLogprob(int(ids[i]), float(chosen[i - 1]), None, tuple(top)))
        handle.prompt_logprobs = tuple(entries)
        return rows
