"""A few Prometheus metrics in the text exposition format (no client library needed).

Counters and histograms are updated on the event loop; a lock keeps them correct if a
thread touches them too. Gauges read from the engine are passed in at scrape time.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    parts = []
    for name, value in zip(names, values, strict=True):
        escaped = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        parts.append(f'{name}="{escaped}"')
    return "{" + ",".join(parts) + "}"


def _num(x: float) -> str:
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Counter:
    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self.values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        with self._lock:
            items = sorted(self.values.items()) or ([((), 0.0)] if not self.label_names else [])
        for labels, value in items:
            yield f"{self.name}{_labels(self.label_names, labels)} {_num(value)}"


class Histogram:
    def __init__(self, name: str, help: str, buckets: Sequence[float]):
        self.name, self.help = name, help
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float, times: int = 1) -> None:
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self.counts[i] += times
            self.sum += value * times

    @property
    def count(self) -> int:
        return sum(self.counts)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        with self._lock:
            counts, total = list(self.counts), self.sum
        running = 0
        for bound, c in zip(self.bounds, counts, strict=False):
            running += c
            yield f'{self.name}_bucket{{le="{_num(bound)}"}} {running}'
        running += counts[-1]
        yield f'{self.name}_bucket{{le="+Inf"}} {running}'
        yield f"{self.name}_sum {_num(total)}"
        yield f"{self.name}_count {running}"


class Metrics:
    """The server's metrics; `render(engine_stats)` is the /metrics body."""

    def __init__(self) -> None:
        self.requests = Counter(
            "jaxfire_requests_total", "HTTP requests answered.", ("endpoint", "status")
        )
        self.prompt_tokens = Counter("jaxfire_prompt_tokens_total", "Prompt tokens processed.")
        self.generation_tokens = Counter(
            "jaxfire_generation_tokens_total", "Completion tokens generated."
        )
        self.cancelled = Counter(
            "jaxfire_requests_cancelled_total", "Requests cancelled by a client disconnect."
        )
        self.ttft = Histogram(
            "jaxfire_time_to_first_token_seconds",
            "Request arrival to first generated token.",
            TTFT_BUCKETS,
        )
        self.itl = Histogram(
            "jaxfire_inter_token_latency_seconds",
            "Time between consecutive tokens of one choice.",
            LATENCY_BUCKETS,
        )
        self.duration = Histogram(
            "jaxfire_request_duration_seconds",
            "Request arrival to last token.",
            DURATION_BUCKETS,
        )
        self.in_flight = 0

    def render(self, engine_stats: dict) -> str:
        lines: list[str] = []
        for metric in (
            self.requests,
            self.prompt_tokens,
            self.generation_tokens,
            self.cancelled,
            self.ttft,
            self.itl,
            self.duration,
        ):
            lines.extend(metric.render())
        active = engine_stats.get("active_slots", 0)
        slots = engine_stats.get("max_slots", 0)
        stat = engine_stats.get
        simple = (  # (type, name, help, value)
            ("gauge", "jaxfire_requests_in_flight", "HTTP generation requests in progress.",
             self.in_flight),
            ("gauge", "jaxfire_queue_length", "Requests waiting for a slot.",
             stat("queue_length", 0)),
            ("gauge", "jaxfire_active_slots", "Decode slots holding a sequence.", active),
            ("gauge", "jaxfire_max_slots", "Decode slots in the batch.", slots),
            ("gauge", "jaxfire_decode_width",
             "Slots the last decode step computed (a bucket above the highest live slot).",
             stat("decode_width", 0)),
            ("gauge", "jaxfire_slot_occupancy_ratio", "Active slots / max slots.",
             active / slots if slots else 0.0),
            ("gauge", "jaxfire_kv_pages", "KV cache pages in the pool.", stat("kv_pages", 0)),
            ("gauge", "jaxfire_kv_pages_used",
             "KV cache pages held by sequences (live tokens rounded up to pages).",
             stat("kv_pages_used", 0)),
            ("gauge", "jaxfire_kv_pages_cached",
             "KV cache pages no sequence holds, kept for prefix reuse until needed.",
             stat("kv_pages_cached", 0)),
            ("gauge", "jaxfire_kv_page_size", "Tokens per KV cache page.", stat("kv_page_size", 0)),
            ("counter", "jaxfire_prompt_tokens_reused_total",
             "Prompt tokens mapped from the prefix cache's pages, so not prefilled.",
             stat("reused_prompt_tokens", 0)),
            ("gauge", "jaxfire_programs_pending",
             "Programs warm-up left to compile in the background (while the engine is idle).",
             stat("programs_pending", 0)),
            ("counter", "jaxfire_preemptions_total",
             "Decoding sequences preempted (recomputed later) because the KV cache was full.",
             stat("preemptions", 0)),
        )  # fmt: skip
        for kind, name, help, value in simple:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {_num(value)}"]
        return "\n".join(lines) + "\n"
