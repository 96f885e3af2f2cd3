"""Small GGUF files written here, the way llama.cpp's converter writes them: names, Q/K row
permutation, quantization. Opening them must give back the HF tensors."""

import json

import gguf
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from checkpoints import CheckpointError, open_checkpoint
from checkpoints.gguf import has_quantized_matrices
from checkpoints.gguf_config import llama3_rope_scaling

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 64, 96, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
_GGUF_PARTS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}


def hf_tensors(
    layers: int = 2, bias: bool = False, tied: bool = False, qk_norm: bool = False
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        }
        if qk_norm:
            shapes |= {
                p + "self_attn.q_norm.weight": (HEAD_DIM,),
                p + "self_attn.k_norm.weight": (HEAD_DIM,),
            }
        if bias:
            shapes |= {
                p + "self_attn.q_proj.bias": (HEADS * HEAD_DIM,),
                p + "self_attn.k_proj.bias": (KV_HEADS * HEAD_DIM,),
                p + "self_attn.v_proj.bias": (KV_HEADS * HEAD_DIM,),
            }
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def gguf_name(hf: str) -> str:
    globals_ = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in globals_:
        return globals_[hf]
    _, _, layer, rest = hf.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_PARTS[part]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, in numpy."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    path,
    tensors: dict[str, np.ndarray],
    *,
    arch: str = "llama",
    qtype: Q = Q.F32,
    layers: int = 2,
    overrides: dict | None = None,
    extra_tensors: dict | None = None,
    tokenizer: bool = False,
):
    """Write `tensors` (HF names) as llama.cpp would; 2-D tensors quantized to `qtype`."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if tokenizer:  # a byte-level BPE vocabulary of a few tokens, as llama.cpp stores one
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(_TOKENS)
        writer.add_token_types([3, 3, 3] + [1] * (len(_TOKENS) - 3))
        writer.add_token_merges(["a b", "Ġ ab"])
        writer.add_chat_template(_TEMPLATE)
    for key, value in (overrides or {}).items():
        writer.add_uint32(key, value)
    for name, w in tensors.items():
        if arch in ("llama", "mistral") and "q_proj" in name:
            w = llama_cpp_permute(w, HEADS)
        elif arch in ("llama", "mistral") and "k_proj" in name:
            w = llama_cpp_permute(w, KV_HEADS)
        if w.ndim == 2 and qtype != Q.F32:
            writer.add_tensor(gguf_name(name), quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), w)
    for name, (data, raw_dtype) in (extra_tensors or {}).items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


_TOKENS = ["<unk>", "<s>", "</s>", "a", "b", "Ġ", "ab", "Ġab"]
_TEMPLATE = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"


# max |dequantized - original| / max |original| each type stays within on Gaussian data
_TOLERANCE = {
    Q.F32: 0.0,
    Q.F16: 1e-3,
    Q.BF16: 1e-2,
    Q.Q8_0: 1e-2,
    Q.Q5_0: 0.05,
    Q.Q5_1: 0.05,
    Q.Q4_0: 0.1,
    Q.Q4_1: 0.1,
}


# Plain float types keep their dtype; quantized ones come dequantized to float32.
_DTYPE = {Q.F16: np.float16, Q.BF16: ml_dtypes.bfloat16}


@pytest.mark.parametrize("qtype", list(_TOLERANCE), ids=lambda q: q.name)
def test_quantized_llama_file_gives_hf_tensors(tmp_path, qtype):
    tensors = hf_tensors()
    checkpoint = open_checkpoint(write_gguf(tmp_path / "m.gguf", tensors, qtype=qtype))
    assert sorted(checkpoint.tensor_names) == sorted(tensors)
    for name, want in tensors.items():
        got = checkpoint.tensor(name)
        dtype = _DTYPE.get(qtype, np.float32) if want.ndim == 2 else np.float32
        assert got.dtype == dtype and got.shape == want.shape, name
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= _TOLERANCE[qtype] * scale, name
        if want.ndim == 2 and qtype != Q.F32:
            # exactly the package's own round trip: names and un-permutation are right
            np.testing.assert_array_equal(got, dequantize(quantize(want, qtype), qtype))


@pytest.mark.parametrize("qtype", [Q.F32, Q.BF16, Q.Q4_1], ids=lambda q: q.name)
def test_rows_read_alone_equal_the_whole_tensors_rows(tmp_path, qtype):
    # q/k rows are permuted within each head: a range that cuts a head still comes out right
    checkpoint = open_checkpoint(write_gguf(tmp_path / "m.gguf", hf_tensors(), qtype=qtype))
    for name in (
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
    ):
        whole = checkpoint.tensor(name)
        for start, stop in ((0, 1), (3, 21), (HEAD_DIM - 1, whole.shape[0])):
            np.testing.assert_array_equal(checkpoint.tensor(name, start, stop), whole[start:stop])


def test_config_from_metadata(tmp_path):
    checkpoint = open_checkpoint(write_gguf(tmp_path / "m.gguf", hf_tensors()))
    c = checkpoint.config
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (HIDDEN, INTER, 2)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (4, 2, 16)
    assert c["vocab_size"] == VOCAB and c["max_position_embeddings"] == 256
    assert c["rms_norm_eps"] == 1e-5 and c["rope_theta"] == 10000.0
    assert c["tie_word_embeddings"] is False and c["attention_bias"] is False
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)


def test_qwen2_biases_unpermuted_and_tied(tmp_path):
    tensors = hf_tensors(bias=True, tied=True)
    checkpoint = open_checkpoint(write_gguf(tmp_path / "q.gguf", tensors, arch="qwen2"))
    assert checkpoint.config["architectures"] == ["Qwen2ForCausalLM"]
    assert checkpoint.config["tie_word_embeddings"] is True
    assert checkpoint.config["attention_bias"] is True
    for name, want in tensors.items():
        np.testing.assert_array_equal(checkpoint.tensor(name), want, err_msg=name)


def test_qwen3_head_norms_unpermuted(tmp_path):
    tensors = hf_tensors(tied=True, qk_norm=True)
    checkpoint = open_checkpoint(write_gguf(tmp_path / "q3.gguf", tensors, arch="qwen3"))
    assert checkpoint.config["architectures"] == ["Qwen3ForCausalLM"]
    assert checkpoint.config["attention_bias"] is False
    for name, want in tensors.items():
        np.testing.assert_array_equal(checkpoint.tensor(name), want, err_msg=name)


def test_tokenizer_from_metadata(tmp_path):
    from transformers import AutoTokenizer

    path = write_gguf(tmp_path / "m.gguf", hf_tensors(), tokenizer=True)
    open_checkpoint(path).save_tokenizer(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tokenizer("ab ab</s>")["input_ids"] == [6, 7, 2]
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    assert tokenizer.chat_template == _TEMPLATE
    assert (
        json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["chat_template"]
        == _TEMPLATE
    )


def test_file_without_tokenizer_says_so_at_open(tmp_path):
    checkpoint = open_checkpoint(write_gguf(tmp_path / "m.gguf", hf_tensors()))
    assert checkpoint.missing_tokenizer == "no tokenizer in the GGUF metadata"
    with pytest.raises(CheckpointError, match="m.gguf: no tokenizer in the GGUF metadata"):
        checkpoint.require_tokenizer()
    with pytest.raises(CheckpointError, match="no tokenizer in the GGUF metadata"):
        checkpoint.save_tokenizer(tmp_path / "tok")
    assert not (tmp_path / "tok").exists()
    with_tokenizer = write_gguf(tmp_path / "t.gguf", hf_tensors(), tokenizer=True)
    assert open_checkpoint(with_tokenizer).missing_tokenizer is None


def test_unsupported_quant_type_is_named(tmp_path):
    block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    raw = np.zeros((HIDDEN, HIDDEN // block * size), np.uint8)
    tensors = hf_tensors()
    del tensors["model.layers.0.self_attn.o_proj.weight"]
    path = write_gguf(
        tmp_path / "m.gguf", tensors, extra_tensors={"blk.0.attn_output.weight": (raw, Q.Q8_1)}
    )
    with pytest.raises(CheckpointError, match="Q8_1"):
        open_checkpoint(path)


def test_unsupported_architecture_is_named(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_tensors(), arch="gpt2")
    with pytest.raises(CheckpointError, match="unsupported GGUF architecture 'gpt2'"):
        open_checkpoint(path)


def test_layer_count_mismatch(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_tensors(layers=2), layers=3)
    with pytest.raises(CheckpointError, match="declares 3 layers.*model.layers.2"):
        open_checkpoint(path)


def test_truncated_file(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_tensors())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        open_checkpoint(path)


def _llama_cpp_rope_factors(theta, dim, factor, low, high, original):
    """llama.cpp's LlamaModel.generate_extra_tensors for llama3 rope scaling."""
    freqs = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    out = []
    for wavelen in 2 * np.pi / freqs:
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def test_llama3_rope_scaling_recovered_from_rope_freqs():
    factors = _llama_cpp_rope_factors(500000.0, 128, 8.0, 1.0, 4.0, 8192)
    scaling = llama3_rope_scaling(factors, 128, 500000.0)
    assert scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def test_rope_freqs_tensor_sets_llama3_config(tmp_path):
    factors = _llama_cpp_rope_factors(10000.0, HEAD_DIM, 4.0, 1.0, 4.0, 64)
    path = write_gguf(
        tmp_path / "m.gguf", hf_tensors(), extra_tensors={"rope_freqs.weight": (factors, None)}
    )
    scaling = open_checkpoint(path).config["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 4.0


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_1], ids=lambda q: q.name)
def test_quantized_matrices_told_from_the_header(tmp_path, qtype):
    """What decides whether a GGUF file loads as int8 off the CPU (engine.loading)."""
    path = write_gguf(tmp_path / "m.gguf", hf_tensors(), qtype=qtype)
    assert has_quantized_matrices(path) == (qtype in (Q.Q8_0, Q.Q4_1))
