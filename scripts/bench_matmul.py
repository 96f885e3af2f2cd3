"""The CPU kernels' matmul in each build this CPU runs (AVX-512, AVX2), alternated.

    python scripts/bench_matmul.py [--isas avx512 avx2] [--rounds 4] [--formats q4_1 float32]

Each round starts one process per build (JAXFIRE_CPU_ISA) that times `cpu_kernels.matmul`
on a prefill's shape (96 rows x [576 x 1536], compute-bound), one row against a weight the
L3 holds (the one-row kernel's own rate) and one row against a weight larger than the L3
(a decode's stream from memory), best of 25 calls of 8 products each. Printed per build:
GFLOP/s, or GB/s of packed weights read, the median over rounds and the range.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

WORKER = r"""
import json, sys, time
import jax, jax.numpy as jnp, ml_dtypes, numpy as np
from engine import cpu_kernels
assert cpu_kernels.available() and cpu_kernels.isa() == sys.argv[1]
rng = np.random.default_rng(0)
def weights(kind, k, n):
    if kind == "float32":
        return rng.standard_normal((k, n)).astype(np.float32)
    if kind == "bfloat16":
        return rng.standard_normal((k, n)).astype(ml_dtypes.bfloat16).astype(np.float32)
    d = rng.uniform(0.001, 0.05, (k // 32, 1, n)).astype(np.float16).astype(np.float32)
    if kind == "q8_0":
        codes = rng.integers(-127, 128, (k // 32, 32, n))
        codes[:, 3] = -127  # the extreme a quantizer's block holds
        return (d * codes).astype(np.float32).reshape(k, n)
    m = rng.uniform(-0.4, 0.0, (k // 32, 1, n)).astype(np.float16).astype(np.float32)
    codes = rng.integers(0, 16, (k // 32, 32, n))  # q4_1
    codes[:, 0], codes[:, 1] = 0, 15  # the block's min and max, as a quantizer makes them
    return (d * codes + m).astype(np.float32).reshape(k, n)
def packed_as(kind, w):
    packed = cpu_kernels.pack(w)
    assert (packed.dtype == np.uint8) == kind.startswith("q"), (kind, packed.dtype)
    return jax.device_put(packed)
SHAPES = {  # label: (rows, k, n)
    "GFLOP/s, 96 rows": (96, 576, 1536),
    "GFLOP/s, 1 row in L3": (1, 1536, 2048),
    "GB/s, 1 row from memory": (1, 4096, 16384),
}
out = {}
for kind in sys.argv[2].split(","):
    for label, (m, k, n) in SHAPES.items():
        packed = packed_as(kind, weights(kind, k, n))
        x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
        # 8 products on different x (identical calls would be merged into one)
        f = jax.jit(lambda x, p: sum(cpu_kernels.matmul(x + i, p, n)[:, :1] for i in range(8)))
        f(x, packed).block_until_ready()
        best = float("inf")
        for _ in range(25):
            t = time.perf_counter()
            f(x, packed).block_until_ready()
            best = min(best, (time.perf_counter() - t) / 8)
        work = 2 * m * k * n if label.startswith("GFLOP") else packed.size * packed.dtype.itemsize
        out[f"{kind} {label}"] = work / best / 1e9
print(json.dumps(out))
"""


def main() -> None:
    sys.path.insert(0, os.getcwd())
    from engine import cpu_kernels

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--isas", nargs="+", default=cpu_kernels.supported_isas())
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--formats", nargs="+", default=["q4_1", "q8_0", "float32", "bfloat16"])
    args = ap.parse_args()
    runs: dict[str, list[dict[str, float]]] = {isa: [] for isa in args.isas}
    for _ in range(args.rounds):
        for isa in args.isas:
            env = {**os.environ, cpu_kernels.ISA_VARIABLE: isa, "JAX_PLATFORMS": "cpu"}
            done = subprocess.run(
                [sys.executable, "-c", WORKER, isa, ",".join(args.formats)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            runs[isa].append(json.loads(done.stdout.splitlines()[-1]))
    for key in runs[args.isas[0]][0]:
        cells = []
        for isa, rounds in runs.items():
            values = [r[key] for r in rounds]
            cells.append(
                f"{isa} {statistics.median(values):6.1f} ({min(values):.1f}-{max(values):.1f})"
            )
        print(f"{key:32s} " + "   ".join(cells))


if __name__ == "__main__":
    main()
