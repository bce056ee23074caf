"""Prometheus text-format metrics, counted in-process."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from server.limits import Limiter
from server.usage import Usage

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
        self.duplex_rejections: dict[int, int] = defaultdict(int)
        self.duplex_dropped_in = 0
        self.duplex_dropped_out = 0
        self.duplex_closes: dict[int, int] = defaultdict(int)  # sessions the server ended
        self.duplex_outbox_peak = 0

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

    def duplex_rejected(self, close_code: int) -> None:
        with self._lock:
            self.duplex_rejections[int(close_code)] += 1

    def duplex_closed(self, close_code: int) -> None:
        with self._lock:
            self.duplex_closes[int(close_code)] += 1

    def duplex_session(self, session) -> None:
        """A duplex session ended: keep its drop counts and how far its outbox filled."""
        with self._lock:
            self.duplex_dropped_in += session.dropped_in
            self.duplex_dropped_out += session.dropped_out
            self.duplex_outbox_peak = max(self.duplex_outbox_peak, session.out_peak)

    def render_duplex(self, duplex) -> str:
        stats = duplex.stats
        ticks = sorted(stats.tick_seconds)
        p50 = ticks[len(ticks) // 2] if ticks else 0.0
        p95 = ticks[min(len(ticks) - 1, int(len(ticks) * 0.95))] if ticks else 0.0
        live = list(duplex.sessions.values())
        with self._lock:
            dropped_in = self.duplex_dropped_in + sum(s.dropped_in for s in live)
            dropped_out = self.duplex_dropped_out + sum(s.dropped_out for s in live)
            rejections = sorted(self.duplex_rejections.items())
            closes = sorted(self.duplex_closes.items())
            outbox_peak = max([self.duplex_outbox_peak, *(s.out_peak for s in live)])
        lines = [
            "# HELP voicefoundry_duplex_sessions Live duplex sessions.",
            "# TYPE voicefoundry_duplex_sessions gauge",
            f"voicefoundry_duplex_sessions {len(live)}",
            "# TYPE voicefoundry_duplex_sessions_opened_total counter",
            f"voicefoundry_duplex_sessions_opened_total {stats.sessions_opened}",
            "# TYPE voicefoundry_duplex_sessions_closed_total counter",
            f"voicefoundry_duplex_sessions_closed_total {stats.sessions_closed}",
            "# TYPE voicefoundry_duplex_rejected_total counter",
            *(f'voicefoundry_duplex_rejected_total{{code="{c}"}} {n}' for c, n in rejections),
            "# HELP voicefoundry_duplex_closed_total Sessions the server closed, by close code "
            "(4413: the client left too many messages unread).",
            "# TYPE voicefoundry_duplex_closed_total counter",
            *(f'voicefoundry_duplex_closed_total{{code="{c}"}} {n}' for c, n in closes),
            "# HELP voicefoundry_duplex_outbox_peak The most messages a session's outbound "
            "queue held (bounded by duplex_max_outbox_frames + duplex_max_unread_replies).",
            "# TYPE voicefoundry_duplex_outbox_peak gauge",
            f"voicefoundry_duplex_outbox_peak {outbox_peak}",
            "# HELP voicefoundry_duplex_frames_total 80 ms frames stepped.",
            "# TYPE voicefoundry_duplex_frames_total counter",
            f"voicefoundry_duplex_frames_total {stats.frames}",
            "# HELP voicefoundry_duplex_dropped_frames_total Input frames dropped (sent faster "
            "than real time) and output frames dropped (client not reading).",
            "# TYPE voicefoundry_duplex_dropped_frames_total counter",
            f'voicefoundry_duplex_dropped_frames_total{{direction="in"}} {dropped_in}',
            f'voicefoundry_duplex_dropped_frames_total{{direction="out"}} {dropped_out}',
            "# HELP voicefoundry_duplex_tick_seconds Step time of recent ticks (budget 0.08).",
            "# TYPE voicefoundry_duplex_tick_seconds gauge",
            f'voicefoundry_duplex_tick_seconds{{quantile="0.5"}} {p50:.6f}',
            f'voicefoundry_duplex_tick_seconds{{quantile="0.95"}} {p95:.6f}',
            "# HELP voicefoundry_duplex_batch_size_total Ticks run, by sessions stepped together.",
            "# TYPE voicefoundry_duplex_batch_size_total counter",
            *(
                f'voicefoundry_duplex_batch_size_total{{size="{size}"}} {n}'
                for size, n in sorted(stats.batch_sizes.items())
            ),
            *_bank_lines("voicefoundry_duplex_", duplex.models),
        ]
        return "\n".join(lines) + "\n"

    def render_keys(self, totals: Mapping[str, Usage], limiter: Limiter) -> str:
        """Usage, refusals and running work per API key id (the id: never a secret)."""
        lines = []
        for name, counter, help_text in (
            ("requests", "requests", "Requests admitted"),
            ("characters", "characters", "Characters of text synthesised"),
            ("audio_seconds", "audio_seconds", "Seconds of speech audio produced"),
            ("duplex_seconds", "duplex_seconds", "Seconds of duplex sessions"),
            ("training_seconds", "training_seconds", "Seconds of training processes"),
        ):
            metric = f"voicefoundry_key_{name}_total"
            lines += [f"# HELP {metric} {help_text}, by API key id.", f"# TYPE {metric} counter"]
            for key_id, usage in sorted(totals.items()):
                value = getattr(usage, counter)
                shown = f"{value:.3f}" if isinstance(value, float) else str(value)
                lines.append(f'{metric}{{key="{key_id}"}} {shown}')
        lines += [
            "# HELP voicefoundry_key_limited_total Requests refused (429) by a key's limit.",
            "# TYPE voicefoundry_key_limited_total counter",
            *(
                f'voicefoundry_key_limited_total{{key="{key_id}",limit="{limit}"}} {n}'
                for (key_id, limit), n in sorted(limiter.refusals().items())
            ),
            "# HELP voicefoundry_key_active Work running per key: streams, duplex, job intakes.",
            "# TYPE voicefoundry_key_active gauge",
            *(
                f'voicefoundry_key_active{{key="{key_id}",kind="{kind}"}} {n}'
                for (key_id, kind), n in sorted(limiter.active().items())
            ),
        ]
        return "\n".join(lines) + "\n"

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
            "# HELP voicefoundry_batch_size_total Batches run, by size (continuous scheduling: "
            "running rows after each admission).",
            "# TYPE voicefoundry_batch_size_total counter",
        ]
        for size, n in sorted(engine.stats.batch_sizes.items()):
            lines.append(f'voicefoundry_batch_size_total{{size="{size}"}} {n}')
        lines += _engine_step_lines(engine.stats)
        lines += [
            "# HELP voicefoundry_engine_rounds_total Engine rounds (one segment of each job "
            "in a batch).",
            "# TYPE voicefoundry_engine_rounds_total counter",
            f"voicefoundry_engine_rounds_total {engine.stats.rounds}",
            "# HELP voicefoundry_speak_budget_exceeded_total Requests stopped over a budget "
            "(audio: max_request_audio_seconds, time: max_request_wall_seconds).",
            "# TYPE voicefoundry_speak_budget_exceeded_total counter",
        ]
        for budget in ("audio", "time"):
            n = engine.stats.budget_exceeded.get(budget, 0)
            lines.append(f'voicefoundry_speak_budget_exceeded_total{{budget="{budget}"}} {n}')
        lines += _occupancy_lines(engine)
        lines += ["# TYPE voicefoundry_adapter_cache_total counter"]
        for name, model in sorted(engine.models.items()):
            st = model.bank.stats
            for event, n in (("hit", st.hits), ("miss", st.misses), ("eviction", st.evictions)):
                lines.append(
                    f'voicefoundry_adapter_cache_total{{model="{name}",event="{event}"}} {n}'
                )
        return "\n".join(lines) + "\n"


def _occupancy_lines(engine: Any) -> list[str]:
    """What is held now: each model's running rows, and its adapter bank's slots and the
    references running rows hold on them (all back to 0 once every request ended)."""
    lines = [
        "# HELP voicefoundry_engine_running_rows Rows decoding now, by model.",
        "# TYPE voicefoundry_engine_running_rows gauge",
    ]
    for name, rows in sorted(engine.running_rows().items()):
        lines.append(f'voicefoundry_engine_running_rows{{model="{name}"}} {rows}')
    return lines + _bank_lines("voicefoundry_", engine.models)


def _bank_lines(prefix: str, models: Mapping[str, Any]) -> list[str]:
    """Each model's adapter-bank slots and the references running rows hold on them."""
    usages = [(name, model.bank.usage()) for name, model in sorted(list(models.items()))]
    lines = [
        f"# HELP {prefix}adapter_slots Adapter-bank slots by model: capacity, resident "
        "(an adapter loaded), held (by running rows or sessions).",
        f"# TYPE {prefix}adapter_slots gauge",
    ]
    for name, usage in usages:
        for state in ("capacity", "resident", "held"):
            value = getattr(usage, state)
            lines.append(f'{prefix}adapter_slots{{model="{name}",state="{state}"}} {value}')
    lines += [
        f"# HELP {prefix}adapter_references Running rows or sessions holding an adapter "
        "slot, by model.",
        f"# TYPE {prefix}adapter_references gauge",
    ]
    for name, usage in usages:
        lines.append(f'{prefix}adapter_references{{model="{name}"}} {usage.references}')
    return lines


