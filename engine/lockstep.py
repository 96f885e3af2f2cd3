"""One model served from several host processes in lockstep (multi-controller JAX).

Under jax.distributed every process must launch the same device programs, in the same order,
with the same inputs. So every process runs the same scheduler loop, and what comes from
outside the loop comes from process 0 alone: at the start of each loop iteration process 0
broadcasts what its callers did since the last one (requests admitted, requests cancelled,
shutdown) and every process applies it at that same point (engine.scheduler). Everything
else the loop decides from is its own state, the same on every process, and the device
outputs it reads are replicated (engine.step). Nothing timing-dependent may choose a program,
so in lockstep the engine compiles every program before it serves (no background
compilation), compiles a grammar's one-step program in the loop when first needed
(engine.one_step), and the processes agree on one KV cache budget (the smallest).

An idle process 0 still broadcasts every IDLE_TICK_S. A process that dies fails the next
collective of the others (its connections close), and a host that vanishes is caught by the
coordination service's heartbeat: either way every process ends with an error, none waits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import sys
from typing import NoReturn

import jax
import numpy as np
from jax.experimental import multihost_utils

from engine.handle import Handle
from engine.sharding import MeshError

log = logging.getLogger("jaxfire.engine")

HEARTBEAT_TIMEOUT_S = 15  # a process silent this long is dead (jax's default is 100 s)
SHUTDOWN_TIMEOUT_S = 30  # how long an exiting process waits for the others to exit too
IDLE_TICK_S = 1.0  # how often an idle process 0 broadcasts all the same (peers stay checked)
HEADER = 1024  # bytes of every iteration's one broadcast; a longer message takes a second
EXIT_LOST = 1  # the exit status of a process whose peers are gone


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """jax.distributed.initialize (all None: detected, as on Cloud TPU VMs), before any
    other jax call; cross-process collectives on CPU devices go through gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
    )


def agreed_budget(budget: int) -> int:
    """The smallest of the processes' KV cache budgets (bytes): the cache's shape, so its
    programs', must be the same everywhere, whatever memory each host has free."""
    if jax.process_count() == 1:
        return budget
    kib = np.int32(min(budget // 1024, np.iinfo(np.int32).max))  # no int64 without x64
    return int(multihost_utils.process_allgather(kib).min()) * 1024


@dataclasses.dataclass
class Events:
    """What callers did since the loop's last iteration, in the order process 0 took it."""

    admitted: list[Handle]
    cancelled: list[int]  # Handle.id of requests admitted before
    stop: bool = False


def check_mesh(mesh: jax.sharding.Mesh) -> None:
    """MeshError unless the mesh holds devices of every process: each one runs its programs."""
    missing = set(range(jax.process_count())) - {d.process_index for d in mesh.devices.flat}
    if missing:
        raise MeshError(
            f"a mesh of {mesh.size} device(s) leaves out process(es) {sorted(missing)}: data "
            f"parallel x tensor parallel must span the {jax.device_count()} devices of all "
            "the processes"
        )


class Lockstep:
    def __init__(self, mesh: jax.sharding.Mesh):
        check_mesh(mesh)
        self.leader = jax.process_index() == 0

    def exchange(self, events: Events | None) -> Events:
        """Process 0's events (it passes them, the others None) on every process; the others
        get a new Handle per admitted request, which nobody reads."""
        if self.leader:
            assert events is not None
            admitted = [(h.request, h.max_tokens) for h in events.admitted]
            _broadcast(pickle.dumps((admitted, events.cancelled, events.stop)))
            return events
        # Pickle between the processes of one job, which run the same code and trust
        # process 0 already (it tells them what to compute).
        admitted, cancelled, stop = pickle.loads(_broadcast(b""))
        handles = [Handle(r, len(r.prompt_ids), max_tokens) for r, max_tokens in admitted]
        return Events(handles, cancelled, stop)


def _broadcast(payload: bytes) -> bytes:
    """Process 0's payload on every process (the others' is ignored): one broadcast of HEADER
    bytes (the length, then the start), and the rest, if any, padded to a power of two so
    that few shapes compile."""
    head = np.zeros(HEADER, np.uint8)
    head[:4] = np.frombuffer(len(payload).to_bytes(4, "little"), np.uint8)
    start = payload[: HEADER - 4]
    head[4 : 4 + len(start)] = np.frombuffer(start, np.uint8)
    head = multihost_utils.broadcast_one_to_all(head)
    size = int.from_bytes(head[:4].tobytes(), "little")
    data = head[4 : 4 + size].tobytes()
    if size > len(data):
        tail = payload[len(data) :]
        rest = np.zeros(1 << (size - len(data) - 1).bit_length(), np.uint8)
        rest[: len(tail)] = np.frombuffer(tail, np.uint8)
        data += multihost_utils.broadcast_one_to_all(rest)[: size - len(data)].tobytes()
    return data


def fatal(error: BaseException) -> NoReturn:
    """End this process: a lockstep loop that failed (a peer died, a program failed on one
    process) cannot be known to agree with the others any more."""
    log.critical(
        "the distributed engine stopped (process %d of %d): %s; exiting: every process of "
        "a distributed engine ends when one fails",
        jax.process_index(),
        jax.process_count(),
        error,
        exc_info=error,
    )
    sys.stderr.flush()
    os._exit(EXIT_LOST)  # now: jax's own shutdown would wait on the peers that are gone
