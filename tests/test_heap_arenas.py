"""engine.loading.limit_heap_arenas: glibc's malloc keeps at most that many heaps however
many threads allocate (counted from malloc_info's report, in a fresh process each)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHILD = r"""
import ctypes, re, sys, tempfile, threading
from engine.loading import limit_heap_arenas
if sys.argv[1] == "1":
    limit_heap_arenas(2)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.fopen.restype = ctypes.c_void_p
barrier = threading.Barrier(8)

def allocate():
    barrier.wait()  # all at once, so each meets the others' heaps in use
    libc.free(ctypes.c_void_p(libc.malloc(1 << 16)))

threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
with tempfile.NamedTemporaryFile() as f:
    out = libc.fopen(f.name.encode(), b"w")
    libc.malloc_info(0, ctypes.c_void_p(out))
    libc.fclose(ctypes.c_void_p(out))
    print(len(re.findall(r'<heap nr="', open(f.name).read())))
"""


def heaps(limited: bool) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, "1" if limited else "0"],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_limit_heap_arenas_bounds_the_heaps_threads_get():
    assert heaps(limited=False) > 2  # the test can tell: unlimited, threads get their own
    assert heaps(limited=True) <= 2
