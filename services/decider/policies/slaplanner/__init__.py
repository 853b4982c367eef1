"""The ``slaplanner`` policy: keep TTFT and ITL under target with as few GPUs as the load allows.

A pure function of the forecast, the last snapshot, the profile, the configuration and the
deployment's memory (``PolicyState.extra["slaplanner"]``); no clock (``now`` is the forecast's or
the snapshot's ``window_end``), no bus, no cluster. What it does that Dynamo's policy does not:

- **Lookahead.** A worker asked for now serves only after its startup time (configured, 180 s by
  default, then learnt from the deployment's own ScaleEvents). Each role is sized for the
  busiest forecast step up to ``now + startup + interval``; a step before new workers could be
  ready may keep what runs but adds nothing (what it needs beyond, they would bring too late).
- **Quantile, moved by the SLA.** The load covered is the forecast at a quantile per role,
  rescaled from the forecaster's confidence under a normal error (``point + (upper - point) *
  z_ours / z_theirs``); it starts at ``load_confidence`` and the SLA feedback moves it: up at once
  when the observed misses of the role's target pass its share of the goal, down slowly while
  well within it, bounded.
- **Prefill on predicted attainment** (``attainment.py``). The fewest engines whose predicted
  share of TTFTs over target stays within prefill's share of ``1 - attainment_goal``: a GI/G/c
  queue (Erlang C with the Allen-Cunneen factor) fed with the measured burstiness of arrivals
  (the snapshots' index of dispersion) and the measured prompt mix (a lognormal through the ISL
  quantiles), each prompt's wait budget being the target less its own prefill time.
- **Decode on the ITL tail.** Requests in flight = rate x OSL x ITL (Little's law), Poisson
  (M/G/infinity); each engine takes as many as keep ITL under target on the profile's curve
  *and* fit the KV-cache headroom; the fewest engines whose predicted share of requests decoded
  in an over-full batch stays within decode's share of the goal.
- **Corrections from engine time** (``corrections.py``): prefill's factor is the observed
  prefill compute time over the profile's at the window's prompt mix (queueing never reads as
  slow engines; without a compute-time metric, the engine slowdown that makes the queueing
  model reproduce the observed mean TTFT); decode's is observed / profiled ITL at the observed
  concurrency; both clamped, averaged with weights equal to their request counts, and not fed
  by windows in which a role's new workers warm up.
- **Stabilisation and step limits** as the HPA (``stabilise.py``), with a window of one startup
  delay plus one interval unless configured (released capacity is back no sooner), except that
  the window holds
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
``sizing``, ``attainment`` and ``queueing``, the HPA's behaviour in ``stabilise``, the
correction factors in ``corrections`` and startup learning in ``startup``.
"""

from services.decider.policies.slaplanner.fast_path import fast_path
from services.decider.policies.slaplanner.memory import observe_scale_event
from services.decider.policies.slaplanner.plan import NAME, decide

__all__ = ["NAME", "decide", "fast_path", "observe_scale_event"]
