"""One-step decode programs for calls with a grammar-constrained choice.

A constrained choice's next mask needs the token its call just drew, so it takes one token per
call; a call of the configured k steps would leave it idle after the first. Its calls run as
a forward and a sampling program (engine.split_step), so the host fills the next mask while
the device runs the next forward. They are compiled on first need, on a background thread (a
server that never sees a grammar never holds them), the narrowest for the live rows even when
a wider one already serves: every row of a step costs (8 rows cost about 4x one on a 2-core
CPU). In lockstep (engine.lockstep) they are compiled in the loop, at the same point on every
process: which program runs must not depend on when a compilation finished.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any

from engine.split_step import SplitPrograms
from engine.step import Programs

log = logging.getLogger("jaxfire.engine")


class OneStepPrograms:
    def __init__(self, programs: Programs):
        self.split = SplitPrograms(programs)
        self.background = True  # else compiled when first asked for, before it is used
        self._compiler: concurrent.futures.ThreadPoolExecutor | None = None
        self._asked: set[tuple[int, int]] = set()
        self._pending: list[concurrent.futures.Future] = []

    def steps(self, k: int, kv_len: int, rows: list[int], shapes: Callable[[], Any]) -> int:
        """k for a call with a constrained choice: 1 once a one-step program for `rows` (the
        row buckets holding the live slots, narrowest first) is compiled, else k (the
        constrained rows sit out all but its first step). `shapes()`: the (params, cache,
        state) ShapeDtypeStructs a program compiles for."""
        if not self.background:
            self.split.pair(*shapes(), kv_len=kv_len, rows=rows[0])
            return 1
        if not self.split.ready(kv_len, rows[0]) and (kv_len, rows[0]) not in self._asked:
            self._asked.add((kv_len, rows[0]))
            if self._compiler is None:
                self._compiler = concurrent.futures.ThreadPoolExecutor(1, "jaxfire-compile")
            done = self._compiler.submit(self.split.pair, *shapes(), kv_len=kv_len, rows=rows[0])
            done.add_done_callback(_log_failure)
            self._pending.append(done)
        return 1 if self.rows(kv_len, rows) is not None else k

    def rows(self, kv_len: int, rows: list[int]) -> int | None:
        """The narrowest of `rows` whose one-step programs are compiled, if any."""
        return next((r for r in rows if self.split.ready(kv_len, r)), None)

    def wait(self) -> None:
        """Until every compilation asked for has finished."""
        concurrent.futures.wait(self._pending)

    def close(self) -> None:
        if self._compiler is not None:
            self._compiler.shutdown(cancel_futures=True)


def _log_failure(done: concurrent.futures.Future) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("compiling one-step decode programs failed", exc_info=done.exception())
