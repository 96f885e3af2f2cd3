"""jax's Pallas paged decode kernels on the engine's pool as stored (engine.attention.pool_kernels),
run here in Pallas interpret mode: each against the engine's own gather-and-softmax path on
the same block (decode rows, a prompt chunk, page tables out of order, ids past the pool),
and a whole engine whose attention runs on the kernel decoding HF's greedy tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import engine.attend as attend
from engine.attend import attend_xla
from engine.attention import pool_kernels
from engine.config import ModelConfig
from engine.fp8 import E4M3
from engine.model import Rows
from samplers import SamplingParams
from tests import engine_fixtures as F

PAGES, KV_HEADS, PAGE, GROUP = 16, 2, 4, 2
HEAD_DIM = {"gpu": 8, "tpu": 128}  # the TPU kernel runs where 128 divides the head size


def config(head_dim: int) -> ModelConfig:
    return ModelConfig.from_hf(
        dict(
            architectures=["LlamaForCausalLM"],
            vocab_size=97,
            hidden_size=KV_HEADS * GROUP * head_dim,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=KV_HEADS * GROUP,
            num_key_value_heads=KV_HEADS,
            head_dim=head_dim,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
        )
    )


def force(monkeypatch, kernel: str) -> None:
    """Make every layer choose `kernel` as it would on its backend (windows, fp8 excluded),
    and a fresh prefill the GPU's flash attention with it."""
    monkeypatch.setattr(attend, "flash_prefill", lambda: kernel == "gpu")
    monkeypatch.setattr(
        attend, "pool_kernel", lambda window, pool: pool_kernels.choose(kernel, window, pool)
    )


