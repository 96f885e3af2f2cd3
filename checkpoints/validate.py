"""Hold a checkpoint's tensors against what its config declares, before anyone reads them."""

from __future__ import annotations

import re

from checkpoints.source import SUPPORTED_ARCHITECTURES, Checkpoint, CheckpointError

_REQUIRED_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def architecture(config: dict) -> str:
    """The config's supported architecture name, or CheckpointError naming what it is."""
    names = config.get("architectures") or []
    if not names:  # an old config.json may only say model_type
        names = [_BY_MODEL_TYPE.get(config.get("model_type"), "")]
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    found = ", ".join(n for n in names if n) or f"model_type={config.get('model_type')!r}"
    raise CheckpointError(
        f"unsupported architecture {found}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name → shape for a Llama-family causal LM with this config."""
    missing = [key for key in _REQUIRED_KEYS if config.get(key) is None]
    if missing:
        raise CheckpointError(f"config lacks {', '.join(missing)}")
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    # Qwen2 always has q/k/v biases; its config.json does not say so.
    qkv_bias = config.get("attention_bias") or config.get("model_type") == "qwen2"

    gemma = architecture(config) == "Gemma3ForCausalLM"
    phi3 = architecture(config) == "Phi3ForCausalLM"
    routed = _routed_layers(config)
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        if phi3:  # q/k/v and gate/up fused
            shapes[p + "self_attn.qkv_proj.weight"] = ((heads + 2 * kv_heads) * head_dim, hidden)
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * inter, hidden)
        else:
            shapes[p + "self_attn.q_proj.weight"] = (heads * head_dim, hidden)
            shapes[p + "self_attn.k_proj.weight"] = (kv_heads * head_dim, hidden)
            shapes[p + "self_attn.v_proj.weight"] = (kv_heads * head_dim, hidden)
        if routed[i]:
            shapes.update(_expert_shapes(config, p))
        elif not phi3:
            shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
            shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        if not routed[i]:
            shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, heads * head_dim)
        if qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (heads * head_dim,)
            shapes[p + "self_attn.k_proj.bias"] = (kv_heads * head_dim,)
            shapes[p + "self_attn.v_proj.bias"] = (kv_heads * head_dim,)
        if gemma:  # norms around the attention's and the MLP's outputs too
            shapes[p + "pre_feedforward_layernorm.weight"] = (hidden,)
            shapes[p + "post_feedforward_layernorm.weight"] = (hidden,)
        if gemma or architecture(config) in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
            # RMSNorm of each q / k head
            shapes[p + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (head_dim,)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def _routed_layers(config: dict) -> list[bool]:
    """Per layer, whether its feed-forward is a mixture of experts (as engine.config reads it:
    every Mixtral layer; Qwen3-MoE's every decoder_sparse_step-th not in mlp_only_layers)."""
    layers, arch = config["num_hidden_layers"], architecture(config)
    if arch == "MixtralForCausalLM":
        return [True] * layers
    if arch != "Qwen3MoeForCausalLM":
        return [False] * layers
    step, dense = config.get("decoder_sparse_step") or 1, set(config.get("mlp_only_layers") or ())
    return [i not in dense and (i + 1) % step == 0 for i in range(layers)]


def _expert_shapes(config: dict, prefix: str) -> dict[str, tuple[int, ...]]:
    """A routed layer's router and experts, under Mixtral's or Qwen3-MoE's names."""
    hidden = config["hidden_size"]
    experts = config.get("num_experts") or config.get("num_local_experts")
    if not experts:
        raise CheckpointError("config lacks num_experts / num_local_experts")
    if architecture(config) == "MixtralForCausalLM":
        inter, block, parts = config["intermediate_size"], "block_sparse_moe", ("w1", "w3", "w2")
    else:
        if config.get("moe_intermediate_size") is None:
            raise CheckpointError("config lacks moe_intermediate_size")
        inter, block = config["moe_intermediate_size"], "mlp"
        parts = ("gate_proj", "up_proj", "down_proj")
    shapes = {f"{prefix}{block}.gate.weight": (experts, hidden)}
    for j in range(experts):
        e = f"{prefix}{block}.experts.{j}."
        shapes[e + f"{parts[0]}.weight"] = (inter, hidden)
        shapes[e + f"{parts[1]}.weight"] = (inter, hidden)
        shapes[e + f"{parts[2]}.weight"] = (hidden, inter)
    return shapes


def validate_tensors(checkpoint: Checkpoint) -> None:
    """Raise CheckpointError unless every tensor the config implies is present with its shape,
    and no tensor belongs to a layer the config does not declare."""
    where = checkpoint.source
    try:
        architecture(checkpoint.config)
        expected = expected_shapes(checkpoint.config)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from None

    missing = [name for name in expected if name not in checkpoint.shapes]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(
            f"{where}: the config declares {checkpoint.config['num_hidden_layers']} layers, "
            f"but tensors are missing: {', '.join(missing[:3])}{more}"
        )
    layers = checkpoint.config["num_hidden_layers"]
    for name in checkpoint.tensor_names:
        match = _LAYER.match(name)
        if match and int(match.group(1)) >= layers:
            raise CheckpointError(
                f"{where}: tensor {name} is beyond the {layers} layers the config declares"
            )
    for name, shape in expected.items():
        if tuple(checkpoint.shapes[name]) != shape:
            raise CheckpointError(
                f"{where}: tensor {name} has shape {tuple(checkpoint.shapes[name])}, "
                f"the config implies {shape}"
            )
