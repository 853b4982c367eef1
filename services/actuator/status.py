"""What the actuator shows on the objects it scales: the autoscaling conditions of
``shared.conditions`` as the ``slaplanner.io/conditions`` annotation, and whether the workload
serves the model the decider's profile was measured on.

Pure: the backends read the objects and write the annotation; here are the numbers and texts.
A DynamoGraphDeployment's status belongs to the Dynamo operator (it rewrites the list), so the
conditions go into an annotation of the object, as JSON in the ``metav1.Condition`` shape.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shared import conditions
from shared.conditions import Condition, ConditionType, Status
from shared.messages import ReplicaTarget, ScaleEvent

CONDITIONS_ANNOTATION = "slaplanner.io/conditions"
# The explanation key under which the decider names the model its profile was measured on.
PROFILE_MODEL_KEY = "profile_model"
MODEL_MISMATCH = "ModelMismatch"
# The worker flags that name the model: vLLM's (and Dynamo's vLLM worker's) ``--model``,
# SGLang's and TensorRT-LLM's ``--model-path``.
MODEL_FLAGS = ("--model", "--model-path")


@dataclass(frozen=True)
class Shown:
    """The conditions to show for one target, judged at ``now`` (epoch seconds)."""

    conditions: tuple[Condition, ...]
    now: float


# ----------------------------------------------------------------------------- the model


def profile_model(target: ReplicaTarget) -> str | None:
    value = target.explanation.get(PROFILE_MODEL_KEY)
    return value if isinstance(value, str) and value.strip() else None


def model_in_args(words: Iterable[Any]) -> str | None:
    """The model a worker's command line names (``--model X``, ``--model=X``, ``--model-path``),
    also inside a shell script passed as one argument (``sh -c "python3 -m dynamo.vllm ..."``)."""
    tokens: list[str] = []
    for word in words:
        if not isinstance(word, str):
            continue
        try:
            tokens += shlex.split(word) if any(c.isspace() for c in word) else [word]
        except ValueError:  # an unbalanced quote: not a command line we can read
            tokens.append(word)
    for index, token in enumerate(tokens):
        flag, equals, value = token.partition("=")
        if flag not in MODEL_FLAGS:
            continue
        if equals:
            return value or None
        if index + 1 < len(tokens) and not tokens[index + 1].startswith("-"):
            return tokens[index + 1]
    return None


def same_model(served: str, profiled: str) -> bool:
    """Whether a worker's model is the profile's: the same Hugging Face id, or a local path that
    ends in the id's name (``/models/Llama-3.1-8B-Instruct-FP8`` for ``nvidia/Llama-...``)."""
    def name(text: str) -> str:
        return text.strip().rstrip("/").lower()

    a, b = name(served), name(profiled)
    return a == b or a.rsplit("/", 1)[-1] == b.rsplit("/", 1)[-1]


def model_mismatch(profiled: str | None, served: Mapping[str, str | None]) -> str | None:
    """Why the profile does not fit the workload (None if it does, or if either is unknown)."""
    if profiled is None:
        return None
    wrong = {role: model for role, model in served.items()
             if model is not None and not same_model(model, profiled)}
    if not wrong:
        return None
    workers = "; ".join(f"{role} workers serve {model}" for role, model in wrong.items())
    return (f"{workers}, but the decider's profile was measured on {profiled}: its replica "
            "counts may be far off; profile this model and point the decider at it")


# ----------------------------------------------------------------------------- the conditions


def for_target(target: ReplicaTarget, event: ScaleEvent, now: float,
               mismatch: str | None = None) -> Shown:
    """The four conditions after ``event``; a model mismatch limits scaling above any bound."""
    limited = conditions.scaling_limited(target)
    if mismatch is not None:
        limited = Condition(ConditionType.SCALING_LIMITED, Status.TRUE, MODEL_MISMATCH, mismatch)
    return Shown((conditions.able_to_scale(target, event, now), conditions.scaling_active(target),
                  limited, conditions.metrics_stale_from_target(target)), now)


def parse(text: str | None) -> list[dict[str, Any]]:
    """The conditions an annotation holds (none if absent or not ours to read)."""
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        return []
    if not isinstance(value, list):
        return []
    return [c for c in value if isinstance(c, dict) and isinstance(c.get("type"), str)]


def render(shown: Shown, previous: str | None) -> str:
    """The annotation's value: each condition keeps its ``lastTransitionTime`` while its status
    stays, as Kubernetes conditions do."""
    before = {c["type"]: c for c in parse(previous)}
    at = datetime.fromtimestamp(shown.now, UTC)
    bodies = []
    for condition in shown.conditions:
        body = condition.as_kubernetes(at)
        old = before.get(body["type"])
        if old is not None and old.get("status") == body["status"] \
                and isinstance(old.get("lastTransitionTime"), str):
            body["lastTransitionTime"] = old["lastTransitionTime"]
        bodies.append(body)
    return json.dumps(bodies, separators=(",", ":"), sort_keys=True)


def changed(previous: str | None, shown: Shown) -> bool:
    """Whether the annotation needs a write of its own: a condition's status or reason moved.

    A message that changes within the same reason (the window's time, say) waits for the next
    scale write, which carries the annotation anyway: a write of its own would have the Dynamo
    operator reconcile the object once per interval for nothing."""
    def key(items: Sequence[Mapping[str, Any]]) -> list[tuple[Any, Any, Any]]:
        return sorted((c.get("type"), c.get("status"), c.get("reason")) for c in items)

    return key(parse(previous)) != key([{"type": str(c.type), "status": str(c.status),
                                         "reason": c.reason} for c in shown.conditions])
