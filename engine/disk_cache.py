"""Where jaxfire keeps what it builds once: converted checkpoints, compiled XLA programs and
the CPU kernels. A plain path rule, so engine.cpu_kernels needs nothing else of the project.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_root() -> Path:
    """$JAXFIRE_CACHE_DIR, else $XDG_CACHE_HOME/jaxfire, else ~/.cache/jaxfire."""
    if os.environ.get("JAXFIRE_CACHE_DIR"):
        return Path(os.environ["JAXFIRE_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "jaxfire"


def converted_dir(name: str, source: Path, dtype: str = "auto") -> Path:
    """The folder of the converted checkpoint of `source` (an HF folder or a .gguf file) with
    its matrices in `dtype` ("auto": the source's own)."""
    # Keyed by the source's identity too, so a changed or different source never reuses a cache.
    files = sorted(source.iterdir()) if source.is_dir() else [source]
    key = str(source) + "".join(
        f"|{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()
    )
    return cache_root() / f"{name}-{dtype}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
