"""The performance model: profiling data of one prefill engine and one decode engine, and its
interpolation.

A profile is measured once per model x GPU x parallelism, before deployment, and read at every
planning step. Two on-disk forms are accepted (see ``docs/profile-format.md``):

- the directory that Dynamo's pre-deployment profiler writes
  (``selected_prefill_interpolation/raw_data.npz`` and
  ``selected_decode_interpolation/raw_data.npz``, latencies in milliseconds there), optionally
  with our ``metadata.json`` beside them;
- our own JSON file (SI units, units in the field names, provenance fields).

Everything here is in SI units: latencies in seconds, throughput in tokens per second per GPU.
Milliseconds exist only while reading or writing Dynamo's files.

The interpolation reproduces the SLA planner of NVIDIA Dynamo
(``components/planner/src/dynamo/planner/utils/perf_interpolation.py``, ai-dynamo/dynamo,
Apache-2.0): a cubic 1-D spline over the profiled input lengths for prefill, the input length
clamped to the profiled range; a cubic scattered-data interpolation (Clough-Tocher, scipy's
``griddata``) of the decode points onto a 100 x 100 grid over KV usage ``linspace(0, 1)`` and
context ``linspace(0, max profiled context)``, holes outside the convex hull filled from the
nearest profiled point, and look-ups by the nearest grid index. The code is ours; the formulas
are Dynamo's.

This module reads files and computes; it does no other I/O.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import interpolate
from scipy.spatial import QhullError

FloatArray = npt.NDArray[np.float64]

PROFILE_FORMAT = "slaplanner-profile"
PROFILE_FORMAT_VERSION = 1
PREFILL_NPZ = Path("selected_prefill_interpolation") / "raw_data.npz"
DECODE_NPZ = Path("selected_decode_interpolation") / "raw_data.npz"
METADATA_JSON = "metadata.json"
DECODE_GRID_RESOLUTION = 100  # Dynamo's DecodeInterpolator default
_MS_PER_S = 1000.0
# interp1d(kind="cubic") needs at least four points.
_MIN_PREFILL_POINTS = 4
# A 2-D Delaunay triangulation (under griddata's cubic method) needs four points, not all on
# one line.
_MIN_DECODE_POINTS = 4

BUNDLED_PROFILE = Path(__file__).resolve().parent / "profiles" / "h200_llama31_8b_fp8_tp1"


def default_profile_path() -> Path:
    """The real H200 / Llama-3.1-8B-FP8 profile that ships with the project."""
    return BUNDLED_PROFILE


class ProfileError(ValueError):
    """A profile that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class _Where:
    """Where data came from, so that every error names the file and the field."""

    file: str
    prefix: str = ""  # "prefill." in our JSON, "" for a Dynamo npz

    def error(self, field_name: str, problem: str) -> ProfileError:
        return ProfileError(f"{self.file}: field '{self.prefix}{field_name}': {problem}")


@dataclass(frozen=True)
class Provenance:
    """Where a profile's numbers come from. ``None`` means the source did not say."""

    model: str | None = None
    gpu: str | None = None
    engine: str | None = None
    parallelism: str | None = None
    source: str | None = None
    licence: str | None = None
    synthetic: bool | None = None
    notes: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "gpu": self.gpu,
            "engine": self.engine,
            "parallelism": self.parallelism,
            "source": self.source,
            "licence": self.licence,
            "synthetic": self.synthetic,
            "notes": self.notes,
        }


@dataclass(frozen=True, eq=False)
class PrefillPoints:
    """Measured prefill points, one per input length (ISL strictly increasing)."""

    isl_tokens: FloatArray
    ttft_s: FloatArray
    thpt_tokens_per_s_per_gpu: FloatArray
    where: _Where = field(default_factory=lambda: _Where("<memory>", "prefill."))
    # The profiler's milliseconds exactly as read (Dynamo form only), so that writing the
    # profile back gives the same bytes of data; nothing computes with them.
    ttft_ms_as_read: FloatArray | None = None

    def ttft_ms(self) -> FloatArray:
        return self.ttft_ms_as_read if self.ttft_ms_as_read is not None else self.ttft_s * _MS_PER_S