def block_of(positions: list[list[int]], seed: int, head_dim: int = 8):
    """Random q/k/v for rows at `positions` ([B, T], consecutive in a row), a shuffled page
    table (4 pages a row, the last row's tail past the pool), a random pool and a rotation
    that leaves q and k as they are. Every value is a bfloat16 one: the TPU interpreter
    rounds a product's operands to bfloat16, as the TPU's default precision does."""
    rng = np.random.default_rng(seed)
    positions = np.asarray(positions, np.int32)
    B, T = positions.shape
    table = rng.permutation(np.arange(1, PAGES))[: B * 4].reshape(B, 4).astype(np.int32)
    table[-1, -1] = PAGES  # an id past the pool (another data shard's page, padding)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.bfloat16).astype(jnp.float32)
    q, k, v = (normal(B, T, heads * head_dim) for heads in (4, 2, 2))
    kv_len = int(-(-(positions.max() + 1) // PAGE) * PAGE)
    block = Rows(jnp.zeros((B, T), jnp.int32), jnp.asarray(positions), jnp.asarray(table),
                 kv_len=kv_len)  # fmt: skip
    half = head_dim // 2
    rotation = (jnp.ones((B, T, half)), jnp.zeros((B, T, half)))
    pools = tuple(normal(PAGES, KV_HEADS, PAGE, head_dim) for _ in range(2))
    return q, k, v, block, rotation, pools


ROWS = {
    "decode": [[5], [9], [0]],  # one a sequence's first token
    "chunk": [[3, 4, 5, 6, 7, 8, 9]],  # a prompt's chunk after 3 cached positions
}


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
@pytest.mark.parametrize("rows", list(ROWS))
def test_each_kernel_on_the_pool_equals_the_gather_path(rows, kernel, monkeypatch):
    cfg = config(HEAD_DIM[kernel])
    args = block_of(ROWS[rows], seed=len(rows), head_dim=HEAD_DIM[kernel])
    want, want_cache = attend_xla(cfg, jnp.float32, *args, window=None)
    force(monkeypatch, kernel)
    got, got_cache = attend_xla(cfg, jnp.float32, *args, window=None)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_cache, want_cache, strict=True):
        np.testing.assert_array_equal(g, w)  # the same writes, nothing else touched


def test_a_fresh_prefill_on_the_gpu_path_equals_the_gather_path(monkeypatch):
    """A prompt from empty rows (block.fresh) runs jax.nn.dot_product_attention there."""
    q, k, v, _, rotation, _ = block_of([list(range(8))] * 2, seed=3)
    cfg = config(8)
    positions = jnp.tile(jnp.arange(8, dtype=jnp.int32), (2, 1))
    block = Rows(jnp.zeros((2, 8), jnp.int32), positions, jnp.arange(2)[:, None], fresh=True)
    scratch = tuple(jnp.zeros((2, KV_HEADS, 8, 8)) for _ in range(2))
    for window in (None, 3):
        want, want_cache = attend_xla(cfg, jnp.float32, q, k, v, block, rotation, scratch, window)
        with monkeypatch.context() as m:
            force(m, "gpu")
            got, got_cache = attend_xla(cfg, jnp.float32, q, k, v, block, rotation, scratch, window)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        for g, w in zip(got_cache, want_cache, strict=True):
            np.testing.assert_array_equal(g, w)


def test_choose():
    pool = lambda dtype, head_dim=64: jax.ShapeDtypeStruct((8, 2, 16, head_dim), dtype)
    assert pool_kernels.choose("gpu", None, pool(jnp.bfloat16)) == "gpu"
    assert pool_kernels.choose("tpu", None, pool(jnp.float32, 128)) == "tpu"
    assert pool_kernels.choose("tpu", None, pool(jnp.float32, 64)) is None
    assert pool_kernels.choose("gpu", 4096, pool(jnp.bfloat16)) is None  # no sliding window
    assert pool_kernels.choose("gpu", None, pool(E4M3)) is None  # fp8 stays on XLA's ops
    assert pool_kernels.choose("cpu", None, pool(jnp.float32)) is None
    assert attend.pool_kernel(None, pool(jnp.float32)) is None  # this CPU: XLA's ops
    assert not attend.flash_prefill()


def test_an_engine_on_the_gpu_kernel_decodes_hf_greedy_tokens(monkeypatch):
    """Prompts over several pages, prefilled in chunks of 16 tokens beside running streams,
    then decoded: every attention over the pool runs the kernel."""
    force(monkeypatch, "gpu")
    calls = []
    real = pool_kernels.attend_pool
    monkeypatch.setattr(pool_kernels, "attend_pool", lambda *a: calls.append(a[0]) or real(*a))
    engine = F.make_engine(cpu_kernel=False, warmup=False, max_num_batched_tokens=16)
    try:
        prompts = F.prompts(3, seed=5, lo=10, hi=40)
        outs = engine.generate(
            prompts, SamplingParams(temperature=0.0), max_tokens=10, ignore_eos=True
        )
        for prompt, out in zip(prompts, outs, strict=True):
            assert list(out.token_ids) == F.hf_greedy(prompt, 10)
    finally:
        engine.close()
    assert calls and set(calls) == {"gpu"}  # traced through the kernel
    jax.clear_caches()  # the patched traces must not serve later tests


def mesh_main() -> None:
    """In a 4-device subprocess: greedy tokens of the engine on (data 2, model 2) with every
    layer on the GPU kernel (per model shard: 4 KV heads split 2 and 2), and the collectives
    carrying cache pages in its compiled decode and extend programs."""
    import json

    from engine.sharding import make_mesh
    from tests.mesh_run import _page_collectives

    assert jax.device_count() == 4, jax.devices()
    attend.flash_prefill = lambda: True
    attend.pool_kernel = lambda window, pool: pool_kernels.choose("gpu", window, pool)
    engine = F.make_engine(cpu_kernel=False, warmup=False, mesh=make_mesh(2, 2))
    try:
        prompts = F.prompts(4, seed=6, lo=10, hi=30)
        outs = engine.generate(
            prompts, SamplingParams(temperature=0.0), max_tokens=8, ignore_eos=True
        )
        tokens = [list(o.token_ids) for o in outs]
        moved = _page_collectives(engine)
        print(json.dumps({"prompts": prompts, "tokens": tokens, "page_collectives": moved}))
    finally:
        engine.close()


def test_on_a_mesh_the_kernel_runs_per_model_shard_with_hf_greedy_tokens():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from engine.loading import convert

    convert(str(F.tiny_model_dir()), progress=False)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    code = "from tests.test_pool_kernels import mesh_main; mesh_main()"
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    got = json.loads(run.stdout.splitlines()[-1])
    assert got["page_collectives"] == []  # no program gathers the pool onto every device
    for prompt, tokens in zip(got["prompts"], got["tokens"], strict=True):
        assert tokens == F.hf_greedy(prompt, 8)
