"""Write generated Markdown into its own block of ``docs/benchmarks.md``, leaving the rest alone.

A block lies between ``<!-- BEGIN <name> -->`` and ``<!-- END <name> -->``. When the block is
missing, the "Planning benchmark" section (with empty blocks) is appended first, so that other
sections of the page, written by other benchmarks, are never touched.
"""

from __future__ import annotations

from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
SECTION = "## Planning benchmark"
BLOCKS = ("planning-benchmark", "planning-decode-accuracy", "planning-speed")


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"


def _skeleton() -> str:
    parts = [SECTION, ""]
    for name in BLOCKS:
        begin, end = _markers(name)
        parts += [begin, end, ""]
    return "\n".join(parts)


def replace_block(name: str, body: str, doc: Path = DOC) -> None:
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    begin, end = _markers(name)
    if begin not in text or end not in text:
        text = text.rstrip("\n") + "\n\n" + _skeleton()
    if begin not in text:
        raise ValueError(f"{doc}: no block {name!r} and no place to add it")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(f"{head}{begin}\n{body.strip()}\n{end}{tail}", encoding="utf-8")
