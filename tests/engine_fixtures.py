"""A tiny random Llama checkpoint (HF folder) with SmolLM2's tokenizer, for engine tests.

`tiny_model_dir()` builds it once per process: a LlamaForCausalLM with the default model's
vocabulary (49152) but hidden size 32 and 2 layers, saved with `save_pretrained`, plus the
tokenizer files of the bundled default model's GGUF. Its weights are scaled up so logits
are spread out (no near-ties between the top tokens that float rounding could flip).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

VOCAB = 49152
EOS = 2
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=8,  # 8 query / 4 KV heads: divisible by model=2 and model=4
    num_key_value_heads=4,
    head_dim=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    initializer_range=0.3,
    bos_token_id=1,
    eos_token_id=EOS,
    pad_token_id=EOS,
)


def _root() -> Path:
    """One temp folder per process; JAXFIRE_CACHE_DIR points inside it, so the engine's
    converted weights and compiled programs never touch ~/.cache."""
    if os.environ.get("JAXFIRE_TEST_ROOT"):
        root = Path(os.environ["JAXFIRE_TEST_ROOT"])
    else:
        root = Path(tempfile.mkdtemp(prefix="jaxfire-eng-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        os.environ["JAXFIRE_TEST_ROOT"] = str(root)  # subprocesses reuse the same folder
    os.environ.setdefault("JAXFIRE_CACHE_DIR", str(root / "cache"))
    return root


@functools.cache
def tiny_model_dir() -> Path:
    root = _root()
    folder = root / "tiny-llama"
    if (folder / "model.safetensors").exists():
        return folder
    import torch
    import transformers

    from checkpoints import registry

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    tmp = root / "tiny-llama.tmp"
    hf.save_pretrained(tmp)
    registry.resolve(registry.DEFAULT_MODEL).open().save_tokenizer(tmp)
    tmp.rename(folder)
    return folder


@functools.cache
def hf_model():
    """The same weights as a PyTorch transformers model (float32, eval)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir()).eval()


def hf_greedy(prompt: list[int], new_tokens: int) -> list[int]:
    """HF transformers' greedy generate, EOS not stopping it (as ignore_eos)."""
    import torch
    import transformers

    config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, eos_token_id=None, pad_token_id=EOS
    )
    with torch.no_grad():
        out = hf_model().generate(torch.tensor([prompt]), generation_config=config)
    return out[0, len(prompt) :].tolist()


def hf_logprobs(prompt: list[int]) -> np.ndarray:
    """log_softmax of HF's logits at every prompt position, [P, V]."""
    import torch

    with torch.no_grad():
        logits = hf_model()(torch.tensor([prompt])).logits[0]
    return torch.log_softmax(logits.double(), -1).numpy()


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 40) -> list[list[int]]:
    """n random token-id prompts of different lengths (ids avoid the special tokens)."""
    rng = np.random.default_rng(seed)
    lengths = np.linspace(lo, hi, n).astype(int)
    return [rng.integers(100, VOCAB, size=int(L)).tolist() for L in lengths]


# Tokens per KV page of the test engines: small, so a test prompt spans several pages.
PAGE = 8


def make_engine(**kw):
    """float32 on every backend (GPU/TPU default to bfloat16): tests compare with HF's
    float32 tokens."""
    import jax.numpy as jnp

    from engine.api import Engine

    kw = {
        "max_slots": 4,
        "max_len": 64,
        "decode_steps": 4,
        "page_size": PAGE,
        "dtype": jnp.float32,
        **kw,
    }
    return Engine.from_pretrained(str(tiny_model_dir()), **kw)


# Engine A, shared by every engine test in the process: 8 slots (divisible by the mesh
# tests' data axes), context 64, k = 8 decode steps per sync; every decode width compiled
# before it serves, so the tests can count compilations.
SLOTS, MAX_LEN, K = 8, 64, 8


@functools.cache
def shared_engine():
    return make_engine(
        max_slots=SLOTS, max_len=MAX_LEN, decode_steps=K, max_queue=48, background_compile=False
    )


def collect(handle) -> dict:
    """Read a handle to the end: per choice its token ids, text deltas, finish reasons."""
    out: dict[int, dict] = {}
    for u in handle:
        c = out.setdefault(u.index, {"ids": [], "deltas": [], "reasons": [], "logprobs": []})
        c["ids"] += u.token_ids
        c["deltas"].append(u.text)
        c["reasons"].append(u.finish_reason)
        c["logprobs"] += u.logprobs or ()
    return out


def wait_idle(engine, timeout: float = 30.0) -> dict:
    """Poll until no slot is held and nothing is queued (or the timeout); the last stats."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if (stats["active_slots"] == 0 and stats["queue_length"] == 0) or (
            time.monotonic() > deadline
        ):
            return stats
        time.sleep(0.02)
