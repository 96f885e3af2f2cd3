"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2) in Flax.

One forward serves prefill (T tokens per row) and decode (T = 1 for every slot): it
writes the new K/V at explicit `positions` into the preallocated cache, a pool of pages that
each row reaches through its page-table row (engine.kv_cache), then each query attends to the
row's positions at or before its own. Rows are independent, which is what lets the engine
batch sequences of different lengths slot by slot.

Parameter names follow HF's module names (`layers_3/self_attn/q_proj/kernel`), with
kernels stored [in, out], so loading is a transpose per matrix.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from engine import cpu_kernels
from engine.config import ModelConfig
from engine.kv_cache import KVCache, read_pages, write_pages

F32 = jnp.float32


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), F32)
        x32 = x.astype(F32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (weight * y.astype(self.dtype)).astype(self.dtype)


class Linear(nn.Module):
    """x @ kernel (+ bias). `packed`: the kernel was packed by cpu_kernels.pack (16-column
    panels, q4/q8 blocks, bfloat16 or float32) and runs through cpu_kernels.matmul."""

    features: int
    use_bias: bool
    dtype: jnp.dtype
    packed: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, valid_rows: jax.Array | None = None) -> jax.Array:
        if self.packed:  # packed at load time (its format sets its shape); never initialised
            kernel = self.get_variable("params", "kernel")
            y = cpu_kernels.matmul(x, kernel, self.features, valid_rows).astype(self.dtype)
        else:
            init = nn.initializers.lecun_normal()
            kernel = self.param("kernel", init, (x.shape[-1], self.features), self.dtype)
            y = jnp.dot(x.astype(self.dtype), kernel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        return y


def rope_tables(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of each position's rotation angles: f32[..., D/2] for positions [...]."""
    freqs = positions.astype(F32)[..., None] * inv_freq
    return jnp.cos(freqs), jnp.sin(freqs)


def rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding, HF's rotate-half layout. x: [B, T, heads, D]; cos, sin: [B, T, D/2]
    (rope_tables of the tokens' positions)."""
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention_mask(positions: jax.Array, kv_len: int, window: int | None) -> jax.Array:
    """Bool[B, T, S]: key j is visible to the query at position p iff j <= p (and within
    the sliding window). Cache entries past a row's length are never visible."""
    keys = jnp.arange(kv_len)[None, None, :]
    q = positions[:, :, None]
    mask = keys <= q
    if window is not None:
        mask &= keys > q - window
    return mask


def _cpu_decode_attention(q, keys, values, mask, dtype) -> jax.Array:
    """One token per row as broadcast multiply-reduces, in [B, K, G, S] throughout.

    q [B, K, G, D], keys / values [B, K, S, D], mask [B, S] -> [B, K, G, D]. XLA CPU ran the
    batched [G, D] x [D, S] dots of a single token well below memory speed (a third slower
    at batch 32); TPU/GPU keep the dots, which their matrix units run."""
    q = q.astype(F32) * (q.shape[-1] ** -0.5)
    scores = jnp.sum(q[:, :, :, None, :] * keys[:, :, None].astype(F32), axis=-1)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(F32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    return jnp.sum(probs[..., None] * values[:, :, None], axis=-2)


class Attention(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    packed: bool

    @nn.compact
    def __call__(
        self, x, positions, mask, rotation, cache_kv, page_table, kv_len, valid_rows, fresh
    ):
        cfg = self.config
        B, T, _ = x.shape
        cos, sin = rotation  # rope_tables of positions, [B, T, D/2]
        dense = lambda n, name, bias: Linear(n, bias, self.dtype, self.packed, name=name)
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        o_proj = dense(cfg.hidden_size, "o_proj", False)
        if self.packed:  # packed side by side (weights.pack_for_cpu_kernels): one call
            qkv = dense(q_out + 2 * kv_out, "qkv_proj", cfg.attention_bias)(x, valid_rows)
            if fresh:  # positions are 0 .. T-1 in every row: the kernel's prefill
                rows = B * T if valid_rows is None else valid_rows
                out, *new_kv = cpu_kernels.prefill_attention(
                    qkv, cos[0], sin[0], rows, cfg.num_heads, cfg.num_kv_heads, cfg.sliding_window
                )
                return o_proj(out, valid_rows), tuple(new_kv)
            if T == 1:  # decode: the kernel writes the cache in place and attends
                out, *new_kv = cpu_kernels.decode_attention(
                    qkv[:, 0],
                    cos[:, 0],
                    sin[:, 0],
                    positions[:, 0],
                    page_table,
                    *cache_kv,
                    cfg.num_heads,
                    cfg.sliding_window,
                )
                return o_proj(out[:, None]), tuple(new_kv)
            if B == 1:  # one sequence's next T positions, after what its pages hold
                out, *new_kv = cpu_kernels.extend_attention(
                    qkv,
                    cos[0],
                    sin[0],
                    positions[0, 0],
                    T if valid_rows is None else valid_rows,
                    page_table[0],
                    *cache_kv,
                    cfg.num_heads,
                    cfg.sliding_window,
                )
                return o_proj(out, valid_rows), tuple(new_kv)
            q, k, v = jnp.split(qkv, [q_out, q_out + kv_out], axis=-1)
        else:
            q = dense(q_out, "q_proj", cfg.attention_bias)(x)
            k = dense(kv_out, "k_proj", cfg.attention_bias)(x)
            v = dense(kv_out, "v_proj", cfg.attention_bias)(x)
        q = rope(q.reshape(B, T, cfg.num_heads, cfg.head_dim), cos, sin)
        k = rope(k.reshape(B, T, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        v = v.reshape(B, T, cfg.num_kv_heads, cfg.head_dim)

        k_cache = write_pages(cache_kv[0], k, positions, page_table)
        v_cache = write_pages(cache_kv[1], v, positions, page_table)

        # Grouped-query attention: queries grouped per KV head, no K/V repetition.
        q = q.reshape(B, T, cfg.num_kv_heads, cfg.kv_groups, cfg.head_dim)
        keys = read_pages(k_cache, page_table, kv_len)
        values = read_pages(v_cache, page_table, kv_len)
        if T == 1 and jax.default_backend() == "cpu":
            out = _cpu_decode_attention(q[:, 0], keys, values, mask[:, 0], self.dtype)[:, None]
        else:
            scores = jnp.einsum("btkgd,bksd->bkgts", q, keys, preferred_element_type=F32)
            scores = scores * (cfg.head_dim**-0.5)
            scores = jnp.where(mask[:, None, None], scores, jnp.finfo(F32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
            out = jnp.einsum("bkgts,bksd->btkgd", probs, values)
        out = out.reshape(B, T, cfg.num_heads * cfg.head_dim)
        return o_proj(out, valid_rows), (k_cache, v_cache)


class MLP(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    packed: bool

    @nn.compact
    def __call__(self, x, valid_rows):
        dense = lambda n, name: Linear(n, False, self.dtype, self.packed, name=name)
        inter = self.config.intermediate_size
        if self.packed:  # packed side by side, as in Attention
            gate, up = jnp.split(dense(2 * inter, "gate_up_proj")(x, valid_rows), 2, axis=-1)
        else:
            gate, up = dense(inter, "gate_proj")(x), dense(inter, "up_proj")(x)
        h = nn.silu(gate) * up
        return dense(self.config.hidden_size, "down_proj")(h, valid_rows)


class DecoderLayer(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    packed: bool

    @nn.compact
    def __call__(
        self, x, positions, mask, rotation, cache_kv, page_table, kv_len, valid_rows, fresh
    ):
        cfg, eps = self.config, self.config.rms_norm_eps
        if self.packed and x.shape[1] == 1 and not fresh and not cfg.attention_bias:
            # Decode: the whole layer in one kernel call (the same math as below).
            cos, sin = rotation
            y, *new_kv = cpu_kernels.decode_layer(
                x[:, 0],
                self.variables["params"],
                cos[:, 0],
                sin[:, 0],
                positions[:, 0],
                page_table,
                *cache_kv,
                cfg.num_heads,
                cfg.sliding_window,
                eps,
            )
            return y[:, None].astype(self.dtype), tuple(new_kv)
        h = RMSNorm(eps, self.dtype, name="input_layernorm")(x)
        h, cache_kv = Attention(self.config, self.dtype, self.packed, name="self_attn")(
            h, positions, mask, rotation, cache_kv, page_table, kv_len, valid_rows, fresh
        )
        x = x + h
        h = RMSNorm(eps, self.dtype, name="post_attention_layernorm")(x)
        mlp = MLP(self.config, self.dtype, self.packed, name="mlp")
        return x + mlp(h, valid_rows), cache_kv


class Transformer(nn.Module):
    """forward(tokens [B, T], positions [B, T], cache, page_table [B, pages_per_seq])
    -> (logits f32[B, T, V], cache).

    Batch row b is the sequence whose pages are page_table[b] (engine.kv_cache): the engine
    decodes its first B slots with their B table rows, so the idle slots above cost nothing,
    and extends one slot by a prompt chunk as a batch of one row, that slot's table row.
    `kv_len` (static) bounds how many positions are attended to (default: all a table row
    holds): the engine passes a bucket above the longest live position so short sequences
    don't pay for max_len.
    `head=False` returns the final normed hidden states [B, T, D] instead of logits, so
    a prefill that needs no prompt logprobs skips the vocabulary projection.
    `valid_rows` (int32 scalar, may be traced): tokens from this one on, counted over
    [B, T] flattened, are padding; the CPU kernels skip their matrix rows (left zero),
    XLA's ops compute them. Either way no query before it sees them.
    `fresh` (static) promises a prefill from empty rows: positions are 0 .. T-1 in every
    row and the cache holds nothing else (a page of T positions per row, page_table [[0],
    [1], ...]). The CPU kernels then attend within the new tokens and return their K/V as the
    cache ([B, kv_heads, T, head_dim] per layer).
    A row's T tokens sit at consecutive positions. With the CPU kernels, one token per row is
    decode, and one row of several tokens, not fresh, is one sequence continuing what its
    pages hold at the positions before its own (the rest of a prompt sharing a prefix with
    the slot's last one, or a chunk of a long prompt).
    """

    config: ModelConfig
    dtype: jnp.dtype = F32
    # Matrices packed for engine.cpu_kernels (weights.pack_for_cpu_kernels), which also
    # run decode attention in place on the cache.
    packed: bool = False

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        page_table: jax.Array,
        kv_len: int | None = None,
        head: bool = True,
        valid_rows: jax.Array | None = None,
        fresh: bool = False,
    ) -> tuple[jax.Array, KVCache]:
        cfg = self.config
        kv_len = kv_len or page_table.shape[1] * cache[0][0].shape[2]
        embed = self.param(
            "embed_tokens",
            nn.initializers.normal(0.02),
            (cfg.vocab_size, cfg.hidden_size),
            self.dtype,
        )
        x = jnp.take(embed, tokens, axis=0).astype(self.dtype)
        # Once for every layer: the positions' rotation angles.
        rotation = rope_tables(positions, jnp.asarray(cfg.inv_freq()))
        mask = attention_mask(positions, kv_len, cfg.sliding_window)
        new_cache = []
        for i in range(cfg.num_layers):  # unrolled: faster decode than scan on CPU
            x, kv = DecoderLayer(cfg, self.dtype, self.packed, name=f"layers_{i}")(
                x, positions, mask, rotation, cache[i], page_table, kv_len, valid_rows, fresh
            )
            new_cache.append(kv)
        x = RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")(x)
        if not self.packed and not cfg.tie_word_embeddings:  # packed: its own "lm_head"
            self.param(
                "lm_head",
                nn.initializers.normal(0.02),
                (cfg.hidden_size, cfg.vocab_size),
                self.dtype,
            )
        if not head:
            return x, new_cache
        return logits_from_hidden(self.variables["params"], x, cfg, self.packed), new_cache


def logits_from_hidden(
    params: dict, hidden: jax.Array, config: ModelConfig, packed: bool = False
) -> jax.Array:
    """f32[B, T, V] from the final normed hidden states [B, T, D]."""
    if packed:
        return cpu_kernels.matmul(hidden, params["lm_head"], config.vocab_size)
    if config.tie_word_embeddings:
        # Contract against the embedding's hidden axis directly; `x @ embed.T` made XLA
        # materialise a transposed copy of the embedding every step.
        return jax.lax.dot_general(
            hidden, params["embed_tokens"], (((2,), (1,)), ((), ())), preferred_element_type=F32
        )
    return jnp.einsum("btd,dv->btv", hidden, params["lm_head"], preferred_element_type=F32)
