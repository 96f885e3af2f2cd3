"""The CPU kernels' builds (AVX-512, AVX2): the widest one the CPU runs is chosen unless
$JAXFIRE_CPU_ISA names another, and every build this CPU runs passes the kernel tests and
gives the same bits as the others (each computes a panel row's lanes in the same order)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine import cpu_kernels
from tests.test_cpu_kernels import WEIGHTS

if not cpu_kernels.available():
    pytest.skip(
        "the CPU kernels need x86-64 with AVX2/FMA and a C++ compiler", allow_module_level=True
    )

ROOT = Path(__file__).resolve().parents[1]
AVX2_ONLY = {"avx2", "fma", "f16c", "sse4_2"}
AVX512 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


@pytest.mark.parametrize(
    ("flags", "named", "chosen"),
    [
        (AVX512, "", "avx512"),
        (AVX512, "avx2", "avx2"),
        (AVX512 - {"avx512bw"}, "", "avx2"),
        (AVX2_ONLY, "", "avx2"),
    ],
)
def test_the_widest_build_the_cpu_runs_is_chosen_unless_one_is_named(
    monkeypatch, flags, named, chosen
):
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: flags)
    monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, named)
    assert cpu_kernels.isa() == chosen


@pytest.mark.parametrize(
    ("flags", "named", "reason"),
    [
        (AVX2_ONLY, "avx512", "JAXFIRE_CPU_ISA=avx512 but this CPU lacks its instructions"),
        (AVX512, "sse2", "JAXFIRE_CPU_ISA='sse2' is none of avx512, avx2"),
        ({"sse4_2"}, "", "needs a CPU with AVX2, FMA and F16C"),
    ],
)
def test_a_build_the_cpu_cannot_run_is_refused_with_the_reason(monkeypatch, flags, named, reason):
    monkeypatch.setattr(cpu_kernels, "_cpu_flags", lambda: flags)
    monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, named)
    with pytest.raises(cpu_kernels.KernelUnavailable, match=reason):
        cpu_kernels.isa()


def run_with_build(isa: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, cpu_kernels.ISA_VARIABLE: isa, "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


# Rows 1 (the one-row paths), 3 and 8 (register blocks), 49 (decoded panels, then a last
# chunk of one row); 37 columns: a panel's tail of 5.
SHAPES = [(1, 320, 37), (3, 96, 37), (8, 96, 37), (49, 64, 37)]
COMPUTE = """
import sys
import jax, jax.numpy as jnp, numpy as np
from engine import cpu_kernels
assert cpu_kernels.available() and cpu_kernels.isa() == sys.argv[2], cpu_kernels.isa()
data = dict(np.load(sys.argv[1]))
out = {}
for name in [n for n in data if n.startswith("x/")]:
    key = name[2:]
    kind, m, k, n = key.split("/")
    packed = cpu_kernels.pack(data["w/" + key])
    out["y/" + key] = np.asarray(
        jax.jit(cpu_kernels.matmul, static_argnums=2)(jnp.asarray(data[name]), packed, int(n)))
    ids = np.arange(int(n), dtype=np.int32)
    out["e/" + key] = np.asarray(jax.jit(cpu_kernels.embedding)(packed, ids))
np.savez(sys.argv[3], **out)
"""


def test_every_build_this_cpu_runs_gives_the_exact_result_and_the_same_bits(tmp_path):
    rng = np.random.default_rng(7)
    inputs = {}
    for kind, make in WEIGHTS.items():
        for m, k, n in SHAPES:
            key = f"{kind}/{m}/{k}/{n}"
            inputs["w/" + key] = make(k, n)
            inputs["x/" + key] = rng.standard_normal((m, k)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", **inputs)
    results = {}
    for isa in cpu_kernels.supported_isas():
        out = tmp_path / f"{isa}.npz"
        done = run_with_build(isa, ["-c", COMPUTE, str(tmp_path / "inputs.npz"), isa, str(out)])
        assert done.returncode == 0, done.stderr[-3000:]
        results[isa] = dict(np.load(out))
    first, *others = results.values()
    for name, got in first.items():
        w = inputs["w/" + name[2:]]
        if name.startswith("e/"):
            np.testing.assert_array_equal(got, w.T)
            continue
        x = inputs["x/" + name[2:]].astype(np.float64)
        exact = x @ w
        bound = w.shape[0] * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(w))
        assert np.all(np.abs(got - exact) <= bound + 1e-30), name
        for other in others:
            np.testing.assert_array_equal(other[name], got, err_msg=name)


def test_the_kernel_tests_pass_on_every_other_build_this_cpu_runs():
    """This process runs the chosen build through the whole suite; each other build the CPU
    runs takes the kernel tests (matmul, attention, layer, top_k against exact math)."""
    others = [isa for isa in cpu_kernels.supported_isas() if isa != cpu_kernels.isa()]
    for isa in others:
        done = run_with_build(
            isa, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cpu_kernels.py"]
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        assert " passed" in done.stdout and " skipped" not in done.stdout, done.stdout[-500:]
