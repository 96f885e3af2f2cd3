"""--kv-cache-dtype: a bfloat16 or float16 KV cache holds twice the tokens of a float32 one in
the same budget, and the model still continues prompts as HF's float32 model does."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from tests import engine_fixtures as F

pytest.importorskip("torch")

from engine.kv_cache import CacheConfigError  # noqa: E402
from engine.paging import bytes_per_page  # noqa: E402
from engine.requests import GenerationRequest  # noqa: E402
from samplers import SamplingParams  # noqa: E402


def budget(pages: int) -> int:
    config = F.shared_engine().config
    size = bytes_per_page(config.num_layers, config.num_kv_heads, config.head_dim, 4, F.PAGE)
    return pages * size


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float16"])
def test_a_half_precision_cache_holds_twice_the_tokens_and_keeps_greedy_tokens(kv_dtype):
    engine = F.make_engine(
        kv_cache_memory=budget(12), kv_cache_dtype=kv_dtype, background_compile=False
    )
    try:
        assert engine.scheduler.cache[0][0].dtype == jnp.dtype(kv_dtype)
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


def test_unknown_kv_dtypes_and_kernels_without_float32_are_refused():
    with pytest.raises(CacheConfigError, match="float8_e4m3fn"):
        F.make_engine(kv_cache_dtype="float8_e4m3fn", warmup=False)
    with pytest.raises(ValueError, match="float32 \\(weights and KV cache\\)"):
        F.make_engine(kv_cache_dtype="bfloat16", cpu_kernel=True, warmup=False)
