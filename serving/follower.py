"""What a process other than 0 of a distributed engine serves: /health only.

Process 0 takes every request and broadcasts it (engine.lockstep); the others run the same
engine loop with it, and answer GET /health (status and the engine's counts, the same as
process 0's once both have taken the same iteration) so that a load balancer or a test can
watch every host.
"""

from __future__ import annotations

import logging
import threading

import jax
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from engine.api import Engine
from engine.lockstep import fatal

log = logging.getLogger("jaxfire.server")
# How long a signalled process waits for process 0 to stop the engine (as it does when every
# host is signalled at once) before it ends alone, which ends the others too.
GRACE_S = 30.0


def follow(engine: Engine, host: str, port: int, log_level: str = "info") -> None:
    """Answer /health on host:port until process 0 stops the engine."""

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "process": jax.process_index(), **engine.stats()})

    app = Starlette(routes=[Route("/health", health, methods=["GET"])])
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, log_config=None
    )
    server = uvicorn.Server(config)

    def stop_when_the_loop_ends() -> None:
        engine.scheduler.wait()
        server.should_exit = True

    threading.Thread(target=stop_when_the_loop_ends, daemon=True).start()
    print(
        f"jaxfire process {jax.process_index()} of {jax.process_count()} runs {engine.name} "
        f"with process 0; /health on http://{host}:{port}",
        flush=True,
    )
    try:
        server.run()
    finally:
        if not engine.scheduler.wait(GRACE_S):
            fatal(TimeoutError(f"process 0 did not stop the engine within {GRACE_S:.0f} s"))
        engine.close()
