"""The device programs: prefill, insert, extend, decode steps, slot start/stop, page copy.

Each is jitted once per static shape (prompt bucket, attended-cache bucket), with the
cache and decode state donated so XLA updates them in place. The decode program runs
`k` steps of model forward + `samplers.sample` in one `lax.scan`, detecting EOS and
token limits on the device, so the host syncs once per k tokens.

A slot holds one sequence. Its next input token, that token's position and the sequence's
page-table row (engine.kv_cache: which pages of the cache hold its positions) live in the
state; the prefill covers the prompt except its last token, which the first decode step
consumes, so the first generated token is drawn by the same sampling program as every other.

Every decode call takes each row's grammar mask (samplers.mask; all ones for a free row). The
mask of a constrained row depends on the token before it, which the host reads after the call:
such a row takes one token per call, and sits out the call's later steps (or the call is a
one-token step split in two programs, engine.split_step, built from forward_rows and advance).

A mixed decode program also carries a prompt chunk (Chunk) in its first step: one model call
over the decode rows and the chunk's tokens (engine.model.Rows blocks), so a long prompt is
prefilled while the running sequences keep getting tokens, sharing each weight read.

`extend` prefills tokens of a sequence at their positions in its pages, attending to what
they already hold: the rest of a prompt whose first pages came from the prefix cache, a long
prompt chunk by chunk, a preempted sequence being recomputed. `copy_page` gives a sequence
its own copy of a page it shared (n choices of one prompt), `sampling_row` reads a slot's
sampling state back so a preempted sequence resumes exactly where it stopped.

Decode runs over the first `rows` slots only (a bucket above the highest live slot, the
scheduler keeping live sequences in the low slots), so idle slots cost nothing. Each
(k, kv_len, rows, chunk) program is compiled ahead of time and kept in a table; the scheduler
uses the smallest one compiled, so smaller buckets can compile in the background.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import samplers
from engine import cpu_kernels
from engine.config import ModelConfig
from engine.data_parallel import RowOrder
from engine.decode_state import Chunk, DecodeState, StepOutput
from engine.held import Held
from engine.kv_cache import KVCache, copy_page_in_layers, insert_prefix
from engine.model import Rows, Transformer, logits_from_hidden
from samplers.pipeline import sample

Params = Any


class Programs:
    """The jitted programs for one model and cache geometry."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: jnp.dtype,
        num_top: int,
        eos_ids: list[int],
        pages_per_seq: int,
        cache_shardings: Any = None,
        state_shardings: Any = None,
        packed: bool = False,
        branchless: bool | None = None,
    ):
        """`cache_shardings` / `state_shardings` (trees of Shardings, or None) pin the
        layout of the cache and decode state every program returns. Left to XLA, an output
        may come back laid out differently from the input, and the next program called on
        it compiles again for the new layout (on a mesh, in the middle of serving).
        `branchless` forces the sampler's form (samplers.branching); None: branch-free on GPU."""
        self.config = config
        self.pages_per_seq = pages_per_seq  # the length of a page-table row
        self.cache_shardings, self.state_shardings = cache_shardings, state_shardings
        self.model = Transformer(config, dtype, packed)
        # Whether a prompt chunk rides in the first step of a decode call (a mixed program),
        # sharing the decode rows' weight reads: on an accelerator a decode step's whole cost.
        # On the CPU kernels a chunk costs its compute and riding saved nothing measurable
        # (README: bench_mixed), while each mixed program held ~75 MiB: chunks go alone.
        self.mixes_chunks = not packed
        self.num_top = num_top
        # On GPU a conditional in the step is a round trip to the host (samplers.branching).
        self.branchless = jax.default_backend() == "gpu" if branchless is None else branchless
        # The packed model runs on engine.cpu_kernels, which has the sampler's top_k too.
        self.top_k = cpu_kernels.top_k if packed else jax.lax.top_k
        self.eos_ids = jnp.asarray(sorted(eos_ids) or [-1], jnp.int32)
        cache_out = {} if cache_shardings is None else {"out_shardings": cache_shardings}
        state_out = {} if state_shardings is None else {"out_shardings": state_shardings}
        # What the host reads, whole on every device: every process of a mesh can read it.
        whole = [jax.sharding.NamedSharding(s.mesh, P()) for s in jax.tree.leaves(state_shardings)]
        self.read_sharding = whole[0] if whole else None
        # Programs reading the cache are traced under the mesh: attention runs per data
        # shard on its own pages (engine.data_parallel).
        self.mesh = whole[0].mesh if whole else None
        self.order = RowOrder(self.mesh.shape["data"] if self.mesh else 1)
        read_out = {"out_shardings": whole[0]} if whole else {}
        decode_out = (
            {"out_shardings": (cache_shardings, state_shardings, whole[0])}
            if cache_shardings is not None and state_shardings is not None
            else {}
        )
        # A whole prompt's programs, by name: the jitted ones serving calls, and how
        # compile_prefill makes throwaway copies of them.
        self._whole_prompt = {
            "prefill": (self._prefill, {}),
            "insert": (insert_prefix, {"donate_argnums": 0, **cache_out}),
            "prompt_logprobs": (self._prompt_logprobs, read_out),
        }
        self.prefill, self.insert, self.prompt_logprobs = (
            Held(jax.jit(fn, **kw)) for fn, kw in self._whole_prompt.values()
        )
        self.extend = jax.jit(self._extend, donate_argnums=1, **cache_out)
        self._extenders: dict[int, Any] = {}
        self.decode = jax.jit(
            self._decode,
            static_argnames=("k", "kv_len", "rows"),
            donate_argnums=(1, 2),
            **decode_out,
        )
        self._decoders: dict[tuple[int, int, int], Any] = {}
        # Made where it lives (each slot's row on its data shard), never whole on one device.
        self.empty_state = jax.jit(DecodeState.empty, static_argnums=(1, 2), **state_out)
        self.start_slot = Held(jax.jit(DecodeState.start, donate_argnums=0, **state_out))
        self.stop_slot = Held(jax.jit(DecodeState.stop, donate_argnums=0, **state_out))
        self.sampling_row = Held(jax.jit(DecodeState.sampling_row))
        self.copy_page = Held(jax.jit(copy_page_in_layers, donate_argnums=0, **cache_out))

    def decode_ready(self, k: int, kv_len: int, rows: int, chunk: int = 0) -> bool:
        return (k, kv_len, rows, chunk) in self._decoders

    def decoder(
        self,
        params: Params,
        cache: KVCache,
        state: DecodeState,
        *,
        k: int,
        kv_len: int,
        rows: int,
        chunk: int = 0,
    ) -> Any:
        """The compiled decode program for this geometry, compiling it on first use, called as
        decode(params, cache, state, masks, steps) with the rows' grammar masks i32[rows, W]
        to run `steps` (int32, 1 to k) steps; with `chunk` > 0 the mixed one, whose first step
        also prefills a Chunk of that many tokens (decode(params, cache, state, masks, steps,
        chunk)).

        The arguments may be arrays or their jax.ShapeDtypeStructs (for compiling ahead)."""
        key = (k, kv_len, rows, chunk)
        if key not in self._decoders:
            extra = (self.chunk_shape(chunk),) if chunk else ()
            masks = self.masks_shape(rows)
            with self.on_mesh():
                steps = jax.ShapeDtypeStruct((), jnp.int32)
                lowered = self.decode.lower(
                    params, cache, state, masks, steps, *extra, k=k, kv_len=kv_len, rows=rows
                )
            self._decoders[key] = lowered.compile()
        return self._decoders[key]

    def on_mesh(self) -> contextlib.AbstractContextManager:
        """The context programs reading the cache are traced in: their mesh, if any."""
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def masks_shape(self, rows: int) -> jax.ShapeDtypeStruct:
        """The grammar masks of a decode call over `rows` slots (samplers.mask)."""
        words = samplers.mask.words(self.config.vocab_size)
        return jax.ShapeDtypeStruct((rows, words), jnp.int32)

    def chunk_shape(self, tokens: int) -> Chunk:
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        return Chunk(
            jax.ShapeDtypeStruct((1, tokens), jnp.int32),
            scalar,
            scalar,
            jax.ShapeDtypeStruct((self.pages_per_seq,), jnp.int32),
        )

    def compile_prefill(self, params: Params, cache: KVCache, tokens: int) -> None:
        """Compile, without running, what a whole prefill of a `tokens` bucket uses (prefill,
        insert, prompt logprobs); the persistent compilation cache serves their first call.
        params and cache may be arrays or their jax.ShapeDtypeStructs.

        Each is compiled on a throwaway jit of its function: the jitted one keeps what it
        lowers and compiles, program included, as long as it lives (~15 MiB each on the CPU
        for programs only a rare long scored prompt runs)."""
        ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        throwaway = {name: jax.jit(fn, **kw) for name, (fn, kw) in self._whole_prompt.items()}
        prefill = throwaway["prefill"].lower(params, ids, scalar).compile()
        # The prefill's outputs as the served calls pass them on: placed where it puts them
        # (a different placement is a different program, and a miss in the persistent cache).
        out = jax.eval_shape(self._prefill, params, ids, scalar)
        rows, hidden = jax.tree.map(
            lambda a, where: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where),
            out,
            prefill.output_shardings,
        )
        pages = jax.ShapeDtypeStruct((self.pages_per_seq,), jnp.int32)
        throwaway["insert"].lower(cache, rows, pages).compile()
        throwaway["prompt_logprobs"].lower(params, hidden, ids).compile()

    def extend_ready(self, tokens: int, rows: int = 1) -> bool:
        return (rows, tokens) in self._extenders

    def extender(self, params: Params, cache: KVCache, tokens: int, rows: int = 1) -> Any:
        """The compiled program extending `rows` sequences by `tokens` each (a prompt bucket),
        compiling it on first use; params and cache may be arrays or their ShapeDtypeStructs."""
        if (rows, tokens) not in self._extenders:
            ids = jax.ShapeDtypeStruct((rows, tokens), jnp.int32)
            vector = jax.ShapeDtypeStruct((rows,), jnp.int32)
            pages = jax.ShapeDtypeStruct((rows, self.pages_per_seq), jnp.int32)
            with self.on_mesh():
                lowered = self.extend.lower(params, cache, ids, vector, vector, pages)
            self._extenders[rows, tokens] = lowered.compile()
        return self._extenders[rows, tokens]

    def _extend(
        self,
        params: Params,
        cache: KVCache,
        tokens: jax.Array,
        starts: jax.Array,
        lengths: jax.Array,
        pages: jax.Array,
    ) -> KVCache:
        """Prefill tokens i32[G, T] of G sequences: row g (its first lengths[g] tokens real,
        the rest padding) at positions starts[g] .. starts[g] + T - 1 of the sequence whose
        page-table row is pages[g], whose positions before starts[g] hold the same sequence
        already (a cached prefix, or the chunks before). Their K/V go straight into those
        pages. The rows share every weight read, and each attends as one sequence's extension
        does."""
        G, T = tokens.shape
        positions = starts[:, None] + jnp.arange(T, dtype=jnp.int32)
        if self.model.packed:
            # One block of G rows: the CPU kernels attend each row as it would alone, and the
            # program no longer grows with G (8 blocks made a 24,000-line program, ~75 MiB).
            blocks = [Rows(tokens, positions, pages, lengths=lengths, head=False)]
        else:  # XLA's ops: a block per sequence (a mesh places a block's rows by slot)
            blocks = [
                Rows(
                    tokens[g : g + 1],
                    positions[g : g + 1],
                    pages[g : g + 1],
                    lengths[g],
                    head=False,
                )
                for g in range(G)
            ]
        _, cache = self.model.apply({"params": params}, blocks, cache)
        return cache

    def _prefill(
        self, params: Params, tokens: jax.Array, length: jax.Array
    ) -> tuple[KVCache, jax.Array]:
        """tokens i32[1, T] → (K/V rows [1, kv_heads, T, head_dim] per layer, hidden [1, T, D]).

        T is the prompt bucket; tokens from `length` on are padding, whose K/V lands at
        positions no later query can see (and whose matrix rows the CPU kernels skip). The
        rows are a pool of one page of T positions, the sequence's only page."""
        cfg, T = self.config, tokens.shape[1]
        rows = [
            (jnp.zeros((1, cfg.num_kv_heads, T, cfg.head_dim), self.model.dtype),) * 2
            for _ in range(cfg.num_layers)
        ]
        positions = jnp.arange(T, dtype=jnp.int32)[None]
        page = jnp.zeros((1, 1), jnp.int32)
        block = Rows(tokens, positions, page, length, fresh=True, head=False)
        (hidden,), rows = self.model.apply({"params": params}, [block], rows)
        return rows, hidden

    def _prompt_logprobs(
        self, params: Params, hidden: jax.Array, targets: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Raw logprob of each next prompt token, and the top-N alternatives, [T] / [T, N]."""
        logits = logits_from_hidden(params, hidden, self.config, self.model.packed)
        logp = jax.nn.log_softmax(logits[0], axis=-1)
        chosen = jnp.take_along_axis(logp, targets[0][:, None], axis=-1)[:, 0]
        top_lp, top_ids = self.top_k(logp, self.num_top)
        return chosen, top_ids, top_lp

    def _decode(
        self,
        params: Params,
        cache: KVCache,
        state: DecodeState,
        masks: jax.Array,
        steps: jax.Array,
        chunk: Chunk | None = None,
        *,
        k: int,
        kv_len: int,
        rows: int,
    ) -> tuple[KVCache, DecodeState, StepOutput]:
        """`steps` (at most k) steps of the first `rows` slots (_steps_from); StepOutput fields
        are [k, rows, ...], the steps not run invalid. masks: i32[rows, W], each row's allowed
        tokens; a constrained row takes the first step only. A chunk rides in the first step:
        the same model call computes its K/V into its pages."""
        masks = self.order.to_rows(masks)
        # Rows with a grammar wait after their first token: the host has the next mask.
        once = samplers.mask.constrained(masks)

        def step(carry, first):
            cache, st = carry
            logits, cache = self.forward_rows(params, cache, st, kv_len, [])
            st, out = self.advance(st, logits, masks, st.active & (first | ~once))
            return (cache, st), out

        head, start = self.order.head(state, rows), int(chunk is not None)
        if chunk is not None:  # its own first step: one model call over the rows and the chunk
            logits, cache = self.forward_rows(params, cache, head, kv_len, [chunk.block()])
            head, first = self.advance(head, logits, masks, head.active)
        (cache, head), outputs = self._steps_from(step, (cache, head), start, k, steps)
        if chunk is not None:
            outputs = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, outputs)
        outputs = jax.tree.map(lambda x: self.order.to_slots(x, axis=1), outputs)
        return cache, self.order.with_head(state, head), outputs

    def _steps_from(self, step, carry, start: int, k: int, steps: jax.Array):
        """Steps start .. k - 1 of a decode call, step(carry, first) -> (carry, out): the
        carry after them and their outputs [k - start, ...]. A while_loop stopping at `steps`
        (the outputs it skips zeros, invalid), so one program serves every count up to k
        (each holds ~30 MB of a CPU server's memory); in the GPU form, where a loop of unknown
        length reads its condition back to the host every step, a scan of all (steps == k)."""
        shapes = jax.eval_shape(lambda c: step(c, True)[1], carry)
        outputs = jax.tree.map(lambda x: jnp.zeros((k - start, *x.shape), x.dtype), shapes)
        if k == start:
            return carry, outputs
        if self.branchless:
            return jax.lax.scan(lambda c, i: step(c, i == 0), carry, jnp.arange(start, k))

        def body(loop):
            i, carry, outputs = loop
            carry, out = step(carry, i == 0)
            put = lambda buf, x: jax.lax.dynamic_update_index_in_dim(buf, x, i - start, 0)  # noqa: E731
            return i + 1, carry, jax.tree.map(put, outputs, out)

        loop = (jnp.int32(start), carry, outputs)
        _, carry, outputs = jax.lax.while_loop(lambda lp: lp[0] < steps, body, loop)
        return carry, outputs

    def forward_rows(
        self, params: Params, cache: KVCache, st: DecodeState, kv_len: int, extra: list[Rows]
    ) -> tuple[jax.Array, KVCache]:
        """One model call over the state's rows (their next tokens at their positions), with
        `extra` blocks beside them: (the rows' logits f32[rows, V], the cache)."""
        valid = None
        if self.model.packed:  # the CPU kernels skip the rows above the highest active one
            rows = jnp.arange(1, st.active.shape[0] + 1, dtype=jnp.int32)
            valid = jnp.max(jnp.where(st.active, rows, 0))
        block = Rows(st.tokens[:, None], st.positions[:, None], st.page_table, valid, kv_len=kv_len)
        (logits, *_), cache = self.model.apply({"params": params}, [block, *extra], cache)
        return logits[:, 0], cache

    def advance(
        self, st: DecodeState, logits: jax.Array, masks: jax.Array, live: jax.Array
    ) -> tuple[DecodeState, StepOutput]:
        """Draw the `live` rows' next tokens from their logits (samplers.sample, under their
        grammar masks) and move the state past them: EOS and token limits end a row here."""
        batch = dataclasses.replace(st.sampling, active=live)
        tokens, info, batch = sample(
            logits,
            batch,
            num_logprobs=self.num_top,
            top_k=self.top_k,
            logprob_rows=st.logprobs,
            allowed=masks,
            branchless=self.branchless,
        )
        remaining = st.remaining - live.astype(jnp.int32)
        eos = jnp.isin(tokens, self.eos_ids) & st.stop_on_eos
        finished = live & (eos | (remaining <= 0))
        out = StepOutput(
            tokens=tokens,
            logprob=info.token_logprob,
            sampling_logprob=info.sampling_logprob,
            top_ids=info.top_ids,
            top_logprobs=info.top_logprobs,
            valid=live,
            finished=finished,
        )
        st = st.replace(
            tokens=jnp.where(live, tokens, st.tokens),
            positions=st.positions + live.astype(jnp.int32),
            active=st.active & ~finished,
            remaining=remaining,
            sampling=batch,
        )
        return st, out
