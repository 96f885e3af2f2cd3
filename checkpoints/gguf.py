"""GGUF files: llama.cpp names and layouts translated to HF's; F32 / F16 / BF16 tensors keep
their dtype, quantized ones are dequantized to float32."""

from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.quants import dequantize

from checkpoints.gguf_config import ARCHITECTURES, config_from_metadata
from checkpoints.gguf_tokenizer import tokenizer_writer
from checkpoints.source import Checkpoint, CheckpointError

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
# Gemma 3's norms around the attention's and the MLP's outputs; its pre-MLP norm is what
# llama.cpp calls ffn_norm, which in the other families is HF's post_attention_layernorm.
_GEMMA3_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3 keeps HF's fused matrices: attn_qkv holds q;k;v rows, ffn_up gate;up rows.
_PHI3_NAMES = {
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_up": "mlp.gate_up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_ARCH_NAMES = {"gemma3": _GEMMA3_NAMES, "phi3": _PHI3_NAMES}
# Tensors folded into the config (rope scaling), not weights.
_ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Metadata arrays read only when the tokenizer is written: decoding them costs seconds.
_TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores")
# llama.cpp writes llama-arch Q/K rows interleaved for its rotary kernel (convert_hf_to_gguf's
# `permute`); qwen2 and qwen3 are written unpermuted.
_PERMUTED_ARCHS = ("llama", "mistral")
# Tensor types stored as plain floats: read as they are, not widened.
_FLOATS = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.BF16: ml_dtypes.bfloat16,
}


def field_value(field) -> object:
    """A GGUF metadata value as Python: str, int/float/bool, or a list of them."""
    kind, sub = field.types[0], field.types[-1]
    if kind == GGUFValueType.ARRAY and sub == GGUFValueType.STRING:
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    if kind == GGUFValueType.ARRAY:
        return [x for i in field.data for x in field.parts[i].tolist()]
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    return field.parts[field.data[0]].tolist()[0]


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """The HF name of a GGUF tensor, or None when a model of `arch` has no such tensor."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    names = _ARCH_NAMES.get(arch, _BLOCK_NAMES)
    match = _BLOCK.fullmatch(gguf_name)
    if match and match.group(2) in names:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{names[part]}.{kind}"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: per head, rows [r0, r2, .., r1, r3, ..] ← [r0, r1, ..]."""
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _supported(qtype: GGMLQuantizationType) -> bool:
    """Whether the gguf package dequantizes this type: probe it on one zero block."""
    if qtype not in GGML_QUANT_SIZES:
        return False
    try:
        dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _reader(path: Path) -> GGUFReader:
    try:
        return GGUFReader(path)
    except Exception as e:  # the parser's own errors vary: ValueError, IndexError, struct.error
        problem = f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{path}: not a readable GGUF file ({problem})") from None


def _check_fused_rows(path: Path, tensors: dict, shapes: dict, config: dict) -> None:
    """Phi-3's fused matrices must have exactly their parts' rows, else the engine's split
    (engine.weights) would cut q from k or gate from up in the wrong place."""
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    dim, inter = config["head_dim"], config["intermediate_size"] or 0
    want = {
        "qkv_proj": ((heads + 2 * kv) * dim, f"q;k;v rows: ({heads} + 2 x {kv}) heads x {dim}"),
        "gate_up_proj": (2 * inter, f"gate;up rows: 2 x feed_forward_length {inter}"),
    }
    for name, t in tensors.items():
        fused = name.split(".")[-2]
        if fused in want and shapes[name][0] != want[fused][0]:
            rows, parts = want[fused]
            raise CheckpointError(
                f"{path}: tensor {t.name} has {shapes[name][0]} rows; "
                f"a phi3 model's has {rows} ({parts})"
            )


def open_gguf(path: Path) -> Checkpoint:
    """Open a GGUF file of a llama / mistral / qwen2 / qwen3 / gemma3 / phi3 model."""
    reader = _reader(path)
    try:
        meta = {k: field_value(f) for k, f in reader.fields.items() if k not in _TOKENIZER_ARRAYS}
    except (UnicodeDecodeError, IndexError) as e:
        raise CheckpointError(f"{path}: unreadable GGUF metadata ({e})") from None
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}"
        )

    experts = meta.get(f"{arch}.expert_count")
    if experts:  # llama.cpp writes Mixtral as "llama", its experts stacked per layer
        raise CheckpointError(
            f"{path}: a mixture-of-experts GGUF ({arch}.expert_count = {experts}) is not "
            "supported; load Mixtral and Qwen3-MoE from their HF folders"
        )
    tensors, rope = {}, {}
    for t in reader.tensors:
        if t.name in _ROPE_TENSORS:  # llama3's and longrope's scaling, folded into the config
            rope[t.name] = dequantize(t.data, t.tensor_type)
            continue
        name = hf_name(t.name, arch)
        if name is None:
            raise CheckpointError(f"{path}: tensor {t.name} has no counterpart in a {arch} model")
        if not _supported(t.tensor_type):
            raise CheckpointError(
                f"{path}: tensor {t.name} uses quantization type {t.tensor_type.name}, "
                "which this gguf package cannot dequantize"
            )
        tensors[name] = t

    shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in tensors.items()}
    try:
        config = config_from_metadata(meta, shapes, rope)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if arch == "phi3":
        _check_fused_rows(path, tensors, shapes, config)
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}

    def field(key: str) -> object | None:
        return field_value(reader.fields[key]) if key in reader.fields else None

    def read(name: str, start: int, stop: int) -> np.ndarray:
        t, shape = tensors[name], shapes[name]
        proj = name.split(".")[-2]
        n_head = heads.get(proj) if arch in _PERMUTED_ARCHS else None
        lo, hi = start, stop
        if n_head:  # the permutation stays within a head: read whole heads
            head_rows = shape[0] // n_head
            lo, hi = lo - lo % head_rows, -(-hi // head_rows) * head_rows
        data = t.data[lo:hi]  # a quantized row is whole blocks, so rows slice the bytes
        try:
            if t.tensor_type in _FLOATS:  # copied out of the memory-mapped file
                w = np.array(data).view(_FLOATS[t.tensor_type])
            else:
                w = dequantize(data, t.tensor_type)
            w = w.reshape(hi - lo, *shape[1:])
        except (ValueError, IndexError) as e:
            raise CheckpointError(f"{path}: cannot dequantize {t.name} ({e})") from None
        if n_head:
            w = unpermute_rows(w, (hi - lo) // head_rows)[start - lo : stop - lo]
        if arch == "gemma3" and proj.endswith("norm"):
            w = w - np.float32(1.0)  # llama.cpp stores Gemma's norms as 1 + HF's weight
        return w

    has_tokenizer = "tokenizer.ggml.tokens" in reader.fields
    return Checkpoint(
        config=config,
        generation_config=None,
        tensor_names=list(tensors),
        shapes=shapes,
        source=path,
        missing_tokenizer=None if has_tokenizer else "no tokenizer in the GGUF metadata",
        _read=read,
        _write_tokenizer=tokenizer_writer(field, meta, path),
    )


def has_quantized_matrices(path: str | Path) -> bool:
    """Whether a GGUF file stores its layers' matrices in a quantized type (Q8_0, Q4_K, ...):
    the header only, no tensor is read."""
    reader = GGUFReader(path)
    return any(
        t.tensor_type not in _FLOATS
        for t in reader.tensors
        if _BLOCK.fullmatch(t.name) and len(t.shape) == 2
    )
