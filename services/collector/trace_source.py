"""Trace source: replay a recorded trace as one snapshot per window, in virtual time.

Each window of the trace becomes the snapshot a collector would have published: the request count
and mean/p90 ISL and OSL as recorded, and latencies looked up in the profile for the worker counts
the actuator last reported. The next window is published only once the ScaleEvent of the current
one has come back, so a day of trace replays in seconds and every decision sees its predecessor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.aio.msg import Msg

from services.collector import window
from services.collector.settings import CollectorSettings
from shared import perf_model, traces
from shared.messages import DeploymentKey, MetricSnapshot, ScaleEvent
from shared.service import Runtime

log = logging.getLogger("slaplanner.collector")


WindowLoad = traces.WindowLoad


def trace_windows(trace: traces.Trace, interval_s: float) -> list[WindowLoad]:
    """Every window from the first to the last request, empty ones included (a real idle 0)."""
    return traces.window_loads(trace, interval_s)


def profiled_latencies(
    profile: perf_model.Profile, load: WindowLoad, interval_s: float, decode_workers: int
) -> dict[str, float]:
    """TTFT, ITL and request duration as profiled for this load (no queueing: no simulator yet)."""
    if load.num_requests == 0 or load.isl_avg is None or load.osl_avg is None:
        return {}
    ttft = profile.prefill.ttft_s(load.isl_avg)
    context = load.isl_avg + load.osl_avg / 2.0
    rate = load.num_requests / interval_s
    itl = profile.decode.itl_s(0.0, context)
    # Little's law with the duration depending on the ITL it implies: a few fixed-point steps.
    for _ in range(5):
        duration = ttft + load.osl_avg * itl
        concurrency = rate * duration / max(decode_workers, 1)
        itl = profile.decode.itl_s(concurrency, context)
    return {"ttft_avg_s": ttft, "itl_avg_s": itl,
            "request_duration_avg_s": ttft + load.osl_avg * itl}


def window_snapshot(
    key: DeploymentKey, settings: CollectorSettings, load: WindowLoad,
    latencies: dict[str, float], prefill_workers: int, decode_workers: int,
) -> MetricSnapshot:
    gaps = {}
    if load.num_requests == 0:  # an idle window: a real 0 requests, averages undefined
        gaps = {f: window.UNDEFINED for f in ("isl_avg", "osl_avg", "isl_p90", "osl_p90",
                                              "ttft_avg_s", "itl_avg_s", "request_duration_avg_s")}
    return MetricSnapshot(
        deployment=key, source="trace", window_s=settings.interval_s,
        window_end=settings.trace_start_epoch_s + (load.index + 1) * settings.interval_s,
        num_requests=float(load.num_requests), isl_avg=load.isl_avg, osl_avg=load.osl_avg,
        isl_p90=load.isl_p90, osl_p90=load.osl_p90, prefill_workers=prefill_workers,
        decode_workers=decode_workers, gaps=gaps, ttft_avg_s=latencies.get("ttft_avg_s"),
        itl_avg_s=latencies.get("itl_avg_s"),
        request_duration_avg_s=latencies.get("request_duration_avg_s"),
    )


async def run(runtime: Runtime, settings: CollectorSettings) -> None:
    if settings.trace_file is None:
        raise ValueError("--source trace needs --trace-file")
    key = DeploymentKey(namespace=settings.namespace, name=settings.deployment)
    trace = traces.load_trace(settings.trace_file).sped_up(settings.trace_speedup)
    profile = perf_model.load_profile(settings.profile or perf_model.default_profile_path())
    windows = trace_windows(trace, settings.interval_s)
    if settings.trace_max_intervals:
        windows = windows[: settings.trace_max_intervals]
    log.info("replaying %d windows of %s (x%g) for %s", len(windows), settings.trace_file,
             settings.trace_speedup, key)

    events: asyncio.Queue[ScaleEvent] = asyncio.Queue()

    async def on_scaled(msg: Msg) -> None:
        # the actuator's own messages are valid; anything else is not ours to judge
        with contextlib.suppress(ValueError):
            await events.put(ScaleEvent.from_json(msg.data))

    sub = await runtime.nc.subscribe(ScaleEvent.subject_pattern.format(
        namespace=key.namespace, name=key.name), cb=on_scaled)
    prefill_workers, decode_workers = 1, 1
    for load in windows:
        if runtime.stop.is_set():
            break
        snapshot = window_snapshot(
            key, settings, load,
            profiled_latencies(profile, load, settings.interval_s, decode_workers),
            prefill_workers, decode_workers,
        )
        await runtime.publish(snapshot)
        try:
            while True:
                event = await asyncio.wait_for(events.get(), settings.trace_pace_timeout_s)
                if event.window_end == snapshot.window_end:
                    break
        except TimeoutError:
            log.warning("no ScaleEvent for window %s within %.0f s; going on",
                        snapshot.window_end, settings.trace_pace_timeout_s)
            continue
        # The simulated cluster obeys at once; the simulator adds startup delays.
        prefill_workers, decode_workers = event.prefill.to, event.decode.to
    await sub.unsubscribe()
    log.info("trace finished")
