"""Conversion keeps the source's dtype and converts tensor by tensor.

A bf16 HF folder becomes a bf16 checkpoint equal to it bit for bit, `--dtype` casts, a
quantized GGUF becomes float32; norm weights are float32 throughout and stay so when a model
loads in bfloat16. Converting a model several times larger than its largest tensor holds
about that tensor, not the model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from checkpoints import open_checkpoint, store
from checkpoints.validate import expected_shapes
from engine import weights
from engine.config import ModelConfig
from engine.loading import convert, load_model
from serving.cli import main
from tests import engine_fixtures as F
from tests.test_checkpoints_gguf_files import hf_tensors, write_gguf

torch = pytest.importorskip("torch")
REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
# A Qwen3 with q/k/v biases: head norms (size head_dim, not hidden) and biases both present.
SMALL = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "vocab_size": 128,
    "attention_bias": True,
    "tie_word_embeddings": False,
    "max_position_embeddings": 64,
}


def random_hf_folder(folder: Path, config: dict, dtype: torch.dtype) -> Path:
    """An HF folder of random weights, one safetensors shard per layer (so writing it holds
    one layer), with the tiny engine model's tokenizer."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (F.tiny_model_dir() / name).exists():
            shutil.copy(F.tiny_model_dir() / name, folder / name)
    shards: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in expected_shapes(config).items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else name
        shards.setdefault(f"model-{layer}.safetensors", {})[name] = shape
    generator = torch.Generator().manual_seed(0)
    for file, shapes in shards.items():
        tensors = {n: torch.randn(s, generator=generator).to(dtype) for n, s in shapes.items()}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
    weight_map = {name: file for file, shapes in shards.items() for name in shapes}
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def is_norm(path: tuple) -> bool:
    return path[-1] == "weight" and "norm" in path[-2]


