"""The simulated cluster on scenarios small enough to check by hand, plus its invariants."""

from __future__ import annotations

import numpy as np
import pytest

from shared.perf_model import Profile, default_profile_path, load_profile
from shared.traces import Trace
from sim.cluster import Cluster, ClusterConfig, DecodeModel, Role, clip_to_context
from sim.synth import SineLoad, generate

MODELS = [DecodeModel.SLICED, DecodeModel.TOKEN]


@pytest.fixture(scope="module")
def profile() -> Profile:
    return load_profile(default_profile_path())


def trace(arrival: list[float], isl: int | list[int], osl: int | list[int]) -> Trace:
    n = len(arrival)
    isl_list = isl if isinstance(isl, list) else [isl] * n
    osl_list = osl if isinstance(osl, list) else [osl] * n
    return Trace(
        np.asarray(arrival, dtype=np.float64),
        np.asarray(isl_list, dtype=np.int64),
        np.asarray(osl_list, dtype=np.int64),
    )


@pytest.mark.parametrize("model", MODELS)
def test_a_request_alone_takes_the_profiled_prefill_time_and_the_itl_at_concurrency_one(
    profile: Profile, model: DecodeModel
) -> None:
    cluster = Cluster(trace([1.0], 3000, 51), profile, ClusterConfig(decode_model=model))
    result = cluster.finish_run(60.0)
    # TTFT = no wait + prefill(3000) = 0.0605 s; 50 decode steps at one request in flight.
    assert result.ttft_s[0] == pytest.approx(profile.prefill.ttft_s(3000), rel=1e-9)
    assert result.itl_s[0] == pytest.approx(profile.decode.itl_s(1, 3000), rel=1e-6)
    assert result.finish_s[0] == pytest.approx(
        1.0 + profile.prefill.ttft_s(3000) + 50 * profile.decode.itl_s(1, 3000), rel=1e-6
    )


def test_engines_twenty_percent_slower_take_twenty_percent_longer(profile: Profile) -> None:
    cluster = Cluster(trace([1.0], 3000, 51), profile, ClusterConfig(perf_skew=1.2))
    result = cluster.finish_run(60.0)
    assert result.ttft_s[0] == pytest.approx(1.2 * profile.prefill.ttft_s(3000), rel=1e-9)
    assert result.itl_s[0] == pytest.approx(1.2 * profile.decode.itl_s(1, 3000), rel=1e-6)


def test_a_queue_forms_when_requests_come_faster_than_one_prefill_worker_serves(
    profile: Profile,
) -> None:
    prefill = profile.prefill.ttft_s(3000)  # 0.0605 s
    cluster = Cluster(trace([0.0] * 5, 3000, 2), profile, ClusterConfig())
    stats = cluster.advance(2 * prefill + 0.001)
    # at 2 x 0.0605 s: two prefilled, one in progress, two still queued
    assert (stats.first_tokens, stats.prefill_running, stats.prefill_waiting) == (2, 1, 2)
    result = cluster.finish_run(60.0)
    # FCFS on one worker: the k-th request's TTFT is k prefill times
    assert result.ttft_s == pytest.approx(prefill * np.arange(1, 6), rel=1e-9)


def test_two_prefill_workers_serve_the_queue_two_at_a_time(profile: Profile) -> None:
    prefill = profile.prefill.ttft_s(3000)
    cluster = Cluster(trace([0.0] * 4, 3000, 2), profile, ClusterConfig(start_prefill=2))
    result = cluster.finish_run(60.0)
    assert np.sort(result.ttft_s) == pytest.approx(prefill * np.array([1, 1, 2, 2]), rel=1e-9)


@pytest.mark.parametrize("model", MODELS)
def test_a_worker_asked_for_at_t_serves_only_after_the_startup_delay_and_is_billed_from_t(
    profile: Profile, model: DecodeModel
) -> None:
    config = ClusterConfig(start_prefill=0, startup_delay_s=30.0, decode_model=model)
    cluster = Cluster(trace([1.0, 15.0], 3000, 11), profile, config)
    cluster.advance(10.0)
    cluster.scale(prefill=1, decode=1)  # t0 + 10 -> one prefill worker asked for
    assert cluster.replicas() == (1, 1) and cluster.serving() == (0, 1)
    stats = cluster.advance(39.9)  # t0 + 39.9 -> still starting: nothing prefilled
    assert stats.first_tokens == 0 and stats.prefill_waiting == 2
    result = cluster.finish_run(60.0)
    # t0 + 40 -> ready: both start at 40, one after the other
    assert result.prefill_start_s.min() == pytest.approx(40.0)
    worker = next(w for w in result.workers if w.role is Role.PREFILL)
    assert (worker.requested_at, worker.ready_at) == (10.0, 40.0)
    # billed 10 -> 60 (prefill) plus 0 -> 60 (decode)
    assert result.gpu_seconds() == pytest.approx(50.0 + 60.0)


def test_a_scale_down_cancels_a_starting_worker_first_and_bills_it_until_then(
    profile: Profile,
) -> None:
    cluster = Cluster(trace([100.0], 3000, 2), profile, ClusterConfig(startup_delay_s=60.0))
    cluster.advance(10.0)
    cluster.scale(prefill=2, decode=1)  # t0 + 10 -> a second prefill worker starts
    cluster.advance(20.0)
    cluster.scale(prefill=1, decode=1)  # t0 + 20 -> it is cancelled, not the serving one
    starting = next(w for w in cluster.workers if w.wid != 0 and w.role is Role.PREFILL)
    assert (starting.retired_at, starting.released_at) == (20.0, 20.0)
    assert cluster.serving() == (1, 1)
    result = cluster.finish_run(120.0)
    assert result.gpu_seconds() == pytest.approx(120.0 + 120.0 + 10.0)


