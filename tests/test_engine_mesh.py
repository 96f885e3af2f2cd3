"""The same engine on 8 simulated CPU devices: meshes (data=8), (data=4, model=2) and
(data=2, model=4) give exactly the single-device greedy tokens (through Engine.generate, then
through the HTTP server), keep their shardings across steps and compile nothing on the second
pass; each data shard owns its slots and pages, and no program moves pages between devices.
On one CPU device the engine runs engine.cpu_kernels, on a mesh XLA's ops: the equality
checks the two paths against each other as well as the sharding.

The meshes run in a subprocess (XLA reads the device count when it starts), launched when
this module is imported so it compiles while the other engine tests run.
"""

from __future__ import annotations

import json

import pytest

from tests import engine_fixtures as F
from tests import mesh_run as M

pytest.importorskip("torch")

from engine import cpu_kernels  # noqa: E402
from samplers import SamplingParams  # noqa: E402

_RUN = M.start_mesh_run()


@pytest.fixture(scope="module")
def mesh_results():
    try:
        out, err = _RUN.communicate(timeout=600)
    except BaseException:
        _RUN.kill()
        raise
    assert _RUN.returncode == 0, err[-4000:]
    results = {tuple(r["mesh"]): r for r in map(json.loads, out.splitlines())}
    assert sorted(results) == sorted(M.MESHES)
    return results


@pytest.fixture(scope="module")
def single_device_tokens():
    engine = F.shared_engine()  # same slots, context and k, on one device
    assert engine.programs.model.packed == cpu_kernels.available()
    completions = engine.generate(
        M.mesh_prompts(), SamplingParams(temperature=0.0), max_tokens=M.MESH_TOKENS, ignore_eos=True
    )
    tokens = [list(c.token_ids) for c in completions]
    for prompt, ids in zip(M.mesh_prompts()[:2], tokens, strict=False):
        assert ids == F.hf_greedy(prompt, M.MESH_TOKENS)
    return tokens


@pytest.mark.parametrize("data, model", M.MESHES)
def test_mesh_tokens_equal_single_device(mesh_results, single_device_tokens, data, model):
    r = mesh_results[(data, model)]
    assert r["tokens"] == single_device_tokens
    assert r["again"] == single_device_tokens
    assert r["recompiles"] == []  # shardings are stable from one step to the next
    # 8 prompts of 2-16 tokens to compute, admitted together: two calls of 4 (rows of 16).
    assert r["group_calls"] == [4, 4]
    assert r["grouped"] == single_device_tokens

    # Slots over "data"; 4 KV heads over "model" (it divides), in the cache and in the fused
    # q/k/v matrix [D, kv_heads, group + 2, head_dim]. A
    # size-1 "model" axis may be named or not: both mean replicated.
    def heads(axis):
        return "model" if model > 1 or axis == "model" else None

    assert r["cache_spec"] == ["data", heads(r["cache_spec"][1]), None, None]
    assert r["state_spec"] == ["data", None]
    assert r["qkv_spec"] == [None, heads(r["qkv_spec"][1]), None, None]
    assert r["embed_spec"] == [heads(r["embed_spec"][0]), None]


@pytest.fixture(scope="module")
def shared_prefix_tokens():
    return [F.hf_greedy(p, M.MESH_TOKENS) for p in M.shared_prefix_prompts()]


@pytest.mark.parametrize("data, model", M.MESHES)
def test_data_shards_own_their_slots_and_pages(mesh_results, shared_prefix_tokens, data, model):
    """Every sequence sits on one data shard (slot s on shard s % data) with all its pages in
    that shard's block of the pool; the first sequences spread over every shard; no decode,
    split or extend program moves cache pages between devices."""
    r = mesh_results[(data, model)]
    per_shard = r["pages_per_shard"]
    assert len(r["starts"]) >= len(M.mesh_prompts())
    for slot, shard, row in r["starts"]:
        assert slot % data == shard
        assert {page // per_shard for page in row} == {shard}, (slot, shard, row)
    first = r["starts"][: len(M.mesh_prompts())]
    assert sorted(shard for _, shard, _ in first) == sorted(
        i % data for i in range(len(M.mesh_prompts()))
    )
    assert r["page_collectives"] == []
    assert r["naive_page_collectives"] > 0  # the measure sees pages moving when they do
    # The second prompt shares two full pages with the first: it went to the first one's
    # shard, mapped them, and extended them there (the extend program split over the shards).
    assert r["reused"] == 2 * F.PAGE
    assert r["shared"] == shared_prefix_tokens
