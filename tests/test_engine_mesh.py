"""The same engine on 8 simulated CPU devices: meshes (data=8), (data=4, model=2) and
(data=2, model=4) give exactly the single-device greedy tokens, keep their shardings
across steps and compile nothing on a second pass. On one CPU device the engine runs
engine.cpu_kernels, on a mesh XLA's ops: the equality checks the two paths against each
other as well as the sharding.

The meshes run in a subprocess (XLA reads the device count when it starts), launched when
this module is imported so it compiles while the other engine tests run.
"""

from __future__ import annotations

import json

import pytest

from tests import engine_fixtures as F

pytest.importorskip("torch")

from engine import cpu_kernels  # noqa: E402
from samplers import SamplingParams  # noqa: E402

_RUN = F.start_mesh_run()


@pytest.fixture(scope="module")
def mesh_results():
    try:
        out, err = _RUN.communicate(timeout=600)
    except BaseException:
        _RUN.kill()
        raise
    assert _RUN.returncode == 0, err[-4000:]
    results = {tuple(r["mesh"]): r for r in map(json.loads, out.splitlines())}
    assert sorted(results) == sorted(F.MESHES)
    return results


@pytest.fixture(scope="module")
def single_device_tokens():
    engine = F.shared_engine()  # same slots, context and k, on one device
    assert engine.programs.model.packed == cpu_kernels.available()
    completions = engine.generate(
        F.mesh_prompts(), SamplingParams(temperature=0.0), max_tokens=F.MESH_TOKENS, ignore_eos=True
    )
    tokens = [list(c.token_ids) for c in completions]
    for prompt, ids in zip(F.mesh_prompts()[:2], tokens, strict=False):
        assert ids == F.hf_greedy(prompt, F.MESH_TOKENS)
    return tokens


@pytest.mark.parametrize("data, model", F.MESHES)
def test_mesh_tokens_equal_single_device(mesh_results, single_device_tokens, data, model):
    r = mesh_results[(data, model)]
    assert r["tokens"] == single_device_tokens
    assert r["again"] == single_device_tokens
    assert r["recompiles"] == []  # shardings are stable from one step to the next

    # Slots over "data"; 4 KV heads over "model" (it divides), in the cache and in the fused
    # q/k/v matrix [D, kv_heads, group + 2, head_dim]. A
    # size-1 "model" axis may be named or not: both mean replicated.
    def heads(axis):
        return "model" if model > 1 or axis == "model" else None

    assert r["cache_spec"] == ["data", heads(r["cache_spec"][1]), None, None]
    assert r["state_spec"] == ["data", None]
    assert r["qkv_spec"] == [None, heads(r["qkv_spec"][1]), None, None]
    assert r["embed_spec"] == [heads(r["embed_spec"][0]), None]
