"""Llama-family decoder (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3, Gemma 3 text, Phi-3; Mixtral
and Qwen3-MoE with engine.moe's routed feed-forward) in Flax.

One forward serves prefill (T tokens per row), decode (T = 1 for every slot) and both in one
step (a block of each, Rows): it writes the new K/V at explicit `positions` into the
preallocated cache, a pool of pages that each row reaches through its page-table row
(engine.kv_cache), then each query attends to the row's positions at or before its own. Rows
are independent, which is what lets the engine batch sequences of different lengths slot by
slot.

Parameter names follow HF's module names (`layers_3/self_attn/o_proj/kernel`), with
kernels stored [in, out]; q/k/v and gate/up are one matrix each (`qkv_proj`,
`gate_up_proj`, built by engine.weights.fuse_projections), so a layer is four products.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from engine import cpu_kernels
from engine.attend import attend_packed, attend_xla
from engine.config import ModelConfig
from engine.kv_cache import KVCache
from engine.moe import RoutedMLP

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
    """x @ kernel (+ bias), contracting x's last axis with the kernel's first.

    `features`: the output's trailing shape; a tuple keeps fused matrices' parts apart
    (q/k/v per KV head, gate/up), so tensor parallelism splits each part on its own axis.
    Two stored forms besides the plain one, told apart by the parameters present:
    `packed` — packed by cpu_kernels.pack (16-column panels, q4/q8 blocks, bfloat16 or
    float32), run through cpu_kernels.matmul; a `scale` beside the kernel — weights
    quantized by engine.quantize (int8 or float8, one scale per output column), multiplied
    in the compute dtype with float32 accumulation and scaled after."""

    features: int | tuple[int, ...]
    use_bias: bool
    dtype: jnp.dtype
    packed: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, valid_rows: jax.Array | None = None) -> jax.Array:
        shape = (self.features,) if isinstance(self.features, int) else self.features
        if self.packed:  # packed at load time (its format sets its shape); never initialised
            kernel = self.get_variable("params", "kernel")
            y = cpu_kernels.matmul(x, kernel, self.features, valid_rows).astype(self.dtype)
        elif self.has_variable("params", "scale"):  # quantized at load time, never initialised
            kernel, scale = (
                self.get_variable("params", "kernel"),
                self.get_variable("params", "scale"),
            )
            y = _contract(x.astype(self.dtype), kernel.astype(self.dtype), F32)
            y = (y * scale).astype(self.dtype)
        else:
            init = nn.initializers.lecun_normal()
            kernel = self.param("kernel", init, (x.shape[-1], *shape), self.dtype)
            y = _contract(x.astype(self.dtype), kernel, None)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, shape, self.dtype)
        return y


def _contract(x: jax.Array, kernel: jax.Array, accumulate: jnp.dtype | None) -> jax.Array:
    """x [..., D] times kernel [D, *F] -> [..., *F]: one matrix product."""
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    return jax.lax.dot_general(x, kernel, dims, preferred_element_type=accumulate)


def rope_tables(
    positions: jax.Array, inv_freq: jax.Array, factor: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """cos and sin of each position's rotation angles, times `factor` (YaRN's attention
    factor): f32[..., D/2] for positions [...]."""
    freqs = positions.astype(F32)[..., None] * inv_freq
    if factor == 1.0:
        return jnp.cos(freqs), jnp.sin(freqs)
    return jnp.cos(freqs) * factor, jnp.sin(freqs) * factor


@flax.struct.dataclass
class Rows:
    """One block of a step: B sequences' next T tokens each, at consecutive positions.

    Row b is the sequence whose pages are page_table[b] (engine.kv_cache). A step is one or
    more blocks (Transformer): decode is one block of a token per slot, a prompt chunk one
    row of many tokens, and a mixed step both, whose matrix products run on all their tokens
    at once while each block attends on its own (engine.attend).
    `valid` (int32 scalar, may be traced): tokens from this one on, over [B, T] flattened,
    are padding; the CPU kernels skip their matrix rows (left zero) in the last block, and a
    decode block's rows from `valid` on in its fused layer (nothing written to their pages);
    XLA's ops compute them. Either way no query before it sees them.
    `lengths` (int32[B], may be traced; the CPU kernels only): each row is a sequence of its
    own continuing what its pages hold, its first lengths[b] tokens real (several short
    prompts in one call), in place of `valid`.
    `kv_len` bounds how many positions are attended to (default: all a table row holds): the
    engine passes a bucket above the longest live position so short sequences don't pay for
    max_len.
    `fresh` promises a prefill from empty rows: positions are 0 .. T-1 in every row and the
    cache holds nothing else (a page of T positions per row, page_table [[0], [1], ...]). The
    CPU kernels then attend within the new tokens and return their K/V as the cache
    ([B, kv_heads, T, head_dim] per layer); such a block is a step alone.
    `head`: logits f32[B, T, V] for this block; False: its final normed hidden states
    [B, T, D] (a prefill that needs no prompt logprobs skips the vocabulary projection).
    """

    tokens: jax.Array  # i32[B, T]
    positions: jax.Array  # i32[B, T]
    page_table: jax.Array  # i32[B, pages_per_seq]
    valid: jax.Array | None = None
    lengths: jax.Array | None = None
    kv_len: int | None = flax.struct.field(pytree_node=False, default=None)
    fresh: bool = flax.struct.field(pytree_node=False, default=False)
    head: bool = flax.struct.field(pytree_node=False, default=True)


def _joined(xs: list[jax.Array]) -> jax.Array:
    """Blocks' [B_i, T_i, F] as one [1, sum B_i T_i, F]: one matrix product for all."""
    return jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in xs])[None]


