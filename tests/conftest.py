"""One converted-weights and compilation cache for the whole test session.

Set before any test imports the engine, so every test that loads the default model
converts it once and reuses compiled programs, without touching the user's ~/.cache.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("JAXFIRE_CACHE_DIR", tempfile.mkdtemp(prefix="jaxfire-test-cache-"))
