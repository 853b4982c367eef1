"""``slaplanner profile``: convert a profile between Dynamo's npz directory and our JSON, and show
a profile's summary and curves.

    slaplanner profile convert SRC DST [--model M --gpu G --source S --synthetic true ...]
    slaplanner profile show PATH [--plot out.png] [--json]

``DST`` ending in ``.json`` is written as our JSON format, anything else as a Dynamo profiler
directory (with our ``metadata.json`` beside the npz files). See ``docs/profile-format.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from shared.perf_model import (
    Profile,
    ProfileData,
    ProfileError,
    load_profile,
    profile_to_json_dict,
    read_profile_data,
    write_profile_dir,
    write_profile_json,
)

PROG = "slaplanner profile"
# ITL targets at which ``show`` reports the best decode throughput per profiled context.
SHOW_ITL_TARGETS_S = (0.010, 0.020, 0.050)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Inspect and convert profiles.")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser(
        "convert", help="Dynamo npz directory <-> slaplanner JSON (DST *.json: JSON)"
    )
    convert.add_argument("src", help="profile directory or .json file")
    convert.add_argument("dst", help="output: a .json file, or a directory")
    convert.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    convert.add_argument("--model", help="provenance: model served")
    convert.add_argument("--gpu", help="provenance: GPU type")
    convert.add_argument("--engine", help="provenance: inference engine")
    convert.add_argument("--parallelism", help="provenance: e.g. 'TP1 prefill, TP1 decode'")
    convert.add_argument("--source", help="provenance: where the numbers come from")
    convert.add_argument("--licence", help="provenance: licence of the data")
    convert.add_argument(
        "--synthetic", choices=["true", "false"], help="provenance: were the numbers made up?"
    )
    convert.add_argument("--max-context-tokens", type=int, help="the engine's maximum context")

    show = commands.add_parser("show", help="print a profile's summary; optionally plot it")
    show.add_argument("path", help="profile directory or .json file")
    show.add_argument("--plot", help="write a PNG of the prefill curves and decode grids")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def _with_overrides(data: ProfileData, args: argparse.Namespace) -> ProfileData:
    given: dict[str, Any] = {
        name: getattr(args, name)
        for name in ("model", "gpu", "engine", "parallelism", "source", "licence")
        if getattr(args, name) is not None
    }
    if args.synthetic is not None:
        given["synthetic"] = args.synthetic == "true"
    provenance = replace(data.provenance, **given)
    max_context = data.max_context_tokens
    if args.max_context_tokens is not None:
        if args.max_context_tokens <= 0:
            raise ProfileError(f"--max-context-tokens must be positive: {args.max_context_tokens}")
        max_context = args.max_context_tokens
    return replace(data, provenance=provenance, max_context_tokens=max_context)


def convert(args: argparse.Namespace) -> int:
    data = _with_overrides(read_profile_data(args.src), args)
    dst = Path(args.dst)
    if dst.exists() and not args.force:
        print(f"{PROG}: {dst} exists (use --force to overwrite)", file=sys.stderr)
        return 2
    as_json = dst.suffix.lower() == ".json"
    if as_json:
        profile_to_json_dict(data)  # refuses missing provenance before anything is written
    Profile(data)  # the numbers must interpolate, or the written profile would be refused
    if as_json:
        write_profile_json(data, dst)
    else:
        write_profile_dir(data, dst)
    read_profile_data(dst)  # read back and validate what was written
    print(f"wrote {dst}")
    return 0


def decode_table(profile: Profile) -> list[dict[str, Any]]:
    """Best decode throughput per GPU at a few ITL targets, for each profiled context."""
    rows = []
    for context in sorted({float(c) for c in profile.data.decode.context_tokens}):
        row: dict[str, Any] = {"context_tokens": context}
        for target in SHOW_ITL_TARGETS_S:
            point = profile.decode.best_thpt_per_gpu(target, context)
            row[f"itl_{target * 1000:g}ms"] = {
                "thpt_tokens_per_s_per_gpu": point.thpt_tokens_per_s_per_gpu,
                "kv_usage_fraction": point.grid_kv_usage_fraction,
                "meets_target": point.meets_itl_target,
            }
        rows.append(row)
    return rows


def _print_summary(profile: Profile) -> None:
    summary = profile.summary()
    provenance = summary["provenance"]
    print(f"profile: {summary['origin']}")
    for key in ("model", "gpu", "engine", "parallelism", "source", "licence", "synthetic"):
        print(f"  {key}: {provenance[key] if provenance[key] is not None else '(not stated)'}")
    print(f"  max_context_tokens: {summary['max_context_tokens'] or '(not stated)'}")
    pre = profile.data.prefill
    print(f"prefill: {pre.isl_tokens.size} points")
    print(f"  {'isl_tokens':>10} {'ttft_s':>9} {'thpt_tokens_per_s_per_gpu':>26}")
    for isl, ttft, thpt in zip(
        pre.isl_tokens, pre.ttft_s, pre.thpt_tokens_per_s_per_gpu, strict=True
    ):
        print(f"  {isl:>10.0f} {ttft:>9.4f} {thpt:>26.1f}")
    dec = summary["decode"]
    print(
        f"decode: {dec['points']} points, max_kv_tokens {dec['max_kv_tokens']}, grid {dec['grid']}"
        f" ({dec['grid_points_filled_from_nearest']['itl']} grid points filled from the nearest"
        " profiled point)"
    )
    targets = "  ".join(
        f"{'best @ ' + format(t * 1000, 'g') + 'ms':>20}" for t in SHOW_ITL_TARGETS_S
    )
    print(f"  {'context':>8}  {targets}")
    for row in decode_table(profile):
        cells = []
        for target in SHOW_ITL_TARGETS_S:
            cell = row[f"itl_{target * 1000:g}ms"]
            text = f"{cell['thpt_tokens_per_s_per_gpu']:.0f} @{cell['kv_usage_fraction']:.0%}"
            cells.append(f"{text + ('' if cell['meets_target'] else ' (miss)'):>20}")
        print(f"  {row['context_tokens']:>8.0f}  " + "  ".join(cells))


def write_plot(profile: Profile, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pre, dec = profile.data.prefill, profile.data.decode
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    isl = np.linspace(profile.prefill.min_isl_tokens, profile.prefill.max_isl_tokens, 400)
    ttft_curve = [profile.prefill.ttft_s(x) for x in isl]
    thpt_curve = [profile.prefill.thpt_per_gpu(x) for x in isl]
    axes[0, 0].plot(isl, ttft_curve, label="cubic interpolation")
    axes[0, 0].scatter(pre.isl_tokens, pre.ttft_s, color="black", s=12, label="profiled")
    axes[0, 0].set(xlabel="ISL, tokens", ylabel="TTFT, s", title="prefill TTFT")
    axes[0, 0].legend()
    axes[0, 1].plot(isl, thpt_curve, label="cubic interpolation")
    axes[0, 1].scatter(pre.isl_tokens, pre.thpt_tokens_per_s_per_gpu, color="black", s=12)
    axes[0, 1].set(xlabel="ISL, tokens", ylabel="tokens/s/GPU", title="prefill throughput")
    extent = (0.0, 1.0, 0.0, float(profile.decode.context_axis[-1]))
    for ax, grid, title, unit in (
        (axes[1, 0], profile.decode.itl_grid_s, "decode ITL (grid)", "s"),
        (axes[1, 1], profile.decode.thpt_grid, "decode throughput (grid)", "tokens/s/GPU"),
    ):
        image = ax.imshow(grid, origin="lower", aspect="auto", extent=extent)
        ax.scatter(dec.kv_usage_fraction, dec.context_tokens, color="white", s=10)
        ax.set(xlabel="KV-cache usage", ylabel="context, tokens", title=title)
        fig.colorbar(image, ax=ax, label=unit)
    provenance = profile.provenance
    fig.suptitle(f"{provenance.model or 'model ?'} on {provenance.gpu or 'GPU ?'}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def show(args: argparse.Namespace) -> int:
    profile = load_profile(args.path)
    if args.json:
        print(json.dumps({**profile.summary(), "decode_best": decode_table(profile)}, indent=2))
    else:
        _print_summary(profile)
    if args.plot:
        write_plot(profile, Path(args.plot))
        if not args.json:
            print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return convert(args) if args.command == "convert" else show(args)
    except ProfileError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
