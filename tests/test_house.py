"""The house shows the architecture, and keeps showing it: no import circles (function-level imports
count), no module over 500 lines, imports pointing the way README's "Code layout" says, and each list
named once."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from contracts import events as ev
from contracts.job import IMAGE_SCHEMES
from contracts.settings import Settings
from worker.intake.fetch import ImageFetcher

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("contracts", "producer", "worker", "emulator")
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (resolved to the longest known name)."""
    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                names = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for name in names:
                target = resolve(name)
                own_package = modules.get(target or "", path).name == "__init__.py" and module.startswith(f"{target}.")
                if target and target != module and not own_package:  # a package's modules import through it
                    graph[module].add(target)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return circles


def test_no_module_imports_itself_round_a_loop() -> None:
    assert _circles(_imports(_modules())) == []


def test_no_module_is_over_five_hundred_lines() -> None:
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_imports_point_the_way_the_layout_says() -> None:
    graph = _imports(_modules())

    def reaches(prefix: str, target: str) -> list[str]:
        return sorted(m for m, targets in graph.items() if m.startswith(prefix)
                      and any(t == target or t.startswith(target + ".") for t in targets))

    assert reaches("contracts", "producer") == [] and reaches("contracts", "worker") == []
    assert reaches("worker", "producer") == []
    assert reaches("producer", "worker") == ["producer.cli.services"]  # `qvq worker`, loaded when it runs
    assert reaches("emulator", "worker") == reaches("emulator", "producer") == []
    emulator_uses = {t for m, targets in graph.items() if m.startswith("emulator") for t in targets
                     if t.startswith("contracts")}
    assert emulator_uses <= {"contracts.catalog", "contracts.tokens"}  # the vendor's facts, nothing of ours
    assert reaches("worker.celery", "worker") == []  # the app imports nothing of the worker
    assert [m for m, targets in graph.items() if "worker.lifecycle" in targets] == ["worker.tasks"]


def test_each_list_is_named_once() -> None:
    fetcher = ImageFetcher(Settings())
    try:
        assert set(fetcher._by_scheme) == set(IMAGE_SCHEMES) | {""}  # "" is a bare local path
    finally:
        fetcher.close()
    assert len(set(ev.EVENT_TYPES)) == len(ev.EVENT_TYPES) and set(ev.EVENT_TYPES) >= ev.TERMINAL_TYPES
    sources = {path.name: path.read_text() for package in PACKAGES for path in (REPO / package).rglob("*.py")}
    for name, text in sources.items():
        if name not in {"keys.py", "broker.py"}:
            assert '"qvq:' not in text, f"{name} names a Redis key: contracts/keys.py holds them"
