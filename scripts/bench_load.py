"""Load time and peak memory of the default model: from the GGUF, and from the orbax cache.

    python scripts/bench_load.py [--model smollm2-135m-instruct] [--repeats 3]

Each load runs in a fresh process (so the peak RSS is that load's alone); the first
run converts the GGUF into an empty cache folder, the later ones restore from it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = """
import json, resource, sys, time
t = time.perf_counter()
from engine.loading import load_model
import jax
m = load_model(sys.argv[1])
jax.block_until_ready(m.params)
print(json.dumps({"seconds": time.perf_counter() - t,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def load_once(model: str, cache: str) -> dict:
    env = {**os.environ, "JAXFIRE_CACHE_DIR": cache, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    convert, restore = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            convert.append(load_once(args.model, cache))
            restore.append(load_once(args.model, cache))
    for label, runs in (("from GGUF (convert + save)", convert), ("from orbax cache", restore)):
        secs = statistics.median(r["seconds"] for r in runs)
        rss = statistics.median(r["peak_rss_mb"] for r in runs)
        print(f"{label:28s} median {secs:6.2f} s   peak RSS {rss:7.0f} MB")


if __name__ == "__main__":
    main()
