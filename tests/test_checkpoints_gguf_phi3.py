"""Phi-3 GGUF files (llama.cpp's `phi3`: fused attn_qkv and ffn_up, longrope as factor
tensors) written here from tiny random HF models the way convert_hf_to_gguf.py writes them.
Opened through checkpoints/ and run through engine/, they give HF's tensors, logits and
greedy tokens."""

from __future__ import annotations

import copy
import functools
import math

import gguf
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints import CheckpointError, open_checkpoint
from engine.config import ConfigError, ModelConfig
from engine.kv_cache import init_cache, one_page_per_slot
from engine.model import Rows, Transformer
from engine.weights import fuse_projections, params_from_hf
from tests.tiny_config import TINY

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HALF = TINY["hidden_size"] // TINY["num_attention_heads"] // 2
LONGROPE = dict(
    rope_parameters=dict(
        rope_type="longrope",
        rope_theta=10000.0,
        short_factor=list(np.linspace(1.0, 1.5, HALF)),
        long_factor=list(np.linspace(1.0, 6.0, HALF)),
    ),
)
LONGEST = 14  # tokens a test sequence reaches: longrope picks its factors by the context
CASES = {
    "phi3": dict(sliding_window=6),  # a window the sequences cross
    # longrope within its original context (short factors) and past it (long factors)
    "longrope-short": dict(LONGROPE, original_max_position_embeddings=16),
    "longrope-long": dict(LONGROPE, original_max_position_embeddings=4),
}


@functools.cache
def hf_model(case: str):
    # a copy: Phi3Config writes into the rope dict the cases share
    config = transformers.Phi3Config(**TINY, **copy.deepcopy(CASES[case]), pad_token_id=0)
    torch.manual_seed(0)
    hf = transformers.Phi3ForCausalLM(config).eval()
    with torch.no_grad():  # norms off their init of ones
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return hf


def hf_state(hf) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in hf.state_dict().items()}


# A SentencePiece vocabulary as Phi3MiniModel.set_vocab writes one: scores, token types
# (2 unknown, 3 control, 1 normal, 5 unused), [PADn] filling up to the model's vocab_size.
_TOKENS = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "\u2581a", "ab", "\u2581ab", "<|end|>"]
_SCORES = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -1000.0]
_TYPES = [2, 3, 3, 1, 1, 1, 1, 1, 1, 3]
_TEMPLATE = "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"


def _add_vocab(writer: gguf.GGUFWriter) -> None:
    pad = TINY["vocab_size"] - len(_TOKENS)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(_TOKENS + [f"[PAD{i}]" for i in range(len(_TOKENS), TINY["vocab_size"])])
    writer.add_token_scores(_SCORES + [-10000.0] * pad)
    writer.add_token_types(_TYPES + [5] * pad)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(9)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(_TEMPLATE)


