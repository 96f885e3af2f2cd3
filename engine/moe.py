"""Mixture-of-experts feed-forward (Mixtral, Qwen3-MoE): each token goes to its top-k
experts, whose outputs are added weighted by the router.

A layer's routed "mlp" holds `router` {kernel [D, E]} and `experts` {gate_up_proj
{kernel [E, D, 2, I]}, down_proj {kernel [E, I, D]}}, or with weights quantized by
engine.quantize codes of those shapes and a `scale` per expert and output column ([E, 2, I],
[E, D]). The router's softmax is taken in float32 over all experts, the top k kept (and
renormalized over them where the family does), as HF's routers do.

Three ways to run the experts, the same arithmetic per (token, expert) pair; `dispatch`
picks one at trace time from the number of tokens and the backend:
- "gather": each pick's two matrices gathered and multiplied — reads only the experts
  picked, for decode of a few tokens (fewer picks than experts);
- "dense": every expert on every token, weighted by router weights that are zero off the
  picks — E / k times the products, as plain batched matmuls; XLA's CPU lowers a ragged dot
  to the same masked dense product, so on the CPU this is the one to use;
- "grouped": the picks sorted by expert and multiplied with `jax.lax.ragged_dot` over
  contiguous groups — exactly the products needed, on GPU (Triton) and TPU (native).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from engine.config import ModelConfig

F32 = jnp.float32
DISPATCHES = ("gather", "dense", "grouped")


def dispatch(tokens: int, config: ModelConfig, platform: str) -> str:
    """How `tokens` tokens run their experts on `platform` (see the module's docstring)."""
    if tokens * config.experts_per_token < config.num_experts:
        return "gather"
    return "dense" if platform == "cpu" else "grouped"


def route(x: jax.Array, router: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """x [N, D] → (weights f32[N, k], expert ids i32[N, k]) of each token's top-k experts."""
    logits = jnp.dot(x, router.astype(x.dtype), preferred_element_type=F32)
    probs = jax.nn.softmax(logits.astype(F32), axis=-1)
    weights, experts = jax.lax.top_k(probs, config.experts_per_token)
    if config.norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts


def routed_mlp(
    x: jax.Array,
    params: dict,
    config: ModelConfig,
    act: Callable[[jax.Array], jax.Array],
    how: str,
) -> jax.Array:
    """The routed feed-forward of tokens x [N, D] → [N, D] in x's dtype, run `how`."""
    weights, experts = route(x, params["router"]["kernel"], config)
    up, down = params["experts"]["gate_up_proj"], params["experts"]["down_proj"]
    run = {"gather": _gathered, "dense": _dense, "grouped": _grouped}[how]
    return run(x, weights, experts, up, down, act).astype(x.dtype)


def _scale(module: dict, ids: jax.Array | None = None) -> jax.Array | float:
    """A quantized module's per-column scales (of experts `ids`, or all), or 1."""
    if "scale" not in module:
        return 1.0
    return module["scale"] if ids is None else module["scale"][ids]


def _gathered(x, weights, experts, up, down, act) -> jax.Array:
    dtype, (n, k) = x.dtype, experts.shape

    # A loop over the picks, each reading its expert's matrices in place: on XLA's CPU a
    # product batched over gathered experts ran 8x slower from 4 picks on.
    def one(pick: tuple[jax.Array, jax.Array]) -> jax.Array:
        xv, e = pick
        first = (((0,), (0,)), ((), ()))  # x [D] against w [D, 2, I]
        gate_up = jax.lax.dot_general(
            xv, up["kernel"][e].astype(dtype), first, preferred_element_type=F32
        )
        gate_up = gate_up * _scale(up, e)
        h = (act(gate_up[0]) * gate_up[1]).astype(dtype)
        out = jnp.dot(h, down["kernel"][e].astype(dtype), preferred_element_type=F32)
        return out * _scale(down, e)

    out = jax.lax.map(one, (jnp.repeat(x, k, axis=0), experts.reshape(-1)))
    return jnp.einsum("nkd,nk->nd", out.reshape(n, k, -1), weights)


def _dense(x, weights, experts, up, down, act) -> jax.Array:
    dtype, (num_experts, d, _, inter) = x.dtype, up["kernel"].shape
    # Batched over experts, each expert's matrix read as stored: contracting x against the
    # whole [E, D, 2, I] at once made XLA's CPU transpose the experts on every call.
    per_expert = (((2,), (1,)), ((0,), (0,)))
    xs = jnp.broadcast_to(x, (num_experts, *x.shape))
    rhs = up["kernel"].reshape(num_experts, d, 2 * inter).astype(dtype)
    gate_up = jax.lax.dot_general(xs, rhs, per_expert, preferred_element_type=F32)
    gate_up = gate_up.reshape(num_experts, -1, 2, inter) * _per_expert(_scale(up))
    h = (act(gate_up[..., 0, :]) * gate_up[..., 1, :]).astype(dtype)
    rhs = down["kernel"].astype(dtype)
    out = jax.lax.dot_general(h, rhs, per_expert, preferred_element_type=F32)
    out = out * _per_expert(_scale(down))
    # [N, E]: each token's weight for every expert, zero off its picks
    spread = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=F32) * weights[..., None], axis=1)
    return jnp.einsum("end,ne->nd", out, spread)


