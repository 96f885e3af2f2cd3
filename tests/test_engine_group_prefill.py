"""Short prompts admitted in the same loop iteration are computed several to a model call
(engine.prefill.Prefiller.groups): each prompt a row of its own, sharing every weight read.

Grouping must change nothing a caller sees: each prompt's greedy tokens equal HF's, on the
CPU kernels and on XLA's ops, a prompt after a cached prefix included; a failure in a group
ends its requests alone and leaks no slot or page.
"""

from __future__ import annotations

import types

import pytest

from tests import engine_fixtures as F

pytest.importorskip("torch")

from engine.prefill import Prefiller  # noqa: E402
from engine.requests import GenerationRequest  # noqa: E402
from samplers import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)


def prefiller(packed: bool, compiled: set[tuple[int, int]]) -> Prefiller:
    """A Prefiller over programs that only answer which group programs are compiled."""
    programs = types.SimpleNamespace(
        model=types.SimpleNamespace(packed=packed),
        extend_ready=lambda T, G=1: (G, T) in compiled,
    )
    return Prefiller(programs, None, min_bucket=16, max_len=1024, chunk=512)


def test_group_shapes_split_the_token_budget():
    assert prefiller(True, set()).group_shapes == [(8, 64), (4, 128), (2, 256)]


def test_a_short_extension_takes_the_smallest_compiled_bucket():
    """Every bucket up to a chunk (the kernels skip padding rows, the XLA ops between them
    do not); a bucket not compiled yet pads to the chunk."""
    kernels = prefiller(True, {(1, 16), (1, 64), (1, 256), (1, 512)})
    assert kernels.extend_buckets == [16, 64, 256, 512]
    assert [kernels.extend_bucket(n) for n in (1, 40, 100, 257, 512)] == [16, 64, 256, 512, 512]
    assert prefiller(True, {(1, 512)}).extend_bucket(100) == 512  # 256 not compiled yet
    xla = prefiller(False, {(1, 16), (1, 32), (1, 48), (1, 64), (1, 512)})
    assert xla.extend_buckets == [b for b in xla.buckets if b <= 512]
    assert [xla.extend_bucket(n) for n in (10, 40, 64)] == [16, 48, 64]


def test_only_xla_prefills_a_fresh_prompt_apart():
    """On the CPU kernels a prompt all new is an extension from position 0."""
    assert prefiller(False, set()).fresh_prefill
    assert not prefiller(True, set()).fresh_prefill


def test_groups_take_the_shortest_together_and_leave_nothing_out():
    p = prefiller(False, set())
    sizes = [200, 30, 0, 60, 40, 50, 300, 20]
    groups = p.groups(sizes, on_demand=True)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    assert [2] in groups  # nothing to compute: alone
    # XLA's ops: no padding limit. The four shortest fill a (4, 128) group, the next two
    # a (2, 256) one; the longest is alone.
    assert [sorted(sizes[i] for i in g) for g in groups if len(g) > 1] == [
        [20, 30, 40, 50],
        [60, 200],
    ]
    assert [6] in groups


def test_the_cpu_kernels_group_only_where_padding_costs_little():
    p = prefiller(True, set())
    # (4 - 1) * 128 + 120 = 504 tokens computed for 470: grouped.
    assert p.groups([110, 115, 125, 120], on_demand=True) == [[0, 1, 3, 2]]
    # 504 computed for 4 x 20 real ones: each alone.
    assert sorted(p.groups([20, 20, 20, 120], on_demand=True)) == [[0], [1], [2], [3]]


def test_only_compiled_group_programs_are_used_unless_compiling_on_demand():
    sizes = [10, 12, 14, 16]
    assert prefiller(False, set()).groups(sizes, on_demand=False) == [[0], [1], [2], [3]]
    assert prefiller(False, {(2, 256)}).groups(sizes, on_demand=False) == [[0, 1], [2, 3]]


def submit_together(engine, prompts: list[list[int]], max_tokens: int = 6) -> list:
    """Submit every request before the loop can take any: one admission takes them all."""
    sched = engine.scheduler
    with sched.lock:
        return [
            engine.submit(
                GenerationRequest(tuple(p), GREEDY, max_tokens=max_tokens, ignore_eos=True)
            )
            for p in prompts
        ]


def count_group_calls(engine, monkeypatch) -> list[int]:
    """The number of prompts in each call of a group program, recorded as they happen."""
    sizes: list[int] = []
    prefill = engine.scheduler.prefiller
    real = prefill.compute_group

    def recorded(cache, spans):
        sizes.append(len(spans))
        return real(cache, spans)

    monkeypatch.setattr(prefill, "compute_group", recorded)
    return sizes


@pytest.mark.parametrize("path", ["cpu_kernels", "xla"])
def test_prompts_admitted_together_share_a_call_and_keep_hf_tokens(path, monkeypatch):
    engine = (
        F.shared_engine()
        if path == "cpu_kernels"
        else F.make_engine(max_slots=8, cpu_kernel=False, background_compile=False)
    )
    F.wait_idle(engine)
    engine.scheduler.forget_cached()
    calls = count_group_calls(engine, monkeypatch)
    # 14-16 tokens: a row of 16 each (the tiny engine's chunk of 64 over 4).
    prompts = F.prompts(4, seed=91, lo=14, hi=16)
    outs = [F.collect(h)[0]["ids"] for h in submit_together(engine, prompts)]
    assert calls == [4]
    assert outs == [F.hf_greedy(p, 6) for p in prompts]
    stats = F.wait_idle(engine)
    assert stats["kv_pages_used"] == 0 and stats["kv_tokens"] == 0


def test_a_group_mixes_cached_prefixes_and_whole_prompts(monkeypatch):
    """Rows start at different positions: one after the prefix cache's pages, one at 0."""
    engine = F.shared_engine()
    F.wait_idle(engine)
    engine.scheduler.forget_cached()
    first, other, third = F.prompts(3, seed=93, lo=40, hi=40)
    F.collect(submit_together(engine, [first])[0])  # its pages stay in the prefix cache
    calls = count_group_calls(engine, monkeypatch)
    before = engine.stats()["reused_prompt_tokens"]
    second = first[:8] + other[:29]  # one cached page, then 28 tokens computed
    prompts = [second, third[:31]]  # and 30: a (2, 32) row each
    outs = [F.collect(h)[0]["ids"] for h in submit_together(engine, prompts)]
    assert calls == [2]
    assert engine.stats()["reused_prompt_tokens"] - before == 8
    assert outs == [F.hf_greedy(p, 6) for p in prompts]


def test_a_failed_group_ends_its_requests_alone(monkeypatch):
    engine = F.shared_engine()
    F.wait_idle(engine)
    engine.scheduler.forget_cached()
    prefill = engine.scheduler.prefiller

    def failing(cache, spans):
        raise RuntimeError("group program failed")

    monkeypatch.setattr(prefill, "compute_group", failing)
    handles = submit_together(engine, F.prompts(4, seed=95, lo=14, hi=16))
    for h in handles:
        with pytest.raises(RuntimeError, match="group program failed"):
            F.collect(h)
    stats = F.wait_idle(engine)
    assert stats["active_slots"] == 0 and stats["kv_pages_used"] == 0 and stats["kv_tokens"] == 0
    monkeypatch.undo()
    [prompt] = F.prompts(1, seed=96, lo=20, hi=20)
    assert F.collect(submit_together(engine, [prompt])[0])[0]["ids"] == F.hf_greedy(prompt, 6)