def _quantiles(values: list[float]) -> list[tuple[str, float]]:
    ordered = sorted(values)
    if not ordered:
        return []
    return [
        (q, ordered[min(len(ordered) - 1, int(float(q) * len(ordered)))]) for q in ("0.5", "0.95")
    ]


def _engine_step_lines(stats: Any) -> list[str]:
    """Iteration-level scheduling: batch occupancy per decode step, queue wait, time to first
    audio, and the real-time factor of each family."""
    lines = [
        "# HELP voicefoundry_engine_step_rows_total Decode steps, by running rows in the step.",
        "# TYPE voicefoundry_engine_step_rows_total counter",
    ]
    for rows, n in sorted(stats.step_rows.items()):
        lines.append(f'voicefoundry_engine_step_rows_total{{rows="{rows}"}} {n}')
    for name, values, what in (
        ("queue_wait_seconds", list(stats.queue_wait_s), "arrival to first admission"),
        ("first_audio_seconds", list(stats.first_audio_s), "arrival to first audio"),
    ):
        lines += [
            f"# HELP voicefoundry_{name} Seconds from a request's {what} (last 1024).",
            f"# TYPE voicefoundry_{name} summary",
        ]
        for q, value in _quantiles(values):
            lines.append(f'voicefoundry_{name}{{quantile="{q}"}} {value:.6f}')
        lines.append(f"voicefoundry_{name}_count {len(values)}")
    lines += [
        "# HELP voicefoundry_family_real_time_factor Wall time of finished requests over the "
        "audio they made, by family.",
        "# TYPE voicefoundry_family_real_time_factor gauge",
    ]
    for family, audio in sorted(stats.family_audio_s.items()):
        if audio > 0:
            rtf = stats.family_wall_s.get(family, 0.0) / audio
            lines.append(f'voicefoundry_family_real_time_factor{{family="{family}"}} {rtf:.6f}')
    return lines
