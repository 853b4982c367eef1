"""A watch cache of the objects the actuator reads: list once, then watch (an informer).

One ``Reflector`` per kind, namespace and label selector lists the objects, then watches from the
list's ``resourceVersion`` with bookmarks (the official client's ``watch.Watch``), in a thread of
its own. A watch that ends (its server-side timeout, a dropped connection) resumes from the last
version seen; one answered 410 Gone (the version was compacted away) lists again. Reads are then
dictionary look-ups: in steady state a target costs no API read.

Writes are the caller's: it hands the object a write returned to ``Reflector.observe`` so the
cache never shows an older state than the actuator's own write (a watch event of an earlier
version that arrives later is ignored; resourceVersions are compared as the decimal numbers
etcd-backed API servers give, and taken as they come when they are not numbers).

``Health`` says whether the API server answers, for ``/readyz``, and logs one line per change of
that state instead of one per failed attempt.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import watch
from kubernetes.client.exceptions import ApiException

from services.actuator.config import KindInfo
from services.actuator.core import BackendError

log = logging.getLogger("slaplanner.actuator.informer")
JSON = dict[str, Any]
GONE = 410


class Health:
    """Whether the Kubernetes API answered last time it was asked; one log line per change.

    An answer to a request sent before the last failure says nothing new (requests in flight
    when the server went away may still be answered): only a request started after the failure
    brings the state back to reachable. ``started`` is ``time.monotonic()`` when the request (or
    the watch connection) began.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reachable = True
        self.last_error: str | None = None
        self._failed_at = float("-inf")

    def ok(self, started: float) -> None:
        with self._lock:
            if started < self._failed_at:
                return
            changed, self.reachable, self.last_error = not self.reachable, True, None
        if changed:
            log.warning("the Kubernetes API answers again")

    def failed(self, error: str) -> None:
        with self._lock:
            changed, self.reachable, self.last_error = self.reachable, False, error
            self._failed_at = time.monotonic()
        if changed:
            log.warning("the Kubernetes API does not answer (%s); retrying with backoff, and "
                        "/readyz fails until it answers", error)


def newer(candidate: str | None, current: str | None) -> bool:
    """Whether ``candidate`` is a later resourceVersion than ``current`` (or cannot be told)."""
    if current is None or candidate is None:
        return True
    try:
        return int(candidate) >= int(current)
    except ValueError:
        return True


def _version(obj: JSON) -> str | None:
    meta = obj.get("metadata") or {}
    value = meta.get("resourceVersion")
    return str(value) if value is not None else None


@dataclass(frozen=True)
class Source:
    """What one reflector watches."""

    kind: KindInfo
    namespace: str
    selector: str = ""

    def __str__(self) -> str:
        where = f"{self.kind.plural} in namespace {self.namespace}"
        return where + (f" ({self.selector})" if self.selector else "")