def write_phi3_gguf(
    path,
    hf,
    state: dict | None = None,
    factors: dict | None = None,
    vocab: bool = False,
    rope_dims: int | None = None,
):
    """convert_hf_to_gguf.py's Phi3MiniModel: its metadata, HF names through the gguf
    package's phi3 name map (fused tensors kept whole), longrope factors as two tensors.
    `state` / `factors` / `rope_dims` replace the model's (malformed or unsupported files)."""
    cfg, rope = hf.config, hf.config.rope_parameters
    original = rope.get("original_max_position_embeddings", cfg.original_max_position_embeddings)
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(rope_dims or cfg.hidden_size // cfg.num_attention_heads)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_sliding_window(cfg.sliding_window or 0)
    if vocab:
        _add_vocab(writer)
    factors = factors or {
        k: rope[f"{k}_factor"] for k in ("long", "short") if f"{k}_factor" in rope
    }
    if factors:
        scale = cfg.max_position_embeddings / original
        writer.add_rope_scaling_attn_factors(
            math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
        )
        for kind, values in factors.items():
            writer.add_tensor(f"rope_factors_{kind}.weight", np.array(values, np.float32))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.PHI3, cfg.num_hidden_layers)
    for name, w in (hf_state(hf) if state is None else state).items():
        base, kind = name.rsplit(".", 1)
        writer.add_tensor(f"{names.get_name(base)}.{kind}", w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi3")
    return {case: write_phi3_gguf(folder / f"{case}.gguf", hf_model(case)) for case in CASES}


def test_tensors_equal_hf_and_transformers_gguf_loader(files):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf = hf_model("phi3")
    ours = open_checkpoint(files["phi3"])
    want = hf_state(hf)
    assert sorted(ours.tensor_names) == sorted(want)
    with torch.device("meta"):  # transformers needs a model only to learn the names
        meta_model = transformers.Phi3ForCausalLM(hf.config)
    theirs = load_gguf_checkpoint(str(files["phi3"]), return_tensors=True, model_to_load=meta_model)
    assert set(theirs["tensors"]) == set(want)
    for name, w in want.items():
        got = ours.tensor(name)
        assert got.dtype == np.float32, name
        np.testing.assert_array_equal(got, w, err_msg=name)
        np.testing.assert_array_equal(got, theirs["tensors"][name].numpy(), err_msg=name)
    # rows read alone, across the q|k|v and gate|up boundaries
    qkv = "model.layers.1.self_attn.qkv_proj.weight"
    np.testing.assert_array_equal(ours.tensor(qkv, 60, 100), want[qkv][60:100])

    c, cfg = ours.config, theirs["config"]
    assert c["architectures"] == ["Phi3ForCausalLM"] and c["model_type"] == "phi3"
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rope_theta",
        "tie_word_embeddings",
    ):
        assert c[key] == cfg[key], key
    assert c["rms_norm_eps"] == pytest.approx(cfg["rms_norm_eps"], rel=1e-6)
    assert c["sliding_window"] == 6 and c["rope_scaling"] is None
    assert c["original_max_position_embeddings"] == hf.config.original_max_position_embeddings
    assert c["vocab_size"] == TINY["vocab_size"] and c["head_dim"] == 2 * HALF


@pytest.mark.parametrize("case", ["longrope-short", "longrope-long"])
def test_longrope_config_from_factor_tensors(files, case):
    rope = hf_model(case).config.rope_parameters
    scaling = open_checkpoint(files[case]).config["rope_scaling"]
    assert scaling["rope_type"] == "longrope"
    assert scaling["original_max_position_embeddings"] == rope["original_max_position_embeddings"]
    for key in ("short_factor", "long_factor"):  # HF itself applies them as float32
        np.testing.assert_array_equal(np.float32(scaling[key]), np.float32(rope[key]), err_msg=key)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_greedy_tokens_equal_hf(files, case):
    """Two prompts (6 and 9 tokens) with HF's greedy continuations to 14 tokens: one forward
    pass of the engine's model over both gives HF's logits, and its argmax at each generated
    position is HF's next token (greedy decoding's tokens, teacher-forced)."""
    hf = hf_model(case)
    rng = np.random.default_rng(3)
    rows = []
    for n in (6, 9):
        prompt = rng.integers(1, TINY["vocab_size"], n).tolist()
        generation = transformers.GenerationConfig(
            do_sample=False, max_new_tokens=LONGEST - n, eos_token_id=None, pad_token_id=0
        )
        with torch.no_grad():
            rows.append(hf.generate(torch.tensor([prompt]), generation_config=generation)[0])
    ids = torch.stack(rows).numpy()
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()

    checkpoint = open_checkpoint(files[case])
    config = ModelConfig.from_hf(checkpoint.config).for_context(LONGEST)
    assert config.long_context == (case == "longrope-long")
    params = fuse_projections(params_from_hf(checkpoint, config, jnp.float32), config)
    cache = init_cache(config, num_pages=2, page_size=16, dtype=jnp.float32)
    positions = np.broadcast_to(np.arange(LONGEST), ids.shape)
    (logits,), _ = Transformer(config).apply(
        {"params": params}, [Rows(ids, positions, one_page_per_slot(2))], cache
    )
    logits = np.asarray(logits)
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=0)
    for row, n in zip(range(2), (6, 9), strict=True):
        assert logits[row, n - 1 : -1].argmax(-1).tolist() == ids[row, n:].tolist()


