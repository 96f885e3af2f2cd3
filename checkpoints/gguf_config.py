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
    "phi3": ("Phi3ForCausalLM", "phi3"),
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


def longrope_scaling(
    long: np.ndarray | None, short: np.ndarray | None, meta: dict, rotary_dim: int
) -> dict:
    """HF's longrope rope_scaling from llama.cpp's `rope_factors_long` / `rope_factors_short`
    tensors (Phi-3 128k, Phi-3.5). The attention factor llama.cpp also stores is left out:
    its converter derives it from the two context lengths, as HF does from the config."""
    arch = meta["general.architecture"]
    if long is None or short is None:
        have, lack = ("long", "short") if short is None else ("short", "long")
        raise CheckpointError(f"rope_factors_{have}.weight without rope_factors_{lack}.weight")
    for kind, factors in (("long", long), ("short", short)):
        if np.size(factors) != rotary_dim // 2:  # one factor per rotated pair of dims
            raise CheckpointError(
                f"rope_factors_{kind}.weight has {np.size(factors)} factors; "
                f"rope over {rotary_dim} dims of each head needs {rotary_dim // 2}"
            )
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if not original:
        raise CheckpointError(
            f"longrope factors but no {arch}.rope.scaling.original_context_length in the metadata"
        )
    return {
        "rope_type": "longrope",
        "short_factor": [_f32(x) for x in np.asarray(short).reshape(-1)],
        "long_factor": [_f32(x) for x in np.asarray(long).reshape(-1)],
        "original_max_position_embeddings": int(original),
    }


def _rope_scaling(meta: dict, arch: str, rope: dict, head_dim: int, theta: float) -> dict | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    long, short = rope.get("rope_factors_long.weight"), rope.get("rope_factors_short.weight")
    if long is not None or short is not None:  # phi3 writes no scaling type, only these
        rotary = int(meta.get(f"{arch}.rope.dimension_count") or head_dim)
        return longrope_scaling(long, short, meta, rotary)
    if kind in ("linear", "yarn") and factor:
        scaling = {"rope_type": kind, "factor": _f32(factor)}
        original = meta.get(f"{arch}.rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if kind not in (None, "none"):
        raise CheckpointError(f"unsupported rope scaling type {kind!r}")
    if rope.get("rope_freqs.weight") is not None:
        return llama3_rope_scaling(rope["rope_freqs.weight"], head_dim, theta)
    return None


def config_from_metadata(
    meta: dict, shapes: dict[str, tuple], rope: dict[str, np.ndarray] | None = None
) -> dict:
    """HF config keys from GGUF metadata; `shapes` (HF names) fill in what metadata omits;
    `rope`: the file's rope tensors (rope_freqs, rope_factors_long / _short) by GGUF name."""
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
        "rope_scaling": _rope_scaling(meta, arch, rope or {}, head_dim, theta),
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
    if get("attention.sliding_window"):  # phi3 writes 0 for none (Phi-4)
        config["sliding_window"] = int(get("attention.sliding_window"))
    rotary = get("rope.dimension_count")
    if rotary and int(rotary) != head_dim:  # rope over part of each head: the engine refuses it
        config["partial_rotary_factor"] = int(rotary) / head_dim
    original = get("rope.scaling.original_context_length")
    if arch == "phi3" and original:  # a top-level key in HF's Phi-3 configs
        config["original_max_position_embeddings"] = int(original)
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
