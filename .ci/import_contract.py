#!/usr/bin/env python3
"""hirelc's import contract, checked on the source tree without importing it.

The package is layered; a module may import (at module level) only modules of its own layer or of a layer
below it, and the module-level import graph has no cycles. From the bottom:

  base      errors, validate, options, runs, report, machine,  plain helpers and every user option
            compat                                            (kernels may use only errors)
  kernels   hirelc.kernels                                    pure tensor functions, granularity types
  core      policy, topology, cost, qmodules, models, data    the types every stage shares
  train     hirelc.train                                      training and evaluation loops
  lower     hirelc.lower                                      prune, fold, quantize, fine-tune, save
  export    hirelc.export                                     ONNX, ONNX Runtime sessions, verify
  adapters  evaluate, latency, parallel                       what the search calls to score a policy
  search    hirelc.search                                     the agents (sees LayerSpec and an Evaluator)
  pipeline  hirelc.pipeline                                   every stage, run-directory I/O and caches
  studies   hirelc.studies                                    bench, ablate, results
  cli       hirelc.cli, hirelc.__main__                       the Typer application

Besides the order: kernels import nothing of hirelc but ``hirelc.errors``; export imports neither lower nor
train (verify takes the PyTorch logits from its caller); search imports nothing of train, lower, export or the
adapters. Function-local imports of hirelc modules are allowed only in the cli; a function-local import of
anything else (an optional heavy dependency imported on use) carries a comment on its line.

Run ``python .ci/import_contract.py`` (exit 1 and one line per violation when broken).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"toolchain": "hirelc", "kernels": "hirelc.kernels", "export": "hirelc.export"}
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("hirelc", "hirelc.errors", "hirelc.validate", "hirelc.options", "hirelc.runs", "hirelc.report",
              "hirelc.machine", "hirelc.compat")),
    ("kernels", ("hirelc.kernels",)),
    ("core", ("hirelc.policy", "hirelc.topology", "hirelc.cost", "hirelc.qmodules", "hirelc.models",
              "hirelc.data")),
    ("train", ("hirelc.train",)),
    ("lower", ("hirelc.lower",)),
    ("export", ("hirelc.export",)),
    ("adapters", ("hirelc.evaluate", "hirelc.latency", "hirelc.parallel")),
    ("search", ("hirelc.search",)),
    ("pipeline", ("hirelc.pipeline",)),
    ("studies", ("hirelc.studies",)),
    ("cli", ("hirelc.cli", "hirelc.__main__")),
]
ONLY: list[tuple[str, tuple[str, ...]]] = [  # these may import nothing of hirelc but what is listed
    ("hirelc.kernels", ("hirelc.kernels", "hirelc.errors")),
]
FORBIDDEN: list[tuple[str, tuple[str, ...]]] = [
    ("hirelc.export", ("hirelc.lower", "hirelc.train")),
    ("hirelc.search", ("hirelc.train", "hirelc.lower", "hirelc.export", "hirelc.evaluate", "hirelc.latency")),
]
LOCAL_IMPORTS_ALLOWED = ("hirelc.cli",)


def module_files(root: Path = ROOT, sources: dict[str, str] = SOURCES) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` under the source folders (``hirelc`` is ``toolchain/``)."""
    out: dict[str, Path] = {}
    for folder, package in sources.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if name.startswith("hirelc.kernels.") and folder == "toolchain":
                continue
            out.setdefault(name, path)
    return out


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(name: str, layers=LAYERS) -> int | None:
    best, index = -1, None
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            if _within(name, p) and len(p) > best and (p != "hirelc" or name == "hirelc"):
                best, index = len(p), i
    return index


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        stem = ".".join(base + ([node.module] if node.module else []))
    else:
        stem = node.module or ""
    out = []
    for a in node.names:
        full = f"{stem}.{a.name}"
        out.append(full if full in known else stem)
    return out


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _visit(node: ast.AST, in_function: bool, module: str, path: Path, lines: list[str], is_package: bool,
           known: set[str], edges: dict[str, set[str]], problems: list[str]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _type_checking(child):
            # the body is for annotations only; an else branch runs
            _visit(ast.Module(body=child.orelse, type_ignores=[]), in_function, module, path, lines, is_package,
                   known, edges, problems)
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            targets = _targets(child, module, is_package, known)
            ours = [t for t in targets if _within(t, "hirelc")]
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{child.lineno}"
            if in_function:
                if ours and not any(_within(module, a) for a in LOCAL_IMPORTS_ALLOWED):
                    problems.append(f"{where}: function-local import of {', '.join(ours)} in {module}")
                elif not ours and "#" not in lines[child.lineno - 1]:
                    problems.append(f"{where}: function-local import of {', '.join(targets)} without a "
                                    "comment saying why")
            else:
                edges[module].update(t for t in ours if t != module)
        inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        _visit(child, inner, module, path, lines, is_package, known, edges, problems)


def scan(files: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Module-level hirelc import edges per module, and violations found while reading (local imports)."""
    known = set(files)
    edges: dict[str, set[str]] = {m: set() for m in files}
    problems: list[str] = []
    for module, path in files.items():
        source = path.read_text()
        tree = ast.parse(source, str(path))
        _visit(tree, False, module, path, source.splitlines(), path.name == "__init__.py", known, edges, problems)
    return edges, problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in edges:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def check(root: Path = ROOT, sources: dict[str, str] = SOURCES) -> list[str]:
    """Every violation of the contract, one line each (empty when it holds)."""
    files = module_files(root, sources)
    edges, problems = scan(files)
    for module in sorted(files):
        if layer_of(module) is None:
            problems.append(f"{module}: in no layer (add it to LAYERS in .ci/import_contract.py)")
    for module, targets in sorted(edges.items()):
        mine = layer_of(module)
        for t in sorted(targets):
            theirs = layer_of(t)
            if mine is not None and theirs is not None and theirs > mine:
                problems.append(f"{module} ({LAYERS[mine][0]}) imports {t} ({LAYERS[theirs][0]}), a layer above it")
            for owner, allowed in ONLY:
                if _within(module, owner) and not any(_within(t, a) for a in allowed):
                    problems.append(f"{module} imports {t}: {owner} may import only {', '.join(allowed)}")
            for owner, banned in FORBIDDEN:
                if _within(module, owner) and any(_within(t, b) for b in banned) and not _within(t, owner):
                    problems.append(f"{module} imports {t}, which {owner} must not use")
    for comp in cycles(edges):
        problems.append("import cycle: " + " -> ".join(comp))
    return problems


def main() -> int:
    problems = check()
    for p in problems:
        print(p)
    n = len(module_files())
    print(f"import contract: {n} modules, {len(problems)} violation(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