def _dropped(state: dict, name: str, rows: slice) -> dict:
    return {**state, name: state[name][rows]}


def _split_qkv(state: dict) -> dict:
    """A phi3 file with q/k/v apart (which llama.cpp's converter never writes)."""
    out = dict(state)
    qkv = out.pop("model.layers.0.self_attn.qkv_proj.weight")
    q, kv = TINY["hidden_size"], TINY["num_key_value_heads"] * 2 * HALF
    parts = np.split(qkv, [q, q + kv])
    for part, w in zip(("q", "k", "v"), parts, strict=True):
        out[f"model.layers.0.self_attn.{part}_proj.weight"] = w
    return out


@pytest.mark.parametrize(
    "malformed, message",
    [
        (
            lambda s: _dropped(s, "model.layers.1.self_attn.qkv_proj.weight", slice(1, None)),
            r"tensor blk\.1\.attn_qkv\.weight has 127 rows; a phi3 model's has 128 "
            r"\(q;k;v rows: \(4 \+ 2 x 2\) heads x 16\)",
        ),
        (  # the up half missing
            lambda s: _dropped(s, "model.layers.0.mlp.gate_up_proj.weight", slice(0, 96)),
            r"tensor blk\.0\.ffn_up\.weight has 96 rows; a phi3 model's has 192",
        ),
        (_split_qkv, r"tensor blk\.0\.attn_q\.weight has no counterpart in a phi3 model"),
    ],
    ids=["qkv-rows", "gate-up-rows", "split-qkv"],
)
def test_malformed_tensors_are_named(tmp_path, malformed, message):
    hf = hf_model("phi3")
    path = write_phi3_gguf(tmp_path / "bad.gguf", hf, state=malformed(hf_state(hf)))
    with pytest.raises(CheckpointError, match=rf"bad\.gguf: {message}"):
        open_checkpoint(path)


@pytest.mark.parametrize(
    "factors, message",
    [
        ({"long": [1.0] * (HALF - 1), "short": [1.0] * HALF}, "rope_factors_long.weight has 7"),
        ({"long": [1.0] * HALF}, "rope_factors_long.weight without rope_factors_short.weight"),
    ],
    ids=["length", "one-of-two"],
)
def test_malformed_rope_factors_are_named(tmp_path, factors, message):
    path = write_phi3_gguf(tmp_path / "bad.gguf", hf_model("phi3"), factors=factors)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(path)


def test_partial_rotary_is_refused_not_run_as_full(tmp_path):
    """Phi-4-mini ropes 3/4 of each head; the engine does not, so the config says so."""
    path = write_phi3_gguf(tmp_path / "p.gguf", hf_model("phi3"), rope_dims=12)
    config = open_checkpoint(path).config
    assert config["partial_rotary_factor"] == 0.75
    with pytest.raises(ConfigError, match="partial_rotary_factor 0.75 is not supported"):
        ModelConfig.from_hf(config)


def test_tokenizer_equals_transformers_gguf_tokenizer(tmp_path):
    path = write_phi3_gguf(tmp_path / "t.gguf", hf_model("phi3"), vocab=True)
    open_checkpoint(path).save_tokenizer(tmp_path / "tok")
    mine = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    for text in ("ab ab", "a b", " ab", "ab<|end|>", "ba  a"):
        assert mine(text)["input_ids"] == theirs(text)["input_ids"], text
    assert mine("ab ab<|end|>")["input_ids"] == [8, 8, 9]
    assert (mine.bos_token, mine.eos_token) == ("<s>", "<|end|>")
    assert mine.chat_template == _TEMPLATE
