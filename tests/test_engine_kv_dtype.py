"""--kv-cache-dtype: a bfloat16 or float16 KV cache holds twice the tokens of a float32 one in
the same budget, and the model still continues prompts as HF's float32 model does; an fp8
cache runs on XLA's ops."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from tests import engine_fixtures as F

pytest.importorskip("torch")

from engine import cpu_kernels  # noqa: E402
from engine.kv_cache import CacheConfigError  # noqa: E402
from engine.paging import bytes_per_page  # noqa: E402
from engine.requests import GenerationRequest  # noqa: E402
from samplers import SamplingParams  # noqa: E402


def budget(pages: int) -> int:
    config = F.shared_engine().config
    size = bytes_per_page(config.num_layers, config.num_kv_heads, config.head_dim, 4, F.PAGE)
    return pages * size


KERNELS = {"cpu_kernels": None, "xla": False}  # cpu_kernel=None: the kernels where they run


@pytest.mark.parametrize("path", list(KERNELS))
@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
def test_a_half_precision_cache_holds_twice_the_tokens_and_keeps_greedy_tokens(kv_dtype, path):
    engine = F.make_engine(
        kv_cache_memory=budget(12),
        kv_cache_dtype=kv_dtype,
        background_compile=False,
        cpu_kernel=KERNELS[path],
    )
    try:
        assert engine.scheduler.cache[0][0].dtype == jnp.dtype(kv_dtype)
        assert engine.programs.model.packed == (path == "cpu_kernels" and cpu_kernels.available())
        assert engine.stats()["kv_pages"] == 24 - 1  # 24 half-size pages, less the pad page
        prompts = F.prompts(3, seed=91, lo=10, hi=40)
        greedy = SamplingParams(temperature=0.0)
        handles = [
            engine.submit(GenerationRequest(tuple(p), greedy, max_tokens=12, ignore_eos=True))
            for p in prompts
        ]
        for handle, prompt in zip(handles, prompts, strict=True):
            assert F.collect(handle)[0]["ids"] == F.hf_greedy(prompt, 12)
    finally:
        engine.close()


def test_unknown_kv_dtypes_and_kernels_without_float32_weights_are_refused():
    with pytest.raises(CacheConfigError, match="float8_e5m2"):
        F.make_engine(kv_cache_dtype="float8_e5m2", warmup=False)
    with pytest.raises(ValueError, match="float32 weights"):
        F.make_engine(dtype=jnp.bfloat16, cpu_kernel=True, warmup=False)


def test_an_fp8_cache_runs_on_xlas_ops_and_the_kernels_refuse_it():
    """The CPU kernels read no fp8 pages: by default an fp8 cache runs XLA's ops; asking for
    the kernels is an error. (Its accuracy: test_kv_fp8, test_accuracy_low_precision.)"""
    engine = F.make_engine(kv_cache_dtype="fp8", warmup=False)
    try:
        assert engine.scheduler.cache[0][0].dtype == jnp.float8_e4m3fn
        assert not engine.programs.model.packed
    finally:
        engine.close()
    with pytest.raises(ValueError, match="a float KV cache"):
        F.make_engine(kv_cache_dtype="fp8", cpu_kernel=True, warmup=False)


@pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels do not run here")
def test_the_kernels_on_a_float16_cache_sample_as_xla_does():
    """Seeded sampling with logprobs, prompts chunked and decoded: the kernels reading and
    writing a float16 pool give XLA's tokens and logprobs on the same pool type."""
    prompts = F.prompts(2, seed=92, lo=20, hi=45)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=3)
    outs = []
    for kernel in (None, False):
        engine = F.make_engine(
            kv_cache_dtype="float16",
            background_compile=False,
            cpu_kernel=kernel,
            max_num_batched_tokens=16,
        )
        try:
            requests = [
                GenerationRequest(tuple(p), params, max_tokens=10, ignore_eos=True, top_logprobs=2)
                for p in prompts
            ]
            outs.append([F.collect(engine.submit(r))[0] for r in requests])
        finally:
            engine.close()
    for a, b in zip(*outs, strict=True):
        assert a["ids"] == b["ids"]
        for x, y in zip(a["logprobs"], b["logprobs"], strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
