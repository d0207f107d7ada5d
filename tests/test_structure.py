"""The package's shape holds itself: imports point one way, no import circles, small modules.

Parsed with `ast` (every `import`, also inside functions and TYPE_CHECKING blocks), so a later
change that breaks the rules in docs/design.md fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kvtier

PACKAGE = Path(kvtier.__file__).parent

# Floor of every module (longest prefix wins); an import must go to a strictly lower floor, or to
# a sibling in the same subpackage (those must not form a circle either).
# cli -> {demo, verify} -> {planner, runner, bench, report} -> {hf, zoo} -> controller
#   -> {policy, tiers, transfer} -> {blocks, layout, codec, config, errors}
FLOORS = {
    "kvtier._version": 0,
    "kvtier.errors": 0,
    "kvtier.sizes": 1,
    "kvtier.save_queue": 1,  # the mover's per-store save batches (stdlib only)
    "kvtier.copies": 1,  # copies merged and sorted for the mover (torch only)
    "kvtier.data": 1,
    "kvtier.machine": 2,
    "kvtier.registry": 2,
    "kvtier.config": 3,
    "kvtier.measured": 3,
    "kvtier.blocks": 4,
    "kvtier.layout": 4,
    "kvtier.tiers.codec": 4,
    "kvtier.tiers.base": 5,
    "kvtier.tiers": 6,
    # the remote tier stores the disk's block format (tiers.disk.format, .blockio)
    "kvtier.tiers.remote": 6.5,
    # [remote] is checked by parse_remote at load_config; it imports only errors
    "kvtier.tiers.remote.url": 2,
    "kvtier.policy": 6,
    "kvtier.transfer": 6,
    "kvtier.controller": 7,
    "kvtier.hf": 8,
    "kvtier.zoo": 8,  # models fetched and loaded: below the jobs that run them
    "kvtier.planner": 9,
    "kvtier.runner": 9,
    "kvtier.bench": 9,
    "kvtier.report": 9,
    "kvtier.demo": 10,
    "kvtier.verify": 10,
    "kvtier.cli": 11,
    "kvtier.__main__": 12,
}
# (importer prefix, imported prefix) pairs that are refused even where the floors allow them
FORBIDDEN = [("kvtier.hf", "kvtier.tiers")]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every kvtier module `path` imports, resolved to module names (not attributes)."""
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names]
            modules = [name for name in names if _is_module(name)]  # `from kvtier import zoo`
            found |= set(modules)
            if len(modules) < len(names) or target != "kvtier":
                found.add(target)
    return {name for name in found if name == "kvtier" or name.startswith("kvtier.")}


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _floor(module: str) -> int:
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")), key=len)
    return FLOORS[best]


def _graph() -> dict[str, set[str]]:
    return {
        _module_name(path): _imports(path) - {_module_name(path)}
        for path in sorted(PACKAGE.rglob("*.py"))
    }


GRAPH = _graph()


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "kvtier"))
def test_imports_point_down(module: str) -> None:
    """Scenario: every import of a kvtier module goes to a lower floor (or a sibling module)."""
    wrong = []
    for target in sorted(GRAPH[module]):
        if target == "kvtier":
            wrong.append(f"{target} (import the defining module, not the package surface)")
            continue
        same_package = module.rpartition(".")[0] == target.rpartition(".")[0] != "kvtier"
        inside = target.startswith(module + ".")  # a package importing its own modules
        own = module.startswith(target + ".")  # a module importing its own package
        if not (same_package or inside or own) and _floor(target) >= _floor(module):
            wrong.append(f"{target} (floor {_floor(target)} >= {_floor(module)})")
        for importer, imported in FORBIDDEN:
            if module.startswith(importer) and target.startswith(imported):
                wrong.append(f"{target} ({importer} never imports {imported})")
    assert not wrong, f"{module} imports upwards or sideways: {wrong}"


def test_every_module_has_a_floor() -> None:
    unplaced = [
        m
        for m in GRAPH
        if m != "kvtier" and not any(m == p or m.startswith(p + ".") for p in FLOORS)
    ]
    assert not unplaced, f"give these modules a floor in FLOORS: {unplaced}"


def test_no_import_circles() -> None:
    """Scenario: no module reaches itself through its imports (package surfaces included)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 1:
                circles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_modules_and_functions_stay_small(path: Path) -> None:
    """Scenario: no module over 450 lines, no function over 70 (STYLE.md: ~400 and ~60)."""
    text = path.read_text()
    assert text.count("\n") <= 450, f"{path.name}: {text.count(chr(10))} lines; split it by job"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= 70, f"{path.name}: {node.name} is {length} lines; split it"


def test_the_surface_is_the_users() -> None:
    """Scenario: kvtier exports what a user calls, not the internals (TierController)."""
    assert set(kvtier.__all__) == {
        "BudgetError",
        "Config",
        "ConfigError",
        "KVTierError",
        "Policy",
        "StoreCorruptError",
        "TieredCache",
        "UnsupportedModelError",
        "__version__",
        "load_config",
        "offload",
        "register_policy",
        "release_pinned_memory",
    }
    for name in kvtier.__all__:
        assert getattr(kvtier, name) is not None
