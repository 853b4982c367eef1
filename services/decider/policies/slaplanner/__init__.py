"""The ``slaplanner`` policy: keep TTFT and ITL under target with as few GPUs as the load allows.

A pure function of the forecast, the last snapshot, the profile, the configuration and the
deployment's memory (``PolicyState.extra["slaplanner"]``); no clock (``now`` is the forecast's or
the snapshot's ``window_end``), no bus, no cluster. What it does that Dynamo's policy does not:

- **Lookahead.** A worker asked for now serves only after its startup time (configured, 180 s by
  default, then learnt from the deployment's own ScaleEvents). Each role is sized for the
  busiest forecast step up to ``now + startup + interval`` (until the next decision's workers can
  be ready), so nothing is removed that would be needed before it could be back.
- **Quantile.** The load covered is the forecast's upper quantile, rescaled from the forecaster's
  confidence to ours under a normal error (``point + (upper - point) * z_ours / z_theirs``).
- **Prefill by queueing.** The fewest engines for which the M/G/c wait stays within
  ``TTFT target - prefill time`` for ``ttft_quantile`` of requests (Erlang C with the
  Allen-Cunneen variability factor, ``queueing.py``).
- **Decode by Little's law.** Requests in flight = rate x OSL x ITL; each engine takes as many as
  keep ITL under target on the profile's curve *and* fit the KV-cache headroom; the Poisson
  quantile of the M/G/infinity concurrency is covered.
- **Corrections that cannot explode** (``corrections.py``): prefill's factor is the engine
  slowdown that makes the queueing model reproduce the observed mean TTFT (so queueing is not
  mistaken for slow engines, and a TTFT worse than profiled *does* add engines); decode's is
  observed / profiled ITL at the observed concurrency; both clamped and averaged with weights
  equal to their request counts.
- **Stabilisation and step limits** as the HPA (``stabilise.py``), except that the window holds
  no more than the forecast's own upper quantile needs over the whole lookahead once that upper
  quantile has held for every window checked lately; **ratio bounds**; **scale to
  zero** (opt-in); **a GPU budget split** that gives the GPUs to the role whose shortfall costs
  the SLA more, by the same queueing models.
- **A fast path** between planning intervals (``fast_path``): on a growing queue, latency p99
  over target or an observed rate above what the requested replicas serve, scale up at once
  within the step limits, counting replicas already starting; never down.
- Missing or stale load metrics hold the last target; missing latencies (while requests flowed)
  let the deployment grow but not shrink. Every rule that bound a number is named.

The package follows the policy's sections: ``memory`` (what it remembers and learns from each
input), ``load`` (the load over the lookahead), ``plan`` (the planning decision), ``bounds``
(floors, ratios, maxima, the GPU budget split) and ``fast_path``; the arithmetic is in
``sizing`` and ``queueing``, the HPA's behaviour in ``stabilise``, the correction factors in
``corrections`` and startup learning in ``startup``.
"""

from services.decider.policies.slaplanner.fast_path import fast_path
from services.decider.policies.slaplanner.memory import observe_scale_event
from services.decider.policies.slaplanner.plan import NAME, decide

__all__ = ["NAME", "decide", "fast_path", "observe_scale_event"]
