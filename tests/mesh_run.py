"""The 8-device mesh run of tests/test_engine_mesh.py: a subprocess (XLA reads the device
count at start-up) that serves the tiny model on each mesh and prints what it saw as JSON."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tests.engine_fixtures import MAX_LEN, PAGE, SLOTS, K, make_engine, prompts, tiny_model_dir

MESHES = [(8, 1), (4, 2), (2, 4)]  # (data, model)


def mesh_prompts() -> list[list[int]]:
    return prompts(SLOTS, seed=30, lo=3, hi=17)  # one prompt bucket: fewer compiles


MESH_TOKENS = 10


def start_mesh_run():
    """Start the mesh worker now (it compiles while the other tests run); returns the Popen."""
    import subprocess
    import sys

    from engine.loading import convert

    convert(str(tiny_model_dir()), progress=False)  # once, before two processes want it
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    env["JAX_PLATFORMS"] = "cpu"
    code = "from tests.mesh_run import mesh_main; mesh_main()"
    repo = Path(__file__).resolve().parent.parent
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def mesh_main() -> None:
    """In the 8-device subprocess: greedy tokens of every mesh, as JSON lines on stdout."""
    import json
    import time

    import jax

    from engine.sharding import make_mesh
    from samplers import SamplingParams

    assert jax.device_count() == 8, jax.devices()
    compiles: list[str] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, d, **kw: (
            compiles.append(kw.get("fun_name", ""))
            if name.endswith("backend_compile_duration")
            else None
        )
    )
    greedy = SamplingParams(temperature=0.0)

    def spec(x) -> list:
        """An array's PartitionSpec, padded with None to its rank."""
        return list(x.sharding.spec) + [None] * (x.ndim - len(x.sharding.spec))

    for data, model in MESHES:
        t = time.perf_counter()
        engine = make_engine(
            mesh=make_mesh(data=data, model=model),
            max_slots=SLOTS,
            max_len=MAX_LEN,
            decode_steps=K,
            warmup=False,
        )
        starts = _record_starts(engine.scheduler)
        # Prompts grouped in one call depend on when they arrive: the two passes compared for
        # recompiles compute each prompt alone; the third groups them (all admitted at once).
        prefiller = engine.scheduler.prefiller
        group_shapes, prefiller.group_shapes = prefiller.group_shapes, []
        first = engine.generate(mesh_prompts(), greedy, max_tokens=MESH_TOKENS, ignore_eos=True)
        compiles.clear()
        engine.scheduler.forget_cached()  # the same programs again, not cached prefixes
        again = _served_greedy(engine, mesh_prompts())
        recompiles = list(compiles)
        prefiller.group_shapes = group_shapes
        engine.scheduler.forget_cached()
        group_calls = _record_group_calls(prefiller)
        grouped = engine.generate(mesh_prompts(), greedy, max_tokens=MESH_TOKENS, ignore_eos=True)
        # A prompt sharing two full pages with the one before: it goes to that one's shard
        # (the slots are all open again) and extends the cached pages there.
        reused = engine.stats()["reused_prompt_tokens"]
        shared = [
            engine.generate([p], greedy, max_tokens=MESH_TOKENS, ignore_eos=True)[0]
            for p in shared_prefix_prompts()
        ]
        reused = engine.stats()["reused_prompt_tokens"] - reused
        params = engine.scheduler.params
        qkv = params["layers_0"]["self_attn"]["qkv_proj"]["kernel"]
        result = {
            "mesh": [data, model],
            "tokens": [list(c.token_ids) for c in first],
            "again": again,
            "recompiles": recompiles,
            "grouped": [list(c.token_ids) for c in grouped],
            "group_calls": group_calls,
            "cache_spec": spec(engine.scheduler.cache[0][0]),
            "state_spec": spec(engine.scheduler.state.sampling.counts),
            "qkv_spec": spec(qkv),
            "embed_spec": spec(params["embed_tokens"]),
            "shared": [list(c.token_ids) for c in shared],
            "reused": reused,
            "starts": starts,
            "pages_per_shard": engine.scheduler.pages.per_shard,
            "page_collectives": _page_collectives(engine),
            "naive_page_collectives": _naive_page_gather(engine),
            "seconds": round(time.perf_counter() - t, 1),
        }
        engine.close()
        print(json.dumps(result), flush=True)


def shared_prefix_prompts() -> list[list[int]]:
    """Two prompts of 20 tokens whose first 17 are the same (two full pages of PAGE = 8)."""
    first = prompts(1, seed=31, lo=20, hi=21)[0]
    return [first, first[:17] + [11, 12, 13]]


def _record_starts(scheduler) -> list:
    """Every choice started from now on, as [slot, data shard of its pages, its table row]."""
    starts, start = [], scheduler._start_choice

    def recording(owner, choice, seq, row):
        start(owner, choice, seq, row)
        row_pages = scheduler.tables[choice.slot].tolist()
        starts.append([choice.slot, scheduler.pages.shard_of(seq), row_pages])

    scheduler._start_choice = recording
    return starts


def _page_collectives(engine) -> list:
    """Collectives carrying cache pages in every decode, split and extend program compiled."""
    from tests.collectives import carrying_pages

    p = engine.programs
    programs = [*p._decoders.values(), *p._extenders.values()]
    programs += [prog for pair in engine.scheduler.one_step.split._pairs.values() for prog in pair]
    kv_lens = {key[1] for key in p._decoders}
    return [
        c
        for prog in programs
        for c in carrying_pages(prog.as_text(), PAGE, engine.config.head_dim, kv_lens)
    ]


def _naive_page_gather(engine) -> int:
    """The measure's control: a plain gather of the pool's pages by a table split over
    "data", as attention did before it ran per shard. How many collectives carry pages."""
    import jax
    import jax.numpy as jnp

    from tests.collectives import carrying_pages

    pool = engine.scheduler.cache[0][0]
    table = jax.device_put(
        np.zeros((SLOTS, 2), np.int32), engine.scheduler.state.page_table.sharding
    )
    gather = jax.jit(lambda pool, table: jnp.take(pool, table, axis=0))
    hlo = gather.lower(pool, table).compile().as_text()
    return len(carrying_pages(hlo, PAGE, engine.config.head_dim, set()))


def _record_group_calls(prefiller) -> list[int]:
    """The number of prompts in each call of a group program, recorded as they happen."""
    sizes: list[int] = []
    real = prefiller.compute_group
    prefiller.compute_group = lambda cache, spans: (sizes.append(len(spans)), real(cache, spans))[1]
    return sizes


def _served_greedy(engine, token_prompts: list[list[int]]) -> list[list[int]]:
    """Greedy token ids of each prompt through the HTTP server, all requests at once."""
    import concurrent.futures

    import httpx

    from serving.app import create_app
    from serving.testing import background_server

    with background_server(create_app(engine)) as url, httpx.Client(timeout=300) as http:

        def complete(prompt: list[int]) -> list[int]:
            body = {
                "prompt": prompt,
                "max_tokens": MESH_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
                "model": engine.name,
            }
            r = http.post(f"{url}/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]

        with concurrent.futures.ThreadPoolExecutor(len(token_prompts)) as pool:
            return list(pool.map(complete, token_prompts))