def _per_expert(scale: jax.Array | float) -> jax.Array | float:
    """Scales [E, *F] made to broadcast over [E, N, *F]."""
    if isinstance(scale, float):
        return scale
    return scale.reshape(scale.shape[0], 1, *scale.shape[1:])


def _grouped(x, weights, experts, up, down, act) -> jax.Array:
    dtype, (n, k) = x.dtype, experts.shape
    num_experts, d, _, inter = up["kernel"].shape
    picks = experts.reshape(-1)
    order = jnp.argsort(picks, stable=True)  # picks sorted by expert: contiguous groups
    sorted_experts, token = picks[order], order // k
    sizes = jnp.bincount(picks, length=num_experts).astype(jnp.int32)
    rhs = up["kernel"].reshape(num_experts, d, 2 * inter).astype(dtype)
    gate_up = jax.lax.ragged_dot(x[token], rhs, sizes, preferred_element_type=F32)
    gate_up = gate_up.reshape(-1, 2, inter) * _scale(up, sorted_experts)
    h = (act(gate_up[:, 0]) * gate_up[:, 1]).astype(dtype)
    out = jax.lax.ragged_dot(h, down["kernel"].astype(dtype), sizes, preferred_element_type=F32)
    out = out * _scale(down, sorted_experts) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((n, out.shape[-1]), F32).at[token].add(out)


class _Matrix(nn.Module):
    """A stored matrix: {"kernel"}, or {"kernel", "scale"} once quantized at load time."""

    shape: tuple[int, ...]
    dtype: jnp.dtype

    @nn.compact
    def __call__(self) -> dict:
        if self.has_variable("params", "scale"):  # quantized at load time, never initialised
            return {n: self.get_variable("params", n) for n in ("kernel", "scale")}
        init = nn.initializers.normal(0.02)
        return {"kernel": self.param("kernel", init, self.shape, self.dtype)}


class _Experts(nn.Module):
    config: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self) -> dict:
        cfg = self.config
        e, d, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        return {
            "gate_up_proj": _Matrix((e, d, 2, i), self.dtype, name="gate_up_proj")(),
            "down_proj": _Matrix((e, i, d), self.dtype, name="down_proj")(),
        }


class RoutedMLP(nn.Module):
    """engine.model's feed-forward for a routed layer: tokens [..., D] → [..., D]."""

    config: ModelConfig
    dtype: jnp.dtype
    act: Callable[[jax.Array], jax.Array]

    @nn.compact
    def __call__(self, x: jax.Array, valid_rows: jax.Array | None = None) -> jax.Array:
        del valid_rows  # padding tokens are routed too; nothing reads their output
        cfg = self.config
        params = {
            "router": _Matrix((cfg.hidden_size, cfg.num_experts), self.dtype, name="router")(),
            "experts": _Experts(cfg, self.dtype, name="experts")(),
        }
        flat = x.reshape(-1, x.shape[-1])
        how = dispatch(flat.shape[0], cfg, jax.default_backend())
        return routed_mlp(flat, params, cfg, self.act, how).reshape(x.shape)
