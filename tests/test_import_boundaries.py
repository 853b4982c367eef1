"""The boundaries of the layout, read from the import statements of every module (lazy imports
inside functions included): services meet only in ``shared/`` and on the bus."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("services", "shared", "sim", "bench")
# Clients of the outside world a pure policy must not touch.
IO_LIBRARIES = ("nats", "kubernetes", "prometheus_client", "prometheus_api_client")
# The console entry point, which runs every service and tool (by name, when asked).
CLI = "services.cli"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
    }


MODULES = modules()


def _resolve(module: str, name: str | None) -> str:
    """``from a.b import c``: the module ``a.b.c`` if it is one, else ``a.b``."""
    if name is not None and f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    return module


@cache
def imports(module: str) -> frozenset[str]:
    """Every module ``module`` imports, first-party resolved to modules, others by name."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(_resolve(node.module, alias.name) for alias in node.names)
    return frozenset(found)


def closure(module: str) -> Iterator[tuple[str, str]]:
    """``(importer, imported)`` for every import reachable from ``module`` in the repository."""
    seen, todo = {module}, [module]
    while todo:
        current = todo.pop()
        for imported in imports(current):
            yield current, imported
            if imported in MODULES and imported not in seen:
                seen.add(imported)
                todo.append(imported)


def top(name: str, depth: int = 1) -> str:
    return ".".join(name.split(".")[:depth])


def service_of(module: str) -> str | None:
    """``services.decider.core`` -> ``decider``; ``None`` outside a service."""
    parts = module.split(".")
    return parts[1] if parts[0] == "services" and len(parts) > 2 else None


def test_the_walk_sees_the_modules_it_checks() -> None:
    assert "services.decider.policies.slaplanner.plan" in MODULES
    assert "shared.explanation" in imports("services.decider.policies.contract")
    assert "services.decider.registry" in imports("services.decider.knobs")  # a lazy import
    # the shell reaches the bus, as it should: the walk would see a policy doing so
    assert any(top(b) == "nats" for _, b in closure("services.decider.service"))


@pytest.mark.parametrize("module", sorted(m for m in MODULES if service_of(m)))
def test_a_service_imports_no_other_service(module: str) -> None:
    mine = service_of(module)
    others = sorted(i for i in imports(module) if service_of(i) not in (None, mine))
    assert others == [], f"{module} imports another service; share it in shared/ instead"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if top(m) == "shared"))
def test_shared_imports_no_service_and_no_tool(module: str) -> None:
    wrong = sorted(i for i in imports(module) if top(i) in ("services", "sim", "bench"))
    assert wrong == []


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if m.startswith("services.decider.policies"))
)
def test_a_policy_reaches_no_bus_cluster_or_metrics_client(module: str) -> None:
    wrong = sorted({f"{a} -> {b}" for a, b in closure(module) if top(b) in IO_LIBRARIES})
    assert wrong == [], f"{module} is not pure"


@pytest.mark.parametrize(
    "module", sorted(m for m in MODULES if top(m) in ("services", "shared") and m != CLI)
)
def test_only_the_tools_and_the_cli_import_the_simulator(module: str) -> None:
    assert not [i for i in imports(module) if top(i) == "sim"]
