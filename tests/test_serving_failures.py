"""The server over the real engine (tiny random Llama) when something goes wrong, and the
counts it reports: a device program that fails is logged once with its traceback, its
client gets a 500 envelope and every other request carries on; the cached-prompt-tokens
header equals usage's count."""

from __future__ import annotations

import logging
import threading

import httpx
import numpy as np
import pytest

from tests import engine_fixtures as F

pytest.importorskip("torch")

from engine.requests import ServingEngine  # noqa: E402
from serving.app import create_app  # noqa: E402
from serving.testing import FakeEngine, background_server  # noqa: E402

MARKER = 4321  # a prompt holding this token id makes the injected prefill fail


@pytest.fixture(scope="module")
def engine():
    return F.shared_engine()


@pytest.fixture(scope="module")
def http(engine):
    with background_server(create_app(engine)) as url:
        with httpx.Client(base_url=url, timeout=120) as c:
            yield c


def cmpl(http, prompt, **fields):
    body = {"model": "tiny-llama", "prompt": prompt, "max_tokens": 6, **fields}
    return http.post("/v1/completions", json=body)


def test_both_engines_satisfy_the_serving_interface(engine):
    assert isinstance(engine, ServingEngine)
    assert isinstance(FakeEngine(), ServingEngine)


def test_cached_tokens_header_equals_usage(engine, http):
    first, other = F.prompts(2, seed=11, lo=40, hi=40)
    F.wait_idle(engine)
    engine.scheduler._forget_cached()
    assert cmpl(http, first, temperature=0).status_code == 200
    F.wait_idle(engine)
    r = cmpl(http, first[:32] + other[:8], temperature=0)
    assert r.status_code == 200, r.text
    cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == 32
    assert r.headers["fireworks-cached-prompt-tokens"] == "32"
    streamed = cmpl(http, first[:32] + other[8:16], temperature=0, stream=True)
    assert streamed.headers["fireworks-cached-prompt-tokens"] == "32"


def test_a_failed_device_program_is_logged_once_and_others_carry_on(
    engine, http, monkeypatch, caplog
):
    prefill = engine.scheduler.p.prefill

    def failing_prefill(params, tokens, length):
        if MARKER in np.asarray(tokens):
            raise RuntimeError("injected device fault")
        return prefill(params, tokens, length)

    monkeypatch.setattr(engine.scheduler.p, "prefill", failing_prefill)
    engine.scheduler._forget_cached()  # every prompt is prefilled (none reuses a slot)
    caplog.set_level(logging.INFO)
    # A long stream runs beside the failing request, and one more request comes after.
    long = {}

    def stream() -> None:
        long["r"] = cmpl(http, F.prompts(1, seed=5)[0], max_tokens=40, ignore_eos=True, stream=True)

    t = threading.Thread(target=stream)
    t.start()
    bad = cmpl(http, [101, 102, MARKER, 103])
    t.join()
    assert bad.status_code == 500, bad.text
    error = bad.json()["error"]
    assert error["type"] == "internal_error" and "injected device fault" in error["message"]
    assert long["r"].status_code == 200
    assert long["r"].text.rstrip().endswith("data: [DONE]") and '"error"' not in long["r"].text
    assert cmpl(http, [101, 102, 103]).status_code == 200

    tracebacks = [r for r in caplog.records if r.exc_info and r.name.startswith("jaxfire")]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]
    assert "injected device fault" in str(tracebacks[0].exc_info[1])
    assert tracebacks[0].name == "jaxfire.engine"
    access = [r.getMessage() for r in caplog.records if r.name == "jaxfire.access"]
    assert any(" 500 " in line for line in access), access
    assert sum(" 200 " in line for line in access) >= 2, access
    assert F.wait_idle(engine)["active_slots"] == 0
