"""ModelConfig: the shape of a Llama-family transformer, read from an HF config dict.

checkpoints/ turns every source (HF folder, GGUF metadata, orbax cache) into an HF-style
config dict, so this is the one place those keys are interpreted.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_ROPE_TYPES = ("default", "llama3", "linear", "yarn", "longrope")


class ConfigError(ValueError):
    """A config the engine cannot run: unsupported architecture, missing or bad keys."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_scaling: tuple[tuple[str, Any], ...] = ()  # frozen form of the HF rope dict
    sliding_window: int | None = None
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head's q and k before rope
    # Gemma 3: layers of sliding-window attention with their own rope (the others global);
    # embeddings scaled by sqrt(hidden); GeGLU; norms around the attention and MLP outputs
    # too (its RMSNorm scales by 1 + weight: engine.weights adds the 1); attention scaled
    # by query_pre_attn_scalar**-0.5.
    local_layers: tuple[bool, ...] = ()  # per layer: sliding window and local rope
    local_rope_theta: float | None = None
    embed_scale: float | None = None
    hidden_act: str = "silu"  # or "gelu_tanh"
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None
    # longrope (Phi-3 128k, Phi-3.5): the long factors, for a context past the original one
    # (Engine sets it from max_len: one set of frequencies for every position of a sequence).
    long_context: bool = False
    # Mixture of experts (Mixtral, Qwen3-MoE; engine.moe): per layer, whether its feed-forward
    # is routed (Qwen3-MoE may keep some layers dense); each token goes to its top
    # `experts_per_token` of `num_experts` experts of width `moe_intermediate_size`, weighted
    # by the router's softmax over all experts, renormalized over the picks when
    # `norm_topk_prob`.
    moe_layers: tuple[bool, ...] = ()
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None and not archs:  # configs built in code name only the model_type
            by_type = {t: a for a, t in SUPPORTED_ARCHITECTURES.items()}
            by_type["gemma3_text"] = "Gemma3ForCausalLM"
            arch = by_type.get(cfg.get("model_type"))
        if arch is None:
            raise ConfigError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            family = SUPPORTED_ARCHITECTURES[arch]
            extra = _gemma3_fields(cfg) if family == "gemma3" else {}
            if family in ("mixtral", "qwen3_moe"):
                extra = _moe_fields(cfg, family)
            rope = _global_rope(cfg)
            theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type == "su":  # Phi-3's first name for longrope
                rope_type = rope["rope_type"] = "longrope"
            if rope_type not in _ROPE_TYPES:
                raise ConfigError(f"unsupported rope scaling type {rope_type!r}")
            partial = rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
            if float(partial) != 1.0:
                raise ConfigError(f"partial_rotary_factor {partial} is not supported")
            if rope_type in ("yarn", "longrope"):  # where HF reads the original context
                original = cfg.get(
                    "original_max_position_embeddings", cfg["max_position_embeddings"]
                )
                rope.setdefault("original_max_position_embeddings", original)
                rope.setdefault("max_position_embeddings", cfg["max_position_embeddings"])
            # Qwen2 configs carry a sliding_window that is disabled unless use_sliding_window.
            window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", family == "qwen2")),
                rope_scaling=_frozen(rope) if rope_type != "default" else (),
                sliding_window=int(window) if window else None,
                qk_norm=family in ("qwen3", "qwen3_moe", "gemma3"),
                **extra,
            )
        except KeyError as e:
            raise ConfigError(f"config is missing required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"config has a malformed value: {e}") from None

    @property
    def family(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def attn_scale(self) -> float:
        """What q.k is multiplied by before the softmax."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def moe(self, layer: int) -> bool:
        """Whether layer `layer`'s feed-forward is a mixture of experts (engine.moe)."""
        return bool(self.moe_layers and self.moe_layers[layer])

    def window(self, layer: int) -> int | None:
        """Layer `layer`'s sliding window (None: it attends to every earlier position)."""
        if self.local_layers:
            return self.sliding_window if self.local_layers[layer] else None
        return self.sliding_window

    def inv_freq(self, local: bool = False) -> np.ndarray:
        """RoPE inverse frequencies [head_dim/2], with HF's rope scaling applied; `local`:
        those of Gemma 3's sliding-window layers (their own base, unscaled)."""
        dim = self.head_dim
        exponents = np.arange(0, dim, 2, dtype=np.float64) / dim
        if local:
            return (1.0 / (self.local_rope_theta**exponents)).astype(np.float32)
        inv = 1.0 / (self.rope_theta**exponents)
        rope = dict(self.rope_scaling)
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "linear":
            inv = inv / float(rope["factor"])
        elif kind == "llama3":
            inv = _llama3_scaling(inv, rope)
        elif kind == "yarn":
            inv = _yarn_scaling(inv, rope, dim, self.rope_theta)
        elif kind == "longrope":
            factors = rope["long_factor" if self.long_context else "short_factor"]
            inv = inv / np.asarray(factors, np.float64)
        return inv.astype(np.float32)

    def for_context(self, max_len: int) -> ModelConfig:
        """This config serving `max_len` positions: longrope takes its long factors past the
        original context."""
        rope = dict(self.rope_scaling)
        if rope.get("rope_type") != "longrope":
            return self
        long = max_len > int(rope["original_max_position_embeddings"])
        return dataclasses.replace(self, long_context=long)

    def rope_attention_factor(self, local: bool = False) -> float:
        """What cos and sin are multiplied by (YaRN's attention factor; 1 otherwise)."""
        rope = dict(self.rope_scaling)
        kind = rope.get("rope_type", rope.get("type"))
        if local or kind not in ("yarn", "longrope"):
            return 1.0
        if rope.get("attention_factor") is not None:
            return float(rope["attention_factor"])
        original = float(rope["original_max_position_embeddings"])
        factor = float(rope.get("factor") or rope["max_position_embeddings"] / original)
        if kind == "longrope":
            return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        mscale, all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if mscale and all_dim:
            return _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(all_dim))
        return _yarn_mscale(factor)


def _global_rope(cfg: dict) -> dict:
    """The rope dict of the (global) attention layers: transformers 5 nests it per layer
    type in rope_parameters; older configs keep rope_theta beside a rope_scaling dict."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "full_attention" in params:
        return dict(params["full_attention"])
    return params


def _gemma3_fields(cfg: dict) -> dict:
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:  # Gemma 2's; Gemma 3 configs set them null
            raise ConfigError(f"{key} is not supported")
    layers = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types")
    if types is None:  # older configs: every `sliding_window_pattern`-th layer is global
        pattern = int(cfg.get("sliding_window_pattern", 6))
        types = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(layers)
        ]
    local = dict((cfg.get("rope_parameters") or {}).get("sliding_attention") or {})
    if local.get("rope_type", "default") != "default":
        raise ConfigError(f"unsupported local rope type {local['rope_type']!r}")
    return dict(
        local_layers=tuple(t == "sliding_attention" for t in types),
        local_rope_theta=float(local.get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))),
        embed_scale=float(cfg["hidden_size"]) ** 0.5,
        hidden_act="gelu_tanh",
        sandwich_norms=True,
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or cfg["head_dim"]),
    )


def _moe_fields(cfg: dict, family: str) -> dict:
    """Mixtral routes every layer, with experts as wide as intermediate_size and the picks'
    weights always renormalized; Qwen3-MoE routes every decoder_sparse_step-th layer not in
    mlp_only_layers, with experts of moe_intermediate_size, renormalized if norm_topk_prob."""
    layers = int(cfg["num_hidden_layers"])
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    picks = int(cfg["num_experts_per_tok"])
    if not 0 < picks <= experts:
        raise ConfigError(f"num_experts_per_tok {picks} with {experts} experts")
    if family == "mixtral":
        return dict(
            moe_layers=(True,) * layers,
            num_experts=experts,
            experts_per_token=picks,
            moe_intermediate_size=int(cfg["intermediate_size"]),
        )
    step = int(cfg.get("decoder_sparse_step") or 1)
    dense = set(cfg.get("mlp_only_layers") or ())
    return dict(
        moe_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(layers)),
        num_experts=experts,
        experts_per_token=picks,
        moe_intermediate_size=int(cfg["moe_intermediate_size"]),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
    )


def _frozen(rope: dict) -> tuple:
    """The rope dict as sorted items, lists as tuples: the config stays hashable."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rope.items()))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_scaling(inv: np.ndarray, rope: dict, dim: int, theta: float) -> np.ndarray:
    """YaRN (HF's _compute_yarn_parameters): interpolate the low frequencies by `factor`,
    keep the high ones, ramp linearly between the dimensions of beta_fast and beta_slow
    rotations over the original context."""
    factor = float(rope["factor"])
    original = float(rope["original_max_position_embeddings"])
    fast, slow = float(rope.get("beta_fast") or 32), float(rope.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(fast), dim_of(slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    return inv / factor * (1 - keep) + inv * keep


def _llama3_scaling(inv: np.ndarray, rope: dict) -> np.ndarray:
    """Llama 3.1's frequency-dependent RoPE scaling (as in HF's _compute_llama3_parameters)."""
    factor = float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_ctx = float(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)
