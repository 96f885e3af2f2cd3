"""The `jaxfire` console script, started as the README starts it, on this checkout's code."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JAXFIRE = Path(sys.executable).parent / "jaxfire"


def cpu_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """A subprocess's environment: `devices` simulated CPU devices, and PYTHONPATH on this
    checkout (else the console script imports wherever jaxfire was installed from, which a
    git worktree is not)."""
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "PYTHONPATH": str(REPO),
        **extra,
    }
