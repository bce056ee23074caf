"""Prometheus text-format metrics, counted in-process."""

from __future__ import annotations

import threading
from collections import defaultdict

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_n = 0
        self.audio_seconds = 0.0
        self.compute_seconds = 0.0

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def latency(self, seconds: float) -> None:
        with self._lock:
            index = next(
                (i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS)
            )
            self.latency_counts[index] += 1
            self.latency_sum += seconds
            self.latency_n += 1

    def synthesis(self, audio_seconds: float, compute_seconds: float) -> None:
        with self._lock:
            self.audio_seconds += audio_seconds
            self.compute_seconds += compute_seconds

    def render(self, engine) -> str:
        lines = [
            "# HELP voicefoundry_requests_total HTTP requests by route and status.",
            "# TYPE voicefoundry_requests_total counter",
        ]
        with self._lock:
            for (route, status), n in sorted(self.requests.items()):
                lines.append(
                    f'voicefoundry_requests_total{{route="{route}",status="{status}"}} {n}'
                )
            lines += [
                "# HELP voicefoundry_speak_latency_seconds Time to the full response.",
                "# TYPE voicefoundry_speak_latency_seconds histogram",
            ]
            cumulative = 0
            for bound, count in zip(LATENCY_BUCKETS, self.latency_counts, strict=False):
                cumulative += count
                lines.append(
                    f'voicefoundry_speak_latency_seconds_bucket{{le="{bound}"}} {cumulative}'
                )
            lines.append(f'voicefoundry_speak_latency_seconds_bucket{{le="+Inf"}} {self.latency_n}')
            lines.append(f"voicefoundry_speak_latency_seconds_sum {self.latency_sum:.6f}")
            lines.append(f"voicefoundry_speak_latency_seconds_count {self.latency_n}")
            rtf = self.compute_seconds / self.audio_seconds if self.audio_seconds else 0.0
            lines += [
                "# HELP voicefoundry_real_time_factor Wall time / audio time so far.",
                "# TYPE voicefoundry_real_time_factor gauge",
                f"voicefoundry_real_time_factor {rtf:.6f}",
                "# TYPE voicefoundry_audio_seconds_total counter",
                f"voicefoundry_audio_seconds_total {self.audio_seconds:.3f}",
            ]
        lines += [
            "# HELP voicefoundry_queue_depth Requests waiting or running.",
            "# TYPE voicefoundry_queue_depth gauge",
            f"voicefoundry_queue_depth {engine.queue_depth}",
            "# HELP voicefoundry_batch_size_total Batches run, by size.",
            "# TYPE voicefoundry_batch_size_total counter",
        ]
        for size, n in sorted(engine.stats.batch_sizes.items()):
            lines.append(f'voicefoundry_batch_size_total{{size="{size}"}} {n}')
        lines += ["# TYPE voicefoundry_adapter_cache_total counter"]
        for name, model in sorted(engine.models.items()):
            st = model.bank.stats
            for event, n in (("hit", st.hits), ("miss", st.misses), ("eviction", st.evictions)):
                lines.append(
                    f'voicefoundry_adapter_cache_total{{model="{name}",event="{event}"}} {n}'
                )
        return "\n".join(lines) + "\n"
