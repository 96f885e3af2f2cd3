"""An HF config.json dict built from a GGUF file's llama.cpp metadata."""

from __future__ import annotations

import numpy as np

from checkpoints.source import CheckpointError

# GGUF general.architecture → (HF architectures entry, HF model_type)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}
# What llama.cpp assumes of Gemma 3 rather than store: every 6th layer global, the others a
# sliding window with a rope base of 10,000; GELU (tanh); q scaled by head_dim**-0.5 except
# in the 27B model (hidden / heads).
_GEMMA3_PATTERN = 6
_GEMMA3_LOCAL_BASE = 10000.0
# llama.cpp assumes these when Llama 3.1 writes its rope scaling as a `rope_freqs` tensor.
_LLAMA3_ORIGINAL_CONTEXT = 8192
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}


def _f32(value: float) -> float:
    """The shortest decimal of a float32 value: 9.99999974e-06 → 1e-05, as config.json has it."""
    return float(str(np.float32(value)))


def llama3_rope_scaling(factors: np.ndarray, head_dim: int, theta: float) -> dict:
    """Recover HF's llama3 rope_scaling from llama.cpp's per-frequency `rope_freqs` factors.

    HF scales each wavelength w by 1 (short w), `factor` (long w) or, between, by r with
    1/r = (1 - s)/factor + s and s = (L/w - low)/(high - low): s is linear in 1/w, so two
    in-between factors fix L/(high - low) and low/(high - low). Any L then gives the same
    frequencies; we take llama.cpp's 8192.
    """
    factors = np.asarray(factors, np.float64).reshape(-1)
    factor = float(factors.max())
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / inv_freq[: factors.size]
    between = (factors > 1 + 1e-6) & (factors < factor - 1e-6)
    scaling = {
        "rope_type": "llama3",
        "factor": _f32(factor),
        "original_max_position_embeddings": _LLAMA3_ORIGINAL_CONTEXT,
        **_LLAMA3_DEFAULTS,
    }
    if between.sum() >= 2 and factor > 1:
        s = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[between], s, 1)
        span = _LLAMA3_ORIGINAL_CONTEXT / slope
        low = -intercept * span
        scaling["low_freq_factor"] = float(f"{low:.6g}")
        scaling["high_freq_factor"] = float(f"{low + span:.6g}")
    return scaling


def _rope_scaling(meta: dict, arch: str, rope_freqs, head_dim: int, theta: float) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind in ("linear", "yarn") and factor:
        scaling = {"rope_type": kind, "factor": _f32(factor)}
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if kind not in (None, "none"):
        raise CheckpointError(f"unsupported rope scaling type {kind!r}")
    if rope_freqs is not None:
        return llama3_rope_scaling(rope_freqs, head_dim, theta)
    return None


def config_from_metadata(meta: dict, shapes: dict[str, tuple], rope_freqs=None) -> dict:
    """HF config keys from GGUF metadata; `shapes` (HF names) fill in what metadata omits."""
    arch = meta["general.architecture"]
    hf_arch, model_type = ARCHITECTURES[arch]

    def get(key: str, default=None):
        return meta.get(f"{arch}.{key}", default)

    required = ("embedding_length", "block_count", "attention.head_count")
    missing = [k for k in required if get(k) is None]
    if missing:
        raise CheckpointError(f"GGUF metadata lacks {', '.join(f'{arch}.{k}' for k in missing)}")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length") or hidden // heads)
    theta = _f32(get("rope.freq_base", 10000.0))
    embed = shapes.get("model.embed_tokens.weight", (None,))
    config = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "vocab_size": get("vocab_size") or embed[0],
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(meta, arch, rope_freqs, head_dim, theta),
        "max_position_embeddings": get("context_length"),
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in shapes,
        "hidden_act": "silu",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",  # what tensor() returns after dequantizing
    }
    if meta.get("tokenizer.ggml.padding_token_id") is not None:
        config["pad_token_id"] = meta["tokenizer.ggml.padding_token_id"]
    if get("attention.sliding_window"):
        config["sliding_window"] = int(get("attention.sliding_window"))
    if arch == "gemma3":
        layers = config["num_hidden_layers"]
        config["layer_types"] = [
            "full_attention" if (i + 1) % _GEMMA3_PATTERN == 0 else "sliding_attention"
            for i in range(layers)
        ]
        config["rope_local_base_freq"] = _GEMMA3_LOCAL_BASE
        del config["hidden_act"]
        config["hidden_activation"] = "gelu_pytorch_tanh"
        big = "27b" in str(meta.get("general.size_label", "")).lower()
        config["query_pre_attn_scalar"] = hidden // heads if big else head_dim
    return config
