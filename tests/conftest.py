"""One converted-weights and compilation cache for the whole test session, and float32
matrix products at full precision on every backend.

Set before any test imports the engine, so every test that loads the default model
converts it once and reuses compiled programs, without touching the user's ~/.cache.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import jax

if "JAXFIRE_CACHE_DIR" not in os.environ:
    # 1-3 GB a session (converted models, compiled programs): removed when pytest exits, or
    # the runs of a day fill /tmp.
    os.environ["JAXFIRE_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxfire-test-cache-")
    atexit.register(shutil.rmtree, os.environ["JAXFIRE_CACHE_DIR"], ignore_errors=True)
# Parity tests hold float32 logits to PyTorch's within 1e-4. On GPU and TPU, XLA's default
# float32 matmul runs in TF32 / bf16 passes (4e-4 off on an H100); CPU is exact either way.
jax.config.update("jax_default_matmul_precision", "highest")
