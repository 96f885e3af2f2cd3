"""The decode program built the GPU way holds no conditional (on GPU each one would sync with
the host inside the step), read off its lowered StableHLO on the XLA path (no CPU kernels).
The CPU form keeps its lax.conds, so the check can tell the two apart."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from engine.step import Programs
from tests.test_engine_memory import CONFIG, PAGE, abstract_args

MAX_LEN, SLOTS = 128, 4
CONDITIONALS = ("stablehlo.case", "stablehlo.if")


def decode_text(branchless: bool | None, chunk: int) -> str:
    """The lowered decode program of 2 steps over SLOTS rows, with a prompt chunk if > 0."""
    programs = Programs(CONFIG, jnp.float32, 2, [0], MAX_LEN // PAGE, branchless=branchless)
    params, cache, state = abstract_args(SLOTS, MAX_LEN)
    extra = (programs.chunk_shape(chunk),) if chunk else ()
    masks = programs.masks_shape(SLOTS)
    steps = jax.ShapeDtypeStruct((), jnp.int32)
    lowered = programs.decode.lower(
        params, cache, state, masks, steps, *extra, k=2, kv_len=MAX_LEN, rows=SLOTS
    )
    return lowered.as_text()


def conditionals(text: str) -> list[str]:
    return [c for c in CONDITIONALS if c in text]


@pytest.mark.parametrize("chunk", [0, 16])
def test_gpu_form_of_the_decode_program_has_no_conditional(chunk):
    gpu = decode_text(branchless=True, chunk=chunk)
    assert not conditionals(gpu)
    assert "stablehlo.while" in gpu  # the k-step scan: the text does hold the step
    cond = decode_text(branchless=False, chunk=chunk)
    assert conditionals(cond)  # the CPU / TPU form
    # Left to the engine, the form follows the backend the program is traced for.
    assert decode_text(branchless=None, chunk=chunk) == (
        gpu if jax.default_backend() == "gpu" else cond
    )


def test_the_gpu_form_runs_a_decode_program_per_count_of_steps():
    """Elsewhere a call's steps are an argument of one program (a loop of unknown length);
    on a GPU such a loop would read its condition back to the host every step, so a one-step
    call (a stream) runs a program of its own. The tokens are the same either way."""
    pytest.importorskip("torch")
    from engine.requests import GenerationRequest
    from samplers import SamplingParams
    from tests import engine_fixtures as F

    engine = F.make_engine(decode_steps=4, warmup=False)
    try:
        engine.programs.branchless = True  # before any decode program compiles
        prompt = tuple(F.prompts(1, seed=47)[0])
        outs = [
            F.collect(
                engine.submit(
                    GenerationRequest(
                        prompt,
                        SamplingParams(temperature=0.0),
                        max_tokens=9,
                        ignore_eos=True,
                        stream=stream,
                    )
                )
            )[0]["ids"]
            for stream in (True, False)
        ]
        assert outs == [F.hf_greedy(list(prompt), 9)] * 2
        assert {key[0] for key in engine.programs._decoders} == {1, 4}
    finally:
        engine.close()