@dataclass(frozen=True, eq=False)
class DecodePoints:
    """Measured decode points, scattered over (KV-cache usage, context length)."""

    kv_usage_fraction: FloatArray
    context_tokens: FloatArray
    itl_s: FloatArray
    thpt_tokens_per_s_per_gpu: FloatArray
    max_kv_tokens: int
    where: _Where = field(default_factory=lambda: _Where("<memory>", "decode."))
    # the names of the (x, y) fields in the file, for errors about the point cloud
    coordinate_fields: str = "kv_usage_fraction/context_tokens"
    # The profiler's milliseconds exactly as read (Dynamo form only): Dynamo interpolates these,
    # and ms -> s -> ms is not exact in floating point.
    itl_ms_as_read: FloatArray | None = None

    def itl_ms(self) -> FloatArray:
        return self.itl_ms_as_read if self.itl_ms_as_read is not None else self.itl_s * _MS_PER_S


@dataclass(frozen=True, eq=False)
class ProfileData:
    """A validated profile as numbers, before interpolation."""

    prefill: PrefillPoints
    decode: DecodePoints
    provenance: Provenance
    max_context_tokens: int | None
    origin: str


class IslClamp(StrEnum):
    """Whether a prefill look-up had to clamp its input length to the profiled range."""

    WITHIN_RANGE = "within_range"
    BELOW_RANGE = "below_range"
    ABOVE_RANGE = "above_range"


@dataclass(frozen=True)
class PrefillEstimate:
    """One prefill look-up: the ISL asked for, the ISL used, and the profiled numbers there."""

    isl_tokens: float
    isl_used_tokens: float
    clamp: IslClamp
    ttft_s: float
    thpt_tokens_per_s_per_gpu: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "isl_tokens": self.isl_tokens,
            "isl_used_tokens": self.isl_used_tokens,
            "isl_clamp": str(self.clamp),
            "ttft_s": self.ttft_s,
            "thpt_tokens_per_s_per_gpu": self.thpt_tokens_per_s_per_gpu,
        }


@dataclass(frozen=True)
class DecodeOperatingPoint:
    """A point of the decode grid: where a look-up landed and what the profile says there."""

    context_tokens: float
    grid_context_tokens: float
    grid_kv_usage_fraction: float
    itl_s: float
    thpt_tokens_per_s_per_gpu: float
    meets_itl_target: bool | None = None  # only for the inverse query
    context_clamped: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "context_tokens": self.context_tokens,
            "grid_context_tokens": self.grid_context_tokens,
            "grid_kv_usage_fraction": self.grid_kv_usage_fraction,
            "itl_s": self.itl_s,
            "thpt_tokens_per_s_per_gpu": self.thpt_tokens_per_s_per_gpu,
            "meets_itl_target": self.meets_itl_target,
            "context_clamped": self.context_clamped,
        }


_PREFILL_CACHE_SIZE = 4096


class PrefillModel:
    """TTFT and throughput per GPU against ISL: Dynamo's cubic 1-D interpolation."""

    def __init__(self, points: PrefillPoints) -> None:
        self.points = points
        self.min_isl_tokens = float(points.isl_tokens[0])
        self.max_isl_tokens = float(points.isl_tokens[-1])
        self._ttft = interpolate.interp1d(points.isl_tokens, points.ttft_s, kind="cubic")
        self._thpt = interpolate.interp1d(
            points.isl_tokens, points.thpt_tokens_per_s_per_gpu, kind="cubic"
        )
        # A planner asks for the same few ISLs many times per decision; an interp1d call costs
        # tens of microseconds, a dict hit well under one, with the very same floats.
        self._cache: dict[float, tuple[float, float]] = {}

    def _at(self, isl_tokens: float) -> tuple[float, float]:
        hit = self._cache.get(isl_tokens)
        if hit is None:
            if len(self._cache) >= _PREFILL_CACHE_SIZE:
                self._cache.clear()
            hit = float(self._ttft(isl_tokens)), float(self._thpt(isl_tokens))
            self._cache[isl_tokens] = hit
        return hit

    def clamp_isl(self, isl_tokens: float) -> tuple[float, IslClamp]:
        """Outside the profiled range a cubic spline extrapolates wildly; Dynamo clamps."""
        if isl_tokens < self.min_isl_tokens:
            return self.min_isl_tokens, IslClamp.BELOW_RANGE
        if isl_tokens > self.max_isl_tokens:
            return self.max_isl_tokens, IslClamp.ABOVE_RANGE
        return float(isl_tokens), IslClamp.WITHIN_RANGE

    def estimate(self, isl_tokens: float) -> PrefillEstimate:
        used, clamp = self.clamp_isl(isl_tokens)
        ttft_s, thpt = self._at(used)
        return PrefillEstimate(
            isl_tokens=float(isl_tokens),
            isl_used_tokens=used,
            clamp=clamp,
            ttft_s=ttft_s,
            thpt_tokens_per_s_per_gpu=thpt,
        )

    def ttft_s(self, isl_tokens: float) -> float:
        return self.estimate(isl_tokens).ttft_s

    def ttft_s_many(self, isl_tokens: FloatArray) -> FloatArray:
        """``ttft_s`` of many lengths at once: the same spline, the lengths clamped the same way."""
        clamped = np.clip(isl_tokens, self.min_isl_tokens, self.max_isl_tokens)
        return np.asarray(self._ttft(clamped), dtype=np.float64)

    def thpt_per_gpu(self, isl_tokens: float) -> float:
        return self.estimate(isl_tokens).thpt_tokens_per_s_per_gpu

    def thpt_per_gpu_many(self, isl_tokens: FloatArray) -> FloatArray:
        """``thpt_per_gpu`` of many lengths at once, clamped as ``ttft_s_many``."""
        clamped = np.clip(isl_tokens, self.min_isl_tokens, self.max_isl_tokens)
        return np.asarray(self._thpt(clamped), dtype=np.float64)