class Reflector:
    """The objects of one ``Source`` by name, kept current by a watch in a thread of its own."""

    def __init__(self, source: Source, lister: Callable[..., Any], health: Health,
                 watch_timeout_s: int = 300, request_timeout_s: float = 10.0,
                 backoff_max_s: float = 30.0) -> None:
        self.source = source
        self.lister = lister
        self.health = health
        self.watch_timeout_s = watch_timeout_s
        self.request_timeout_s = request_timeout_s
        self.backoff_max_s = backoff_max_s
        self.objects: dict[str, JSON] = {}
        self.resource_version: str | None = None
        self.synced = threading.Event()
        self.error: BackendError | None = None  # why the last list failed, if it did
        self.not_served = False  # the API does not serve the kind (its CRD is not installed)
        self.lists = 0
        self.watches = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self._thread = threading.Thread(target=self._run, name=f"watch {source}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        current = self._watch
        if current is not None:
            current.stop()

    def get(self, name: str) -> JSON | None:
        with self._lock:
            return self.objects.get(name)

    def items(self) -> list[JSON]:
        with self._lock:
            return list(self.objects.values())

    def observe(self, obj: JSON) -> None:
        """An object the actuator itself wrote (or read), as the API server returned it."""
        name = (obj.get("metadata") or {}).get("name")
        if not name:
            return
        with self._lock:
            known = self.objects.get(name)
            if known is None or newer(_version(obj), _version(known)):
                self.objects[name] = obj

    async def wait_synced(self, timeout_s: float) -> None:
        """Wait for the first list; BackendError if it failed or did not come in time."""
        if not self.synced.is_set():
            await asyncio.to_thread(self.synced.wait, timeout_s)
        if self.error is not None and not self.synced.is_set():
            raise self.error
        if not self.synced.is_set():
            raise BackendError(f"the watch cache of {self.source} is not filled after "
                               f"{timeout_s:g} s")

    # -- the thread

    def _call(self, **kwargs: Any) -> Any:
        return self.lister(self.source.kind, self.source.namespace, self.source.selector,
                           **kwargs)

    def _list(self) -> None:
        response = self._call(_preload_content=False,
                              _request_timeout=self.request_timeout_s)
        body = json.loads(response.data)
        found = {o["metadata"]["name"]: o for o in body.get("items") or []}
        with self._lock:
            self.objects = found
            self.resource_version = (body.get("metadata") or {}).get("resourceVersion")
        self.lists += 1
        self.error = None
        self.synced.set()

    def _apply(self, event: JSON) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        version = _version(obj)
        if kind == "BOOKMARK":
            self.resource_version = version or self.resource_version
            return
        name = (obj.get("metadata") or {}).get("name")
        with self._lock:
            if kind in ("ADDED", "MODIFIED") and name:
                known = self.objects.get(name)
                if known is None or newer(version, _version(known)):
                    self.objects[name] = obj
            elif kind == "DELETED" and name:
                self.objects.pop(name, None)
            if version is not None:
                self.resource_version = version

    def _run(self) -> None:
        backoff = 0.0
        must_list = True
        while not self._stop.is_set():
            if backoff:
                self._stop.wait(backoff)
                if self._stop.is_set():
                    return
            started = time.monotonic()
            try:
                if must_list:
                    self._list()
                    must_list = False
                    self.health.ok(started)
                started = time.monotonic()
                self._watch = watch.Watch()
                self.watches += 1
                for event in self._watch.stream(
                        self._call, resource_version=self.resource_version,
                        allow_watch_bookmarks=True, timeout_seconds=self.watch_timeout_s,
                        # Events stay dicts: the lister has no return type to deserialize into.
                        # (deserialize=False would lose the body of ERROR events.)
                        _request_timeout=(self.request_timeout_s,
                                          self.watch_timeout_s + self.request_timeout_s)):
                    if isinstance(event, dict) and event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        raise ApiException(status=status.get("code"),
                                           reason=status.get("message"))
                    self.health.ok(started)
                    self._apply(event)
                backoff = 0.0
            except ApiException as exc:
                if exc.status == GONE:
                    log.info("%s: resourceVersion %s is gone; listing again", self.source,
                             self.resource_version)
                    must_list, backoff = True, 0.0
                    continue
                if exc.status == 404 and must_list:
                    self.not_served = True  # e.g. KEDA not installed: nothing to watch
                    with self._lock:
                        self.objects = {}
                    self.synced.set()
                    return
                if exc.status is not None and exc.status < 500 and exc.status != 429:
                    self.health.ok(started)  # it answered: reachable, but refused
                    self.error = BackendError(
                        f"cannot list and watch {self.source}: {exc.status} {exc.reason} "
                        f"(grant list and watch on {self.source.kind.plural} in the actuator's "
                        "Role)", exc.status)
                else:
                    self.health.failed(f"{exc.status} {exc.reason}")
                backoff = min(self.backoff_max_s, max(0.5, backoff * 2))
            except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                if self._stop.is_set():
                    return
                self.health.failed(f"{type(exc).__name__}: {exc}")
                if must_list:
                    self.error = BackendError(f"cannot list {self.source}: {exc}")
                backoff = min(self.backoff_max_s, max(0.5, backoff * 2))
            except Exception:  # a bug must not end the watch for good: log it, start over
                log.exception("%s: the watch failed; listing again", self.source)
                must_list = True
                backoff = min(self.backoff_max_s, max(0.5, backoff * 2))
            finally:
                self._watch = None


class Informers:
    """The reflectors, started on first use and shared by every deployment that reads them."""

    def __init__(self, lister: Callable[..., Any], health: Health, sync_timeout_s: float = 30.0,
                 watch_timeout_s: int = 300, request_timeout_s: float = 10.0) -> None:
        self.lister = lister
        self.health = health
        self.sync_timeout_s = sync_timeout_s
        self.watch_timeout_s = watch_timeout_s
        self.request_timeout_s = request_timeout_s
        self._reflectors: dict[Source, Reflector] = {}
        self._lock = threading.Lock()

    def reflector(self, source: Source) -> Reflector:
        with self._lock:
            found = self._reflectors.get(source)
            if found is None:
                found = Reflector(source, self.lister, self.health, self.watch_timeout_s,
                                  self.request_timeout_s)
                self._reflectors[source] = found
            return found

    async def synced(self, source: Source) -> Reflector:
        reflector = self.reflector(source)
        await reflector.wait_synced(self.sync_timeout_s)
        return reflector

    def all(self) -> list[Reflector]:
        with self._lock:
            return list(self._reflectors.values())

    def stop(self) -> None:
        for reflector in self.all():
            reflector.stop()