def leaves(tree) -> dict[tuple, object]:
    return {tuple(k.key for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_bf16_converts_to_bf16_bit_for_bit_and_float32_on_asking(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "_BLOCK_BYTES", 1000)  # every tensor copied in a few blocks
    src = random_hf_folder(tmp_path / "hf", SMALL, torch.bfloat16)
    kept = leaves(store.restore(convert(str(src), tmp_path / "auto", progress=False)))
    main(["convert", str(src), str(tmp_path / "f32"), "--dtype", "float32"])
    widened = leaves(store.restore(tmp_path / "f32"))
    assert kept.keys() == widened.keys()
    for path, got in kept.items():
        assert got.dtype == (np.float32 if is_norm(path) else ml_dtypes.bfloat16), path
        assert widened[path].dtype == np.float32, path
        np.testing.assert_array_equal(np.asarray(widened[path]), np.asarray(got, np.float32))

    source = open_checkpoint(src)

    def same_bits(path: tuple, name: str, transpose: bool = False) -> bool:
        want = source.tensor(name)
        assert want.dtype == ml_dtypes.bfloat16
        return np.asarray(kept[path]).tobytes() == (want.T.copy() if transpose else want).tobytes()

    q = ("layers_1", "self_attn", "q_proj")
    assert same_bits((*q, "kernel"), "model.layers.1.self_attn.q_proj.weight", transpose=True)
    assert same_bits((*q, "bias"), "model.layers.1.self_attn.q_proj.bias")
    assert same_bits(("embed_tokens",), "model.embed_tokens.weight")
    assert same_bits(("lm_head",), "lm_head.weight", transpose=True)
    k_norm = source.tensor("model.layers.0.self_attn.k_norm.weight").astype(np.float32)
    np.testing.assert_array_equal(kept[("layers_0", "self_attn", "k_norm", "weight")], k_norm)


@pytest.mark.parametrize("family", ["phi3", "gemma3"])
def test_tensors_copied_in_blocks_equal_tensors_copied_whole(monkeypatch, family):
    # Phi-3's q/k/v and gate/up come as row ranges of its fused matrices; Gemma adds 1 to norms
    config = {**SMALL, "architectures": [f"{family.capitalize()}ForCausalLM"]}
    config["model_type"] = {"phi3": "phi3", "gemma3": "gemma3_text"}[family]
    rng = np.random.default_rng(0)
    state = {n: rng.standard_normal(s, np.float32) for n, s in expected_shapes(config).items()}
    model_config = ModelConfig.from_hf(config)
    whole = leaves(weights.params_from_hf(state, model_config, jnp.bfloat16))
    monkeypatch.setattr(weights, "_BLOCK_BYTES", 100)
    blocks = leaves(weights.params_from_hf(state, model_config, jnp.bfloat16))
    assert whole.keys() == blocks.keys()
    for path, array in whole.items():
        assert array.dtype == blocks[path].dtype, path
        np.testing.assert_array_equal(array, blocks[path], err_msg=str(path))


def test_loading_in_bfloat16_keeps_every_norm_float32(tmp_path):
    # q_norm / k_norm are head_dim long, not hidden_size: found by their name, not their size
    src = random_hf_folder(tmp_path / "hf", SMALL, torch.float32)
    model = load_model(str(convert(str(src), tmp_path / "c", progress=False)), dtype=jnp.bfloat16)
    dtypes = {path: leaf.dtype for path, leaf in leaves(model.params).items()}
    assert dtypes[("layers_0", "self_attn", "q_norm", "weight")] == jnp.float32
    assert dtypes[("layers_0", "self_attn", "qkv_proj", "bias")] == jnp.bfloat16
    assert all(d == (jnp.float32 if is_norm(p) else jnp.bfloat16) for p, d in dtypes.items())


@pytest.mark.parametrize(
    "qtype, dtype", [(Q.Q8_0, np.float32), (Q.F16, np.float16)], ids=["Q8_0", "F16"]
)
def test_gguf_quantized_becomes_float32_and_f16_stays(tmp_path, qtype, dtype):
    tensors = hf_tensors()
    src = write_gguf(tmp_path / "m.gguf", tensors, qtype=qtype, tokenizer=True)
    got = leaves(store.restore(convert(str(src), tmp_path / "c", progress=False)))
    down = got[("layers_1", "mlp", "down_proj", "kernel")]
    assert down.dtype == dtype and got[("norm", "weight")].dtype == np.float32
    want = dequantize(quantize(tensors["model.layers.1.mlp.down_proj.weight"], qtype), qtype)
    np.testing.assert_array_equal(np.asarray(down, np.float32), want.T)


# The growth of the resident-memory high-water mark while converting, in a fresh process,
# from its size after imports. The kernel's mark (VmHWM) is reset first: ru_maxrss cannot
# be, and a child starts with its parent's (a pytest process of a GB or more) as its own.
_MEASURE = textwrap.dedent(
    """
    import json, sys
    from engine.loading import convert

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark := the resident size now
    before = status("VmRSS:")
    convert(sys.argv[1], sys.argv[2], progress=False)
    print(json.dumps({"growth": status("VmHWM:") - before}))
    """
)
# 16 layers of hidden 1024 / intermediate 2816 and a 32000-token vocabulary, untied: the
# embedding and the LM head are the largest tensors, 62.5 MiB each in bf16, and the model is
# 469 MiB in bf16, 938 MiB in float32.
LARGE = {
    **SMALL,
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 16,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "vocab_size": 32000,
    "attention_bias": False,
}
# What converting holds beside the tensor being built, whatever the model's size: the small
# arrays waiting for their part (store._PART_BYTES, 32 MiB), the block being copied
# (weights._BLOCK_BYTES, 16 MiB at most), and what orbax and tensorstore allocate on their
# first save: 64 MiB in all. Measured here: 50-55 MiB beyond the largest tensor.
ALLOWANCE = 64 * MiB


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_conversion_holds_about_the_largest_tensor_not_the_model(tmp_path, dtype):
    src = random_hf_folder(tmp_path / "hf", LARGE, dtype)
    source = open_checkpoint(src)
    size = {
        name: source.tensor(name, 0, 1).nbytes * shape[0] for name, shape in source.shapes.items()
    }
    model, largest = sum(size.values()), max(size.values())
    assert model > 3 * (largest + ALLOWANCE)  # holding the whole tree could not pass
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(src), str(tmp_path / "c")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    growth = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    print(f"peak RSS growth {growth / MiB:.0f} MiB, largest tensor {largest / MiB:.1f} MiB")
    assert growth < 1.5 * largest + ALLOWANCE
    stored = leaves(store.stored_arrays(tmp_path / "c"))
    assert stored[("lm_head",)].dtype == source.tensor("lm_head.weight", 0, 1).dtype
