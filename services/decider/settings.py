"""The decider's settings: the service's (bus, port, log level) and the knobs of every deployment.

Every knob of ``knobs.DeploymentKnobs`` is a flag (``--ttft-target-s``), an environment variable
(``SLAPLANNER_TTFT_TARGET_S``) and a key of the optional per-deployment TOML file::

    [defaults]                      # over the flags/environment, for every deployment
    ttft_target_s = "300ms"
    max_total_gpus = 16

    [deployments."prod/llama"]      # namespace/name; over [defaults]
    itl_target_s = "20ms"
    min_prefill_replicas = 2

Keys ending in ``_s`` take text with a unit or bare seconds. Renamed knobs are read under their
former names too (``max_gpu_budget``), with a warning.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from pydantic import Field, ValidationError, model_validator

from services.decider import knobs as knob_model
from services.decider.knobs import DeploymentKnobs
from shared.messages import DNS_LABEL
from shared.partition import ReplicaIndex
from shared.service_settings import DEFAULT_HTTP_PORTS, ServiceSettings, http_port_field
from shared.settings import DurationS, explain


class KnobsFileError(ValueError):
    """A per-deployment file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class KnobsByDeployment:
    """The knobs of every deployment: the base, ``[defaults]`` over it, then each override."""

    defaults: DeploymentKnobs
    overrides: dict[str, DeploymentKnobs] = field(default_factory=dict)
    source: str | None = None

    def for_deployment(self, key: str) -> DeploymentKnobs:
        """Knobs for ``"namespace/name"``."""
        return self.overrides.get(key, self.defaults)

    def all_knobs(self) -> list[DeploymentKnobs]:
        return [self.defaults, *self.overrides.values()]

    def describe(self) -> list[tuple[str, DeploymentKnobs]]:
        """``(which deployments, knobs)`` for each set, for the start log."""
        return [("every deployment", self.defaults)] + [
            (f"deployment {key}", knobs) for key, knobs in self.overrides.items()
        ]


def _merge(base: DeploymentKnobs, table: Any, path: Path, section: str) -> DeploymentKnobs:
    if not isinstance(table, dict):
        raise KnobsFileError(f"{path}: {section} must be a table")
    try:
        return knob_model.from_names(table, base=base)
    except ValidationError as exc:
        item = exc.errors()[0]
        field_name = ".".join(str(part) for part in item["loc"]) or "?"
        raise KnobsFileError(f"{path}: {section} field '{field_name}': {explain(item)}") from None
    except knob_model.UnknownKnobError as exc:
        known = ", ".join(DeploymentKnobs.model_fields)
        raise KnobsFileError(
            f"{path}: {section} field '{exc.key}': unknown (known: {known})"
        ) from None


def load_knobs_file(path: str | Path, base: DeploymentKnobs) -> KnobsByDeployment:
    """Read the TOML file; every error names the file, the section and the field."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KnobsFileError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KnobsFileError(f"{path}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise KnobsFileError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(document) - {"defaults", "deployments"})
    if unknown:
        raise KnobsFileError(
            f"{path}: field '{unknown[0]}': unknown (expected [defaults] and [deployments])"
        )
    defaults = _merge(base, document.get("defaults", {}), path, "[defaults]")
    deployments = document.get("deployments", {})
    if not isinstance(deployments, dict):
        raise KnobsFileError(f"{path}: field 'deployments': must be a table")
    overrides: dict[str, DeploymentKnobs] = {}
    label = re.compile(DNS_LABEL)
    for key, table in deployments.items():
        section = f'[deployments."{key}"]'
        parts = key.split("/")
        if len(parts) != 2 or not all(label.match(part) for part in parts):
            raise KnobsFileError(
                f'{path}: {section}: the key must be "namespace/name" (DNS labels)'
            )
        overrides[key] = _merge(defaults, table, path, section)
    return KnobsByDeployment(defaults, overrides, str(path))


class DeciderSettings(ServiceSettings, DeploymentKnobs):
    """The decider: where the bus is, and how deployments are sized."""

    http_port: int = http_port_field(DEFAULT_HTTP_PORTS["decider"])
    deployment_config_file: str | None = Field(
        default=None,
        description='TOML file with [defaults] and [deployments."namespace/name"] knob overrides',
    )

    restore_from_stream: bool = Field(
        default=True,
        description="on start, replay the inputs each deployment's decisions still depend on "
        "(its stabilisation window, correction half-lives, fast-path window, startup time: "
        "docs/decider.md, Restart) from the stream through the policy, publishing nothing, so "
        "that a restarted decider decides as one that never stopped",
    )
    restore_max_age_s: DurationS = Field(
        default=3600.0,
        description="the replay on start reads inputs at most this old, whatever the knobs ask "
        "for, seconds (1 h): a bound on the start's time and memory",
    )
    idle_forget_s: DurationS = Field(
        default=6 * 3600.0,
        description="forget a deployment (its policy memory) once its newest input is this far "
        "behind the newest one of any deployment, seconds of window time (6 h), as the "
        "forecaster's setting of that name; 0 never forgets. One that comes back starts afresh",
    )
    replica_count: int = Field(
        default=1, ge=1, le=1024,
        description="decider replicas that share the deployments, each deployment decided by "
        "exactly one (rendezvous hashing of namespace/name, as the forecaster's and the "
        "actuator's replicas); every replica must be given the same count",
    )
    replica_index: ReplicaIndex = Field(
        default=0, le=1023,
        description="this replica's index, 0 to replica_count - 1 (a StatefulSet pod name such "
        "as slaplanner-decider-2 is read as its ordinal)",
    )

    @model_validator(mode="after")
    def _config_file_readable(self) -> Self:
        # Read once here so that a bad file is refused with the other settings, at start.
        self.deployment_config()
        if self.replica_index >= self.replica_count:
            raise ValueError(f"replica_index {self.replica_index} is not below replica_count "
                             f"{self.replica_count}")
        return self

    def durable_name(self) -> str:
        """This replica's durable consumer: one per index, so a restarted replica resumes where
        it stopped; a single decider keeps the historic name."""
        return "decider" if self.replica_count == 1 else f"decider-{self.replica_index}"

    def deployment_config(self) -> KnobsByDeployment:
        base = self.knobs()
        if self.deployment_config_file is None:
            return KnobsByDeployment(base)
        try:
            return load_knobs_file(self.deployment_config_file, base)
        except KnobsFileError as exc:
            raise ValueError(str(exc)) from None