def _scattered_onto_grid(
    x: FloatArray, y: FloatArray, z: FloatArray, grid: tuple[FloatArray, FloatArray]
) -> tuple[FloatArray, npt.NDArray[np.int64]]:
    """Cubic scattered interpolation, holes (outside the hull) from the nearest point.

    ``z`` may stack several series as columns: each column is interpolated exactly as on its
    own (same triangulation, gradients estimated per column), in one pass over the grid.
    Returns the grids (``grid shape + z.shape[1:]``) and the number of holes per column.
    """
    cubic: FloatArray = interpolate.griddata((x, y), z, grid, method="cubic")
    holes = np.isnan(cubic)
    if holes.any():
        nearest: FloatArray = interpolate.griddata((x, y), z, grid, method="nearest")
        cubic[holes] = nearest[holes]
    return cubic, holes.sum(axis=(0, 1)).astype(np.int64)


class DecodeModel:
    """ITL and throughput per GPU over (KV usage, context): Dynamo's 100 x 100 grid.

    The grid is indexed ``[context_row, kv_column]``. KV usage relates to concurrency (requests
    in flight on one engine) by ``usage = concurrency * context / max_kv_tokens``.
    """

    def __init__(self, points: DecodePoints, resolution: int = DECODE_GRID_RESOLUTION) -> None:
        self.points = points
        self.resolution = resolution
        self.max_kv_tokens = points.max_kv_tokens
        self.kv_axis: FloatArray = np.linspace(0.0, 1.0, resolution)
        self.context_axis: FloatArray = np.linspace(
            0.0, float(np.max(points.context_tokens)), resolution
        )
        grid = np.meshgrid(self.kv_axis, self.context_axis)
        try:
            # Interpolate milliseconds, as Dynamo does, then convert: the Clough-Tocher gradient
            # iteration stops at a tolerance that is not scale-free, so interpolating seconds
            # gives values ~1e-6 (relative) away from Dynamo's, enough to flip an ITL comparison.
            grids, holes = _scattered_onto_grid(
                points.kv_usage_fraction,
                points.context_tokens,
                np.column_stack([points.itl_ms(), points.thpt_tokens_per_s_per_gpu]),
                (grid[0], grid[1]),
            )
        except (QhullError, ValueError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise points.where.error(
                points.coordinate_fields,
                f"decode points too sparse for cubic scattered interpolation ({first_line})",
            ) from None
        self.itl_grid_s: FloatArray = grids[..., 0] / _MS_PER_S
        self._lookup_cache: tuple[float, float, list[list[float]]] | None = None
        self.thpt_grid: FloatArray = np.ascontiguousarray(grids[..., 1])
        self.itl_holes_filled, self.thpt_holes_filled = int(holes[0]), int(holes[1])

    def kv_usage(self, concurrency: float, context_tokens: float) -> float:
        return concurrency * context_tokens / self.max_kv_tokens

    def _nearest(self, axis: FloatArray, value: float) -> int:
        # Dynamo: round((v - axis[0]) / step), clipped to the grid (numpy rounds half to even).
        step = axis[1] - axis[0]
        return int(np.clip(np.round((value - axis[0]) / step), 0, self.resolution - 1))

    def context_row(self, context_tokens: float) -> int:
        return self._nearest(self.context_axis, context_tokens)

    def grid_index(self, concurrency: float, context_tokens: float) -> tuple[int, int]:
        """``(kv_column, context_row)`` of the nearest grid point, as Dynamo's compute_idx."""
        kv_column = self._nearest(self.kv_axis, self.kv_usage(concurrency, context_tokens))
        return kv_column, self.context_row(context_tokens)

    def _point(
        self, kv_column: int, row: int, context_tokens: float, meets: bool | None = None
    ) -> DecodeOperatingPoint:
        return DecodeOperatingPoint(
            context_tokens=float(context_tokens),
            grid_context_tokens=float(self.context_axis[row]),
            grid_kv_usage_fraction=float(self.kv_axis[kv_column]),
            itl_s=float(self.itl_grid_s[row, kv_column]),
            thpt_tokens_per_s_per_gpu=float(self.thpt_grid[row, kv_column]),
            meets_itl_target=meets,
            context_clamped=bool(context_tokens > self.context_axis[-1] or context_tokens < 0),
        )

    def at(self, concurrency: float, context_tokens: float) -> DecodeOperatingPoint:
        """The grid point nearest to this concurrency (per engine) and context."""
        kv_column, row = self.grid_index(concurrency, context_tokens)
        return self._point(kv_column, row, context_tokens)

    def itl_s(self, concurrency: float, context_tokens: float) -> float:
        return self.at(concurrency, context_tokens).itl_s

    def itl_s_at_kv(self, kv_tokens: FloatArray, context_tokens: FloatArray) -> FloatArray:
        """ITL at the grid point nearest to each (KV tokens in use, mean context): ``at`` for
        many engines at once, with ``kv_tokens / max_kv_tokens`` as the KV usage."""
        last, (kv_step, context_step, grid) = self.resolution - 1, self._steps_and_rows()
        if kv_tokens.size <= 16:
            # A few engines: plain floats are faster than a dozen numpy calls, and round() is
            # numpy's rint (half to even), on the same operations in the same order.
            max_kv = float(self.max_kv_tokens)
            return np.asarray([
                grid[min(round(c / context_step), last)][min(round(k / max_kv / kv_step), last)]
                for k, c in zip(kv_tokens.tolist(), context_tokens.tolist(), strict=True)
            ])
        column = np.rint(kv_tokens / float(self.max_kv_tokens) / kv_step)
        np.minimum(column, last, out=column)
        row = np.rint(context_tokens / context_step)
        np.minimum(row, last, out=row)
        return self.itl_grid_s[row.astype(np.intp), column.astype(np.intp)]

    def _steps_and_rows(self) -> tuple[float, float, list[list[float]]]:
        """The grid's steps and its rows as lists, made once (the simulator asks per slice)."""
        if self._lookup_cache is None:
            self._lookup_cache = (
                float(self.kv_axis[1] - self.kv_axis[0]),
                float(self.context_axis[1] - self.context_axis[0]),
                self.itl_grid_s.tolist(),
            )
        return self._lookup_cache

    def thpt_per_gpu(self, concurrency: float, context_tokens: float) -> float:
        return self.at(concurrency, context_tokens).thpt_tokens_per_s_per_gpu

    def best_thpt_per_gpu(self, itl_target_s: float, context_tokens: float) -> DecodeOperatingPoint:
        """Dynamo's inverse query: the most loaded point of the context's row meeting the ITL.

        The row is scanned from the highest KV usage down (the interpolated ITL need not be
        monotonic, so no bisection); if no point meets the target, the lowest point is returned
        with ``meets_itl_target=False``.
        """
        row = self.context_row(context_tokens)
        itl_row = self.itl_grid_s[row]
        for kv_column in range(self.resolution - 1, -1, -1):
            if itl_row[kv_column] <= itl_target_s:
                return self._point(kv_column, row, context_tokens, meets=True)
        return self._point(0, row, context_tokens, meets=False)


class Profile:
    """A validated profile with its interpolation, ready for look-ups."""

    def __init__(self, data: ProfileData) -> None:
        self.data = data
        self.provenance = data.provenance
        self.max_context_tokens = data.max_context_tokens
        self.origin = data.origin
        self.prefill = PrefillModel(data.prefill)
        self.decode = DecodeModel(data.decode)

    def summary(self) -> dict[str, Any]:
        """Numbers an operator checks first; JSON-serialisable."""
        pre, dec = self.data.prefill, self.data.decode
        return {
            "origin": self.origin,
            "provenance": self.provenance.as_dict(),
            "max_context_tokens": self.max_context_tokens,
            "prefill": {
                "points": int(pre.isl_tokens.size),
                "isl_tokens_range": [self.prefill.min_isl_tokens, self.prefill.max_isl_tokens],
                "ttft_s_range": [float(pre.ttft_s.min()), float(pre.ttft_s.max())],
                "thpt_tokens_per_s_per_gpu_range": [
                    float(pre.thpt_tokens_per_s_per_gpu.min()),
                    float(pre.thpt_tokens_per_s_per_gpu.max()),
                ],
            },
            "decode": {
                "points": int(dec.itl_s.size),
                "context_tokens_profiled": sorted({float(c) for c in dec.context_tokens}),
                "kv_usage_fraction_range": [
                    float(dec.kv_usage_fraction.min()),
                    float(dec.kv_usage_fraction.max()),
                ],
                "itl_s_range": [float(dec.itl_s.min()), float(dec.itl_s.max())],
                "thpt_tokens_per_s_per_gpu_range": [
                    float(dec.thpt_tokens_per_s_per_gpu.min()),
                    float(dec.thpt_tokens_per_s_per_gpu.max()),
                ],
                "max_kv_tokens": dec.max_kv_tokens,
                "grid": f"{self.decode.resolution} x {self.decode.resolution}",
                "grid_points_filled_from_nearest": {
                    "itl": self.decode.itl_holes_filled,
                    "thpt": self.decode.thpt_holes_filled,
                },
            },
        }


# ---------------------------------------------------------------------------------------------
# Validation


def _numeric_array(raw: Any, where: _Where, name: str) -> FloatArray:
    if isinstance(raw, (str, bytes, Mapping)) or raw is None:
        raise where.error(name, f"expected a list of numbers, got {type(raw).__name__}")
    if isinstance(raw, list) and any(
        isinstance(v, bool) or not isinstance(v, (int, float)) for v in raw
    ):
        bad = next(v for v in raw if isinstance(v, bool) or not isinstance(v, (int, float)))
        raise where.error(name, f"expected numbers, found {bad!r}")
    try:
        array = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise where.error(name, f"not numeric ({exc})") from None
    if array.ndim != 1:
        raise where.error(name, f"expected a 1-D array, got shape {array.shape}")
    if array.size == 0:
        raise where.error(name, "is empty")
    nan_at = np.flatnonzero(np.isnan(array))
    if nan_at.size:
        raise where.error(name, f"contains NaN at index {int(nan_at[0])}")
    inf_at = np.flatnonzero(~np.isfinite(array))
    if inf_at.size:
        raise where.error(name, f"contains an infinite value at index {int(inf_at[0])}")
    return array


def _positive(array: FloatArray, where: _Where, name: str) -> FloatArray:
    bad = np.flatnonzero(array <= 0)
    if bad.size:
        i = int(bad[0])
        raise where.error(name, f"non-positive value {float(array[i])!r} at index {i}")
    return array


def _same_length(arrays: Mapping[str, FloatArray], where: _Where) -> None:
    lengths = {name: int(a.size) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        first = next(iter(lengths))
        for name, n in lengths.items():
            if n != lengths[first]:
                raise where.error(
                    name, f"has {n} values but '{where.prefix}{first}' has {lengths[first]}"
                )


def _positive_int(raw: Any, where: _Where, name: str) -> int:
    value = raw
    if isinstance(raw, np.ndarray):
        if raw.size != 1:
            raise where.error(name, f"expected one value, got shape {raw.shape}")
        value = raw.reshape(-1)[0].item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise where.error(name, f"expected a positive integer, got {value!r}")
    if not math.isfinite(value) or value <= 0 or float(value) != int(value):
        raise where.error(name, f"expected a positive integer, got {value!r}")
    return int(value)


def validate_prefill(
    isl: Any, ttft_s: Any, thpt: Any, where: _Where, names: tuple[str, str, str]
) -> PrefillPoints:
    """Check one prefill table; ``names`` are the field names as they appear in the file."""
    arrays = {
        names[0]: _positive(_numeric_array(isl, where, names[0]), where, names[0]),
        names[1]: _positive(_numeric_array(ttft_s, where, names[1]), where, names[1]),
        names[2]: _positive(_numeric_array(thpt, where, names[2]), where, names[2]),
    }
    _same_length(arrays, where)
    isl_arr = arrays[names[0]]
    steps = np.diff(isl_arr)
    if np.any(steps <= 0):
        i = int(np.flatnonzero(steps <= 0)[0])
        raise where.error(
            names[0],
            f"not strictly increasing: {float(isl_arr[i])!r} at index {i} "
            f"then {float(isl_arr[i + 1])!r}",
        )
    if isl_arr.size < _MIN_PREFILL_POINTS:
        raise where.error(
            names[0],
            f"{isl_arr.size} points; cubic interpolation needs at least {_MIN_PREFILL_POINTS}",
        )
    return PrefillPoints(isl_arr, arrays[names[1]], arrays[names[2]], where)


def validate_decode(
    kv: Any,
    context: Any,
    itl_s: Any,
    thpt: Any,
    max_kv_tokens: Any,
    where: _Where,
    names: tuple[str, str, str, str, str],
) -> DecodePoints:
    kv_arr = _numeric_array(kv, where, names[0])
    bad = np.flatnonzero((kv_arr < 0) | (kv_arr > 1))
    if bad.size:
        i = int(bad[0])
        raise where.error(names[0], f"value {float(kv_arr[i])!r} at index {i} is outside 0..1")
    arrays = {
        names[0]: kv_arr,
        names[1]: _positive(_numeric_array(context, where, names[1]), where, names[1]),
        names[2]: _positive(_numeric_array(itl_s, where, names[2]), where, names[2]),
        names[3]: _positive(_numeric_array(thpt, where, names[3]), where, names[3]),
    }
    _same_length(arrays, where)
    capacity = _positive_int(max_kv_tokens, where, names[4])
    n = kv_arr.size
    contexts = np.unique(arrays[names[1]])
    loads = np.unique(kv_arr)
    if n < _MIN_DECODE_POINTS or contexts.size < 2 or loads.size < 2:
        raise where.error(
            f"{names[0]}/{names[1]}",
            f"decode points too sparse for cubic scattered interpolation: {n} points, "
            f"{contexts.size} distinct context lengths, {loads.size} distinct KV usages "
            f"(need at least {_MIN_DECODE_POINTS} points over 2 or more of each)",
        )
    return DecodePoints(
        kv_arr,
        arrays[names[1]],
        arrays[names[2]],
        arrays[names[3]],
        capacity,
        where,
        coordinate_fields=f"{names[0]}/{names[1]}",
    )


def _check_max_context(data: ProfileData, where: _Where, name: str) -> None:
    limit = data.max_context_tokens
    if limit is None:
        return
    longest = max(float(data.prefill.isl_tokens[-1]), float(np.max(data.decode.context_tokens)))
    if longest > limit:
        raise where.error(
            name, f"{limit} is shorter than the longest profiled sequence ({longest:g} tokens)"
        )


def _provenance(raw: Any, where: _Where) -> Provenance:
    if raw is None:
        return Provenance()
    if not isinstance(raw, Mapping):
        raise where.error("provenance", f"expected an object, got {type(raw).__name__}")
    known = set(Provenance.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise where.error(f"provenance.{unknown[0]}", f"unknown field (known: {sorted(known)})")
    values: dict[str, Any] = {}
    for key in known:
        value = raw.get(key)
        if key == "synthetic":
            if value is not None and not isinstance(value, bool):
                raise where.error("provenance.synthetic", f"expected true or false, got {value!r}")
        elif value is not None and not isinstance(value, str):
            raise where.error(f"provenance.{key}", f"expected text, got {value!r}")
        values[key] = value
    return Provenance(**values)


# ---------------------------------------------------------------------------------------------
# Reading


def _read_npz(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ProfileError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ProfileError(f"{path}: not a readable .npz file ({exc})") from None


def _require(table: Mapping[str, Any], where: _Where, name: str) -> Any:
    if name not in table:
        present = ", ".join(sorted(str(k) for k in table)) or "none"
        raise where.error(name, f"missing (fields present: {present})")
    return table[name]


def _read_metadata(directory: Path) -> tuple[Provenance, int | None]:
    path = directory / METADATA_JSON
    if not path.is_file():
        return Provenance(source=str(directory)), None
    where = _Where(str(path))
    raw = _read_json(path)
    unknown = sorted(set(raw) - {"provenance", "max_context_tokens"})
    if unknown:
        raise where.error(unknown[0], "unknown field (known: max_context_tokens, provenance)")
    limit = raw.get("max_context_tokens")
    return (
        _provenance(raw.get("provenance"), where),
        None if limit is None else _positive_int(limit, where, "max_context_tokens"),
    )


def _read_dynamo_dir(directory: Path) -> ProfileData:
    prefill_path, decode_path = directory / PREFILL_NPZ, directory / DECODE_NPZ
    pre_where, dec_where = _Where(str(prefill_path)), _Where(str(decode_path))
    pre, dec = _read_npz(prefill_path), _read_npz(decode_path)
    # Dynamo's profiler writes TTFT and ITL in milliseconds; convert once, here.
    prefill = validate_prefill(
        _require(pre, pre_where, "prefill_isl"),
        _require(pre, pre_where, "prefill_ttft"),
        _require(pre, pre_where, "prefill_thpt_per_gpu"),
        pre_where,
        ("prefill_isl", "prefill_ttft", "prefill_thpt_per_gpu"),
    )
    prefill = replace(prefill, ttft_s=prefill.ttft_s / _MS_PER_S, ttft_ms_as_read=prefill.ttft_s)
    decode = validate_decode(
        _require(dec, dec_where, "x_kv_usage"),
        _require(dec, dec_where, "y_context_length"),
        _require(dec, dec_where, "z_itl"),
        _require(dec, dec_where, "z_thpt_per_gpu"),
        _require(dec, dec_where, "max_kv_tokens"),
        dec_where,
        ("x_kv_usage", "y_context_length", "z_itl", "z_thpt_per_gpu", "max_kv_tokens"),
    )
    decode = replace(decode, itl_s=decode.itl_s / _MS_PER_S, itl_ms_as_read=decode.itl_s)
    provenance, max_context = _read_metadata(directory)
    data = ProfileData(prefill, decode, provenance, max_context, str(directory))
    _check_max_context(data, _Where(str(directory / METADATA_JSON)), "max_context_tokens")
    return data


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ProfileError(f"{path}: file not found")
    try:
        # The standard parser accepts NaN, so a NaN is reported with its field, not as bad JSON.
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def _read_json_profile(path: Path) -> ProfileData:
    raw = _read_json(path)
    top = _Where(str(path))
    fmt = _require(raw, top, "format")
    if fmt != PROFILE_FORMAT:
        raise top.error("format", f"expected {PROFILE_FORMAT!r}, got {fmt!r}")
    version = _require(raw, top, "format_version")
    if version != PROFILE_FORMAT_VERSION:
        raise top.error(
            "format_version",
            f"unknown version {version!r}; this build reads {PROFILE_FORMAT_VERSION}",
        )
    known = {"format", "format_version", "provenance", "max_context_tokens", "prefill", "decode"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise top.error(unknown[0], f"unknown field (known: {sorted(known)})")
    provenance = _provenance(_require(raw, top, "provenance"), top)
    for required in ("model", "gpu", "source", "synthetic"):
        if getattr(provenance, required) is None:
            raise top.error(
                f"provenance.{required}", "missing (every profile says where it comes from)"
            )
    max_context = _positive_int(_require(raw, top, "max_context_tokens"), top, "max_context_tokens")

    pre_raw = _require(raw, top, "prefill")
    dec_raw = _require(raw, top, "decode")
    for name, table in (("prefill", pre_raw), ("decode", dec_raw)):
        if not isinstance(table, Mapping):
            raise top.error(name, f"expected an object, got {type(table).__name__}")
    pre_where, dec_where = _Where(str(path), "prefill."), _Where(str(path), "decode.")
    prefill_names = ("isl_tokens", "ttft_s", "thpt_tokens_per_s_per_gpu")
    decode_names = (
        "kv_usage_fraction",
        "context_tokens",
        "itl_s",
        "thpt_tokens_per_s_per_gpu",
        "max_kv_tokens",
    )
    for table, where, names in (
        (pre_raw, pre_where, prefill_names),
        (dec_raw, dec_where, decode_names),
    ):
        extra = sorted(set(table) - set(names))
        if extra:
            raise where.error(extra[0], f"unknown field (known: {list(names)})")
    isl, ttft, p_thpt = (_require(pre_raw, pre_where, n) for n in prefill_names)
    prefill = validate_prefill(isl, ttft, p_thpt, pre_where, prefill_names)
    kv, context, itl, d_thpt, capacity = (_require(dec_raw, dec_where, n) for n in decode_names)
    decode = validate_decode(kv, context, itl, d_thpt, capacity, dec_where, decode_names)
    data = ProfileData(prefill, decode, provenance, max_context, str(path))
    _check_max_context(data, top, "max_context_tokens")
    return data


def read_profile_data(path: str | Path) -> ProfileData:
    """Read and validate a profile (a Dynamo profiler directory or our JSON file)."""
    path = Path(path)
    if path.is_dir():
        return _read_dynamo_dir(path)
    if path.suffix.lower() == ".json":
        return _read_json_profile(path)
    if not path.exists():
        raise ProfileError(f"{path}: no such profile (expected a directory or a .json file)")
    raise ProfileError(
        f"{path}: not a profile (expected a Dynamo profiler directory or a .json file)"
    )


def load_profile(path: str | Path) -> Profile:
    """Read, validate and interpolate a profile; raises ``ProfileError`` naming file and field."""
    return Profile(read_profile_data(path))


# ---------------------------------------------------------------------------------------------
# Writing (the converter)


def _as_list(array: FloatArray, integral: bool = False) -> list[Any]:
    if integral and np.all(array == np.round(array)):
        return [int(v) for v in array]
    return [float(v) for v in array]


def profile_to_json_dict(data: ProfileData) -> dict[str, Any]:
    """Our JSON form; requires provenance and max_context_tokens, which the format demands."""
    missing = [
        name
        for name in ("model", "gpu", "source", "synthetic")
        if getattr(data.provenance, name) is None
    ]
    if missing:
        raise ProfileError(
            f"{data.origin}: field 'provenance.{missing[0]}': unknown; our JSON format requires "
            f"it (give it in {METADATA_JSON} or on the command line)"
        )
    if data.max_context_tokens is None:
        raise ProfileError(
            f"{data.origin}: field 'max_context_tokens': unknown; our JSON format requires it "
            f"(give it in {METADATA_JSON} or on the command line)"
        )
    pre, dec = data.prefill, data.decode
    return {
        "format": PROFILE_FORMAT,
        "format_version": PROFILE_FORMAT_VERSION,
        "provenance": data.provenance.as_dict(),
        "max_context_tokens": data.max_context_tokens,
        "prefill": {
            "isl_tokens": _as_list(pre.isl_tokens, integral=True),
            "ttft_s": _as_list(pre.ttft_s),
            "thpt_tokens_per_s_per_gpu": _as_list(pre.thpt_tokens_per_s_per_gpu),
        },
        "decode": {
            "kv_usage_fraction": _as_list(dec.kv_usage_fraction),
            "context_tokens": _as_list(dec.context_tokens, integral=True),
            "itl_s": _as_list(dec.itl_s),
            "thpt_tokens_per_s_per_gpu": _as_list(dec.thpt_tokens_per_s_per_gpu),
            "max_kv_tokens": dec.max_kv_tokens,
        },
    }


def write_profile_json(data: ProfileData, path: str | Path) -> None:
    text = json.dumps(profile_to_json_dict(data), indent=2, allow_nan=False)
    Path(path).write_text(text + "\n", encoding="utf-8")


def write_profile_dir(data: ProfileData, directory: str | Path) -> None:
    """Dynamo's profiler layout (milliseconds in the npz files) plus our ``metadata.json``."""
    directory = Path(directory)
    (directory / PREFILL_NPZ).parent.mkdir(parents=True, exist_ok=True)
    (directory / DECODE_NPZ).parent.mkdir(parents=True, exist_ok=True)
    pre, dec = data.prefill, data.decode
    isl = (
        pre.isl_tokens.astype(np.int64)
        if np.all(pre.isl_tokens == np.round(pre.isl_tokens))
        else pre.isl_tokens
    )
    np.savez(
        directory / PREFILL_NPZ,
        prefill_isl=isl,
        prefill_ttft=pre.ttft_ms(),
        prefill_thpt_per_gpu=pre.thpt_tokens_per_s_per_gpu,
    )
    np.savez(
        directory / DECODE_NPZ,
        x_kv_usage=dec.kv_usage_fraction,
        y_context_length=dec.context_tokens,
        z_itl=dec.itl_ms(),
        z_thpt_per_gpu=dec.thpt_tokens_per_s_per_gpu,
        max_kv_tokens=np.array([dec.max_kv_tokens], dtype=np.int64),
    )
    metadata = {
        "max_context_tokens": data.max_context_tokens,
        "provenance": data.provenance.as_dict(),
    }
    (directory / METADATA_JSON).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
