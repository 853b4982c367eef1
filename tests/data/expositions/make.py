"""Writes the recorded expositions of this folder (run from the repository root:
``python tests/data/expositions/make.py``).

They are what a Dynamo frontend and two vLLM workers under Dynamo (one prefill, one decode)
expose before and after one window of requests, with the metric names, label sets and bucket
edges of their own code: Dynamo 1.3 to 1.6 (lib/llm/src/http/service/metrics.rs: requests_total
{model,endpoint,request_type,status,error_type} counted when a request ends, requests_started_total
{model,endpoint,request_type} when the frontend accepts it, model lower-cased, log-spaced buckets
rounded to two significant figures) and vLLM V1 (vllm/v1/metrics/loggers.py: labels model_name
and engine, fixed bucket lists). The engine metrics carry no dynamo_* labels, as under Dynamo 0.9
and earlier (Dynamo's docs/observability/metrics_examples/vllm.log; from 1.0 on Dynamo adds
dynamo_component), so the scrape job gives them the pod's role as a target label.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).parent


def round_2_sig(value: float) -> float:
    """Dynamo's round_to_sig_figs(value, 2): half away from zero, as Rust's f64::round."""
    scale = 10.0 ** (1 - math.floor(math.log10(abs(value))))
    return math.floor(value * scale + 0.5) / scale


def dynamo_buckets(lo: float, hi: float, count: int) -> list[float]:
    edges = [0.0] + [round_2_sig(math.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * i
                                          / (count - 1))) for i in range(1, count)]
    return sorted(set(edges))


DYNAMO_TTFT = dynamo_buckets(0.001, 480.0, 18)
DYNAMO_ITL = dynamo_buckets(0.001, 2.0, 13)
DYNAMO_ISL = dynamo_buckets(50.0, 128000.0, 12)
DYNAMO_OSL = dynamo_buckets(50.0, 32000.0, 10)
DYNAMO_DURATION = dynamo_buckets(1.0, 512.0, 10)
VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
             7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
VLLM_TPOT = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
             10.0, 20.0, 40.0, 80.0]
VLLM_REQUEST = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]

# (isl, osl, ttft_s, itl_s, duration_s, queue_s, prefill_s, decode_s) per request
BEFORE: Sequence[tuple[float, ...]] = [(1000, 100, 0.3, 0.02, 2.5, 0.05, 0.2, 2.0)] * 4
WINDOW: Sequence[tuple[float, ...]] = ([(3000, 200, 0.45, 0.02, 4.5, 0.2, 0.22, 4.0)] * 6
          + [(6000, 100, 0.8, 0.06, 6.9, 0.5, 0.25, 6.0)] * 3
          + [(500, 50, 0.1, 0.03, 1.6, 0.01, 0.08, 1.5)])
FAILED_IN_WINDOW = 2
MODEL = "Qwen/Qwen3-0.6B"


def fmt(value: float) -> str:
    return "+Inf" if math.isinf(value) else (f"{value:g}" if value != int(value) or value == 0
                                             else str(int(value)))


def histogram(name: str, labels: str, edges: list[float], values: list[float],
              python: bool) -> list[str]:
    lines = [f"# TYPE {name} histogram"]
    for edge in [*edges, math.inf]:
        le = ("+Inf" if math.isinf(edge) else repr(float(edge))) if python else fmt(edge)
        count = sum(1 for v in values if v <= edge)
        lines.append(f'{name}_bucket{{{labels},le="{le}"}} {float(count) if python else count}')
    lines.append(f"{name}_sum{{{labels}}} {sum(values)!r}")
    lines.append(f"{name}_count{{{labels}}} {float(len(values)) if python else len(values)}")
    return lines


def frontend(requests: Sequence[tuple[float, ...]], failed: int, queued: int) -> str:
    model = f'model="{MODEL.lower()}"'  # the frontend lower-cases its model label
    started = len(requests) + failed + queued  # accepted: ended, failed, or still before a token
    lines = ["# TYPE dynamo_frontend_requests_started_total counter",
             f'dynamo_frontend_requests_started_total{{endpoint="chat_completions",{model},'
             f'request_type="stream"}} {started}',
             "# TYPE dynamo_frontend_requests_total counter",
             f'dynamo_frontend_requests_total{{endpoint="chat_completions",error_type="",'
             f'{model},request_type="stream",status="success"}} {len(requests)}']
    if failed:  # Dynamo creates the series with its first failure
        lines.append(f'dynamo_frontend_requests_total{{endpoint="chat_completions",'
                     f'error_type="overload",{model},request_type="stream",status="error"}} '
                     f'{failed}')
    for name, edges, index in (("input_sequence_tokens", DYNAMO_ISL, 0),
                               ("output_sequence_tokens", DYNAMO_OSL, 1),
                               ("time_to_first_token_seconds", DYNAMO_TTFT, 2),
                               ("inter_token_latency_seconds", DYNAMO_ITL, 3),
                               ("request_duration_seconds", DYNAMO_DURATION, 4)):
        lines += histogram(f"dynamo_frontend_{name}", model, edges,
                           [float(r[index]) for r in requests], python=False)
    lines += ["# TYPE dynamo_frontend_queued_requests gauge",
              f"dynamo_frontend_queued_requests{{{model}}} {queued}",
              "# TYPE dynamo_frontend_inflight_requests gauge",
              f"dynamo_frontend_inflight_requests{{{model}}} {queued + 2}",
              "# TYPE dynamo_frontend_worker_active_prefill_tokens gauge",
              'dynamo_frontend_worker_active_prefill_tokens{dp_rank="0",worker_id="7",'
              f'worker_type="prefill"}} {queued * 3000}']
    return "\n".join(lines) + "\n"


def worker(role: str, requests: Sequence[tuple[float, ...]], waiting: int, kv: float) -> str:
    labels = f'engine="0",model_name="{MODEL}"'
    lines = ["# TYPE vllm:num_requests_running gauge",
             f"vllm:num_requests_running{{{labels}}} 1.0",
             "# TYPE vllm:num_requests_waiting gauge",
             f"vllm:num_requests_waiting{{{labels}}} {float(waiting)}",
             "# TYPE vllm:kv_cache_usage_perc gauge",
             f"vllm:kv_cache_usage_perc{{{labels}}} {kv}"]
    if role == "prefill":
        lines += histogram("vllm:time_to_first_token_seconds", labels, VLLM_TTFT,
                           [float(r[2]) for r in requests], python=True)
        lines += histogram("vllm:request_queue_time_seconds", labels, VLLM_REQUEST,
                           [float(r[5]) for r in requests], python=True)
        lines += histogram("vllm:request_prefill_time_seconds", labels, VLLM_REQUEST,
                           [float(r[6]) for r in requests], python=True)
    else:
        lines += histogram("vllm:request_time_per_output_token_seconds", labels, VLLM_TPOT,
                           [float(r[3]) for r in requests], python=True)
        lines += histogram("vllm:request_decode_time_seconds", labels, VLLM_REQUEST,
                           [float(r[7]) for r in requests], python=True)
    return "\n".join(lines) + "\n"


def main() -> None:
    after = [*BEFORE, *WINDOW]
    files = {
        "frontend.before.prom": frontend(BEFORE, 0, 0),
        "frontend.after.prom": frontend(after, FAILED_IN_WINDOW, 3),
        "prefill.before.prom": worker("prefill", BEFORE, 0, 0.1),
        "prefill.after.prom": worker("prefill", after, 2, 0.1),
        "decode.before.prom": worker("decode", BEFORE, 0, 0.3),
        "decode.after.prom": worker("decode", after, 1, 0.6),
    }
    for name, text in files.items():
        (HERE / name).write_text(text)


if __name__ == "__main__":
    main()
