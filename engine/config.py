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
}


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
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before the rotation

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None and not archs:  # configs built in code name only the model_type
            by_type = {t: a for a, t in SUPPORTED_ARCHITECTURES.items()}
            arch = by_type.get(cfg.get("model_type"))
        if arch is None:
            raise ConfigError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
            theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ("default", "llama3", "linear"):
                raise ConfigError(f"unsupported rope scaling type {rope_type!r}")
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
                attention_bias=bool(
                    cfg.get("attention_bias", SUPPORTED_ARCHITECTURES[arch] == "qwen2")
                ),
                rope_scaling=tuple(sorted(rope.items())) if rope_type != "default" else (),
                sliding_window=int(window) if window else None,
                qk_norm=SUPPORTED_ARCHITECTURES[arch] == "qwen3",
            )
        except KeyError as e:
            raise ConfigError(f"config is missing required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"config has a malformed value: {e}") from None

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim/2], with HF's rope scaling applied."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        rope = dict(self.rope_scaling)
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "linear":
            inv = inv / float(rope["factor"])
        elif kind == "llama3":
            inv = _llama3_scaling(inv, rope)
        return inv.astype(np.float32)


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
