"""scripts/bench_serving.py against a live server over the FakeEngine: it runs end to end
and its figures add up."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from serving.app import create_app
from serving.testing import FakeEngine, background_server

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_serving.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_serving", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_percentile_and_prompts():
    bench = load_bench()
    assert bench.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert bench.percentile([5.0], 0.99) == 5.0
    prompts = {bench.make_prompt(i, 75, 0) for i in range(50)}
    assert len(prompts) == 50  # unique prompts defeat prefix caching


def test_bench_against_fake_server(tmp_path):
    bench = load_bench()
    out = tmp_path / "rows.json"
    with background_server(create_app(FakeEngine(max_context=4096))) as url:
        rc = bench.main(
            [
                "--base-url",
                f"{url}/v1",
                "--concurrency",
                "1",
                "4",
                "--max-tokens",
                "16",
                "--requests-per-client",
                "1",
                "--min-requests",
                "2",
                "--json",
                str(out),
            ]
        )
    assert rc == 0
    rows = json.loads(out.read_text())
    assert [r["concurrency"] for r in rows] == [1, 4]
    for r in rows:
        assert r["failed"] == 0
        assert r["output_tokens_per_s"] > 0 and r["ttft_p50_ms"] > 0
        assert r["itl_p50_ms"] >= 0  # rounded to 0.1 ms: the instant fake can read 0.0
        # 16 tokens per request (ignore_eos), counted from the usage chunk
        assert r["output_tokens"] == 16 * r["requests"]