def _split(y: jax.Array, blocks: tuple[Rows, ...]) -> list[jax.Array]:
    """The inverse of _joined: [1, N, F] back into each block's [B_i, T_i, F]."""
    out, at = [], 0
    for b in blocks:
        n = b.tokens.size
        out.append(y[0, at : at + n].reshape(*b.tokens.shape, y.shape[-1]))
        at += n
    return out


def _valid_rows(blocks: tuple[Rows, ...]) -> jax.Array | None:
    """Rows of the joined tokens from which on all is padding: the last block's padding
    (with per-row lengths, its last row's)."""
    last = blocks[-1]
    valid = last.valid
    if last.lengths is not None:
        B, T = last.tokens.shape
        valid = (B - 1) * T + last.lengths[B - 1]
    if valid is None:
        return None
    return sum(b.tokens.size for b in blocks[:-1]) + valid


class Attention(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    packed: bool
    window: int | None  # this layer's sliding window (None: global attention)

    @nn.compact
    def __call__(self, xs, blocks, rotations, cache_kv):
        cfg = self.config
        x, valid_rows = _joined(xs), _valid_rows(blocks)
        dense = lambda n, name, bias: Linear(n, bias, self.dtype, self.packed, name=name)
        q_out, kv_out = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        if self.packed:  # packed side by side (weights.pack_for_cpu_kernels): one call
            qkv = dense(q_out + 2 * kv_out, "qkv_proj", cfg.attention_bias)(x, valid_rows)
            q, k, v = jnp.split(qkv, [q_out, q_out + kv_out], axis=-1)
        else:  # one product: per KV head, its group of query heads, its key, its value
            group = cfg.num_heads // cfg.num_kv_heads
            parts = (cfg.num_kv_heads, group + 2, cfg.head_dim)
            qkv = dense(parts, "qkv_proj", cfg.attention_bias)(x)
            q = qkv[..., :group, :].reshape(*x.shape[:-1], q_out)
            k = qkv[..., group, :].reshape(*x.shape[:-1], kv_out)
            v = qkv[..., group + 1, :].reshape(*x.shape[:-1], kv_out)
        if cfg.qk_norm:  # Qwen3: each head's q and k RMS-normed, before the rotation

            def per_head(y: jax.Array, heads: int, name: str) -> jax.Array:
                heads_last = y.reshape(*y.shape[:-1], heads, cfg.head_dim)
                return RMSNorm(cfg.rms_norm_eps, self.dtype, name=name)(heads_last).reshape(y.shape)

            q, k = per_head(q, cfg.num_heads, "q_norm"), per_head(k, cfg.num_kv_heads, "k_norm")
        if self.packed:
            qkv = jnp.concatenate([q, k, v], axis=-1) if cfg.qk_norm else qkv
            parts = _split(qkv, blocks)
        else:
            parts = list(zip(*(_split(y, blocks) for y in (q, k, v)), strict=True))
        outs = []
        for part, block, rotation in zip(parts, blocks, rotations, strict=True):
            done = self.packed and attend_packed(cfg, part, block, rotation, cache_kv, self.window)
            if not done:
                if self.packed:
                    part = jnp.split(part, [q_out, q_out + kv_out], axis=-1)
                done = attend_xla(cfg, self.dtype, *part, block, rotation, cache_kv, self.window)
            out, cache_kv = done
            outs.append(out)
        o_proj = dense(cfg.hidden_size, "o_proj", False)
        return _split(o_proj(_joined(outs), valid_rows), blocks), cache_kv


def activation(config: ModelConfig):
    """The feed-forward's gate activation: SiLU (SwiGLU), or tanh GELU (Gemma's GeGLU)."""
    return nn.silu if config.hidden_act == "silu" else partial(nn.gelu, approximate=True)


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
        else:  # one product, gate and up on their own axis
            gate_up = dense((2, inter), "gate_up_proj")(x)
            gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
        h = activation(self.config)(gate) * up
        return dense(self.config.hidden_size, "down_proj")(h, valid_rows)


class DecoderLayer(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype
    packed: bool
    window: int | None = None  # this layer's sliding window (None: global attention)
    routed: bool = False  # its feed-forward a mixture of experts (engine.moe)

    @nn.compact
    def __call__(self, xs, blocks, rotations, cache_kv):
        cfg, eps = self.config, self.config.rms_norm_eps
        only = blocks[0]
        decode = len(blocks) == 1 and only.tokens.shape[1] == 1 and not only.fresh
        plain = not (cfg.attention_bias or cfg.qk_norm or cfg.sandwich_norms or self.routed)
        if self.packed and decode and plain:
            # Decode: the whole layer in one kernel call (the same math as below).
            cos, sin = rotations[0]
            y, *new_kv = cpu_kernels.decode_layer(
                xs[0][:, 0],
                self.variables["params"],
                cos[:, 0],
                sin[:, 0],
                only.positions[:, 0],
                only.page_table,
                *cache_kv,
                cfg.num_heads,
                self.window,
                eps,
                only.valid,
            )
            return [y[:, None].astype(self.dtype)], tuple(new_kv)
        norm = RMSNorm(eps, self.dtype, name="input_layernorm")
        attention = Attention(cfg, self.dtype, self.packed, self.window, name="self_attn")
        hs, cache_kv = attention([norm(x) for x in xs], blocks, rotations, cache_kv)
        if cfg.sandwich_norms:  # Gemma 3: the attention's output normed, then the MLP's input
            out_norm = RMSNorm(eps, self.dtype, name="post_attention_layernorm")
            hs = [out_norm(h) for h in hs]
        xs = [x + h for x, h in zip(xs, hs, strict=True)]
        name = "pre_feedforward_layernorm" if cfg.sandwich_norms else "post_attention_layernorm"
        norm = RMSNorm(eps, self.dtype, name=name)
        if self.routed:  # its experts run on XLA's ops, packed or not
            mlp = RoutedMLP(cfg, self.dtype, activation(cfg), name="mlp")
        else:
            mlp = MLP(cfg, self.dtype, self.packed, name="mlp")
        hs = _split(mlp(_joined([norm(x) for x in xs]), _valid_rows(blocks)), blocks)
        if cfg.sandwich_norms:
            out_norm = RMSNorm(eps, self.dtype, name="post_feedforward_layernorm")
            hs = [out_norm(h) for h in hs]
        return [x + h for x, h in zip(xs, hs, strict=True)], cache_kv


class Transformer(nn.Module):
    """forward(blocks, cache) -> (one output per block, cache).

    Each block (Rows) is a rectangle of rows of consecutive tokens; the output of a block is
    its logits f32[B, T, V], or with `head=False` its final normed hidden states [B, T, D].
    All blocks' tokens share each matrix product; each block attends on its own
    (engine.attend). The engine decodes its first B slots with their B table rows (so the
    idle slots above cost nothing), prefills a prompt chunk as a block of one row, and mixes
    the two in one step while decoding sequences wait for a long prompt.
    With the CPU kernels, one token per row is decode, and one row of several tokens, not
    fresh, is one sequence continuing what its pages hold at the positions before its own (the
    rest of a prompt sharing a prefix with another, or a chunk of a long prompt).
    """

    config: ModelConfig
    dtype: jnp.dtype = F32
    # Matrices packed for engine.cpu_kernels (weights.pack_for_cpu_kernels), which also
    # run decode attention in place on the cache.
    packed: bool = False

    @nn.compact
    def __call__(self, blocks: Sequence[Rows], cache: KVCache) -> tuple[list[jax.Array], KVCache]:
        cfg, blocks = self.config, tuple(blocks)
        if len(blocks) > 1 and any(b.fresh for b in blocks):
            raise ValueError("a fresh prefill block is a step alone")
        if self.packed and cfg.tie_word_embeddings:  # the packed head's columns: no copy
            head = self.get_variable("params", "lm_head")
            xs = [cpu_kernels.embedding(head, b.tokens).astype(self.dtype) for b in blocks]
            embed_dtype = F32
        else:
            embed = self.param(
                "embed_tokens",
                nn.initializers.normal(0.02),
                (cfg.vocab_size, cfg.hidden_size),
                self.dtype,
            )
            xs = [jnp.take(embed, b.tokens, axis=0).astype(self.dtype) for b in blocks]
            embed_dtype = embed.dtype
        if cfg.embed_scale is not None:  # Gemma: sqrt(hidden), in the embedding's dtype
            xs = [x * jnp.asarray(cfg.embed_scale, embed_dtype).astype(self.dtype) for x in xs]
        # Once for every layer: the positions' rotation angles (Gemma 3's local layers
        # rotate with their own base).
        kinds = sorted(set(cfg.local_layers)) or [False]
        rotations = {
            local: [
                rope_tables(
                    b.positions,
                    jnp.asarray(cfg.inv_freq(local)),
                    cfg.rope_attention_factor(local),
                )
                for b in blocks
            ]
            for local in kinds
        }
        new_cache = []
        for i in range(cfg.num_layers):  # unrolled: faster decode than scan on CPU
            layer = DecoderLayer(
                cfg, self.dtype, self.packed, cfg.window(i), cfg.moe(i), name=f"layers_{i}"
            )
            local = bool(cfg.local_layers and cfg.local_layers[i])
            xs, kv = layer(xs, blocks, rotations[local], cache[i])
            new_cache.append(kv)
        norm = RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")
        xs = [norm(x) for x in xs]
        if not self.packed and not cfg.tie_word_embeddings:  # packed: its own "lm_head"
            self.param(
                "lm_head",
                nn.initializers.normal(0.02),
                (cfg.hidden_size, cfg.vocab_size),
                self.dtype,
            )
        params = self.variables["params"]
        outs = [
            logits_from_hidden(params, x, cfg, self.packed, _valid_rows((b,))) if b.head else x
            for x, b in zip(xs, blocks, strict=True)
        ]
        return outs, new_cache


def logits_from_hidden(
    params: dict,
    hidden: jax.Array,
    config: ModelConfig,
    packed: bool = False,
    valid_rows: jax.Array | None = None,
) -> jax.Array:
    """f32[B, T, V] from the final normed hidden states [B, T, D]; with `packed`, the rows
    of [B, T] flattened from `valid_rows` on are zeros, not computed (cpu_kernels.matmul)."""
    if packed:
        return cpu_kernels.matmul(hidden, params["lm_head"], config.vocab_size, valid_rows)
    if config.tie_word_embeddings:
        # Contract against the embedding's hidden axis directly; `x @ embed.T` made XLA
        # materialise a transposed copy of the embedding every step.
        return jax.lax.dot_general(
            hidden, params["embed_tokens"], (((2,), (1,)), ((), ())), preferred_element_type=F32
        )
    return jnp.einsum("btd,dv->btv", hidden, params["lm_head"], preferred_element_type=F32)