@pytest.mark.parametrize("model", MODELS)
def test_a_scale_down_drains_the_running_requests_and_bills_until_they_finish(
    profile: Profile, model: DecodeModel
) -> None:
    cluster = Cluster(trace([0.0], 3000, 2001), profile, ClusterConfig(decode_model=model))
    cluster.advance(2.0)
    cluster.scale(prefill=1, decode=0)  # t0 + 2 -> the decode worker stops taking work
    assert cluster.replicas() == (1, 0)
    result = cluster.finish_run(5.0)
    decode = next(w for w in result.workers if w.role is Role.DECODE)
    # 2000 tokens at ~4.5 ms: the request finishes near t0 + 9, and so does the billing
    assert result.finish_s[0] > 8.0
    assert decode.retired_at == 2.0
    assert decode.released_at == pytest.approx(result.finish_s[0])


def test_a_prefill_worker_stopped_mid_request_finishes_it_and_is_billed_until_then(
    profile: Profile,
) -> None:
    prefill = profile.prefill.ttft_s(16000)  # about 0.37 s
    cluster = Cluster(trace([0.0, 0.0], 16000, 2), profile, ClusterConfig(start_prefill=2))
    cluster.advance(0.1)
    cluster.scale(prefill=1, decode=1)
    stopped = next(w for w in cluster.workers if w.role is Role.PREFILL and w.retired_at)
    assert stopped.released_at == pytest.approx(prefill)


@pytest.mark.parametrize("model", MODELS)
def test_kv_capacity_blocks_admission_until_a_request_finishes(
    profile: Profile, model: DecodeModel
) -> None:
    # 16,000 tokens reserved each: one engine of 945,029 KV tokens holds 59 of them.
    cluster = Cluster(
        trace([0.0] * 100, 15000, 1000),
        profile,
        ClusterConfig(start_prefill=16, decode_model=model),
    )
    stats = cluster.advance(15.0)
    assert (stats.decode_running, stats.decode_waiting) == (59, 41)
    result = cluster.finish_run(15.0)
    first_done = np.sort(result.finish_s)[58]
    later = np.argsort(result.finish_s)[59:]
    # the 60th cannot start before the first 59 finish, so its whole decode comes after
    assert np.all(result.finish_s[later] > first_done)


def test_requests_longer_than_the_context_limit_are_cut_and_counted(profile: Profile) -> None:
    isl, osl, clipped = clip_to_context(
        np.array([16000, 3000, 20]), np.array([1000, 1000, 20000]), 16384
    )
    assert isl.tolist() == [15384, 3000, 1]  # 16384 - 1000; fits; only 1 input token left
    assert osl.tolist() == [1000, 1000, 16383]
    assert clipped.tolist() == [True, False, True]
    cluster = Cluster(trace([0.0, 1.0], [16000, 3000], 1000), profile, ClusterConfig())
    result = cluster.finish_run(60.0)
    assert result.clipped.sum() == 1 and result.isl_tokens.tolist() == [15384, 3000]


def test_every_request_finishes_exactly_once_and_each_window_counts_it_once(
    profile: Profile,
) -> None:
    load = SineLoad(600, 5, 40, 200, 3000, 300, isl_cv=0.8, osl_cv=0.8, seed=2)
    requests = generate(load)
    config = ClusterConfig(startup_delay_s=30.0, noise_cv=0.2, seed=1)
    cluster = Cluster(requests, profile, config)
    first_tokens = finished = arrivals = 0
    for k, (prefill, decode) in enumerate([(1, 1), (3, 2), (2, 1), (4, 3), (1, 1)] * 2):
        stats = cluster.advance(60.0 * (k + 1))
        first_tokens += stats.first_tokens
        finished += stats.finished
        arrivals += stats.num_requests
        cluster.scale(prefill, decode)
    result = cluster.finish_run(600.0)
    n = len(requests)
    assert arrivals == n
    assert np.isfinite(result.finish_s).all()
    assert np.all(result.prefill_start_s >= result.arrival_s)
    assert np.all(result.first_token_s > result.prefill_start_s)
    assert np.all(result.finish_s >= result.first_token_s)
    # what finished after the last window was drained by finish_run
    assert first_tokens <= n and finished <= n
    assert finished + np.sum(result.finish_s >= 600.0) == n


def test_the_same_seed_gives_the_same_run_and_another_seed_another(profile: Profile) -> None:
    requests = generate(SineLoad(300, 5, 30, 100, 2000, 200, isl_cv=0.5, seed=4))

    def run(seed: int) -> np.ndarray:
        cluster = Cluster(requests, profile, ClusterConfig(noise_cv=0.3, seed=seed))
        for k in range(1, 6):
            cluster.advance(60.0 * k)
            cluster.scale(1 + k % 2, 1 + k % 3)
        return cluster.finish_run(300.0).finish_s

    assert np.array_equal(run(7), run(7))
    assert not np.array_equal(run(7), run(8))


def test_sliced_and_per_token_decode_agree_on_a_loaded_engine(profile: Profile) -> None:
    requests = generate(SineLoad(240, 10, 30, 120, 3000, 150, osl_cv=0.5, seed=6))

    def mean_itl(model: DecodeModel) -> float:
        cluster = Cluster(requests, profile, ClusterConfig(start_prefill=2, decode_model=model))
        return float(np.nanmean(cluster.finish_run(240.0).itl_s))

    assert mean_itl(DecodeModel.SLICED) == pytest.approx(mean_itl(DecodeModel.TOKEN), rel=0.03)
