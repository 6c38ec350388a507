"""Import rules of the layers (ARCHITECTURE.md: Layers), read from the source with `ast`.

Every import counts: module level, inside functions (lazy imports), under `TYPE_CHECKING`, relative ones.
The layers, bottom up: errors/fileio/logs → data → text, pose → models → engine → serve → cli (with
cli_options, cli_views). A package may import only from the layers below it, and the engine reaches
methods only through the registry and the base contract (`pedcli.models.methods` and
`pedcli.models.methods.base`), never a concrete method module.
"""

from __future__ import annotations

import ast
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import pedcli
from pedcli.models import methods

ROOT = Path(pedcli.__file__).parent
CLI = ("pedcli.cli", "pedcli.cli_options", "pedcli.cli_views")  # the CLI layer: the app and its helpers
UPPER = ("pedcli.models", "pedcli.engine", "pedcli.serve", *CLI)
# package → the pedcli modules it must not import (a name covers its submodules)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "pedcli.errors": ("pedcli.data", "pedcli.text", "pedcli.pose", *UPPER),
    "pedcli.fileio": ("pedcli.data", "pedcli.text", "pedcli.pose", *UPPER),
    "pedcli.logs": ("pedcli.data", "pedcli.text", "pedcli.pose", *UPPER),
    "pedcli.data": ("pedcli.text", "pedcli.pose", *UPPER),
    "pedcli.text": ("pedcli.pose", *UPPER),
    "pedcli.pose": ("pedcli.text", *UPPER),
    "pedcli.models": ("pedcli.engine", "pedcli.serve", *CLI),
    "pedcli.engine": ("pedcli.serve", *CLI),
    "pedcli.serve": CLI,
}
METHOD_API = {"pedcli.models.methods", "pedcli.models.methods.base"}  # what the engine may import of methods


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, module) for every import in `source`; `from a import b` yields `a.b` as well as `a`, since
    b may be a submodule (`from pedcli.models.methods import nafs`)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield node.lineno, target
            for alias in node.names:
                yield node.lineno, f"{target}.{alias.name}"


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def sources() -> list[tuple[str, Path]]:
    return sorted((module_name(p), p) for p in ROOT.rglob("*.py"))


def imports_of(prefix: str) -> Iterator[tuple[str, int, str]]:
    """(file, line, imported module) for every pedcli import in the modules under `prefix`."""
    for name, path in sources():
        if within(name, prefix):
            text = path.read_text(encoding="utf-8")
            for line, target in imported_modules(text, name, path.name == "__init__.py"):
                if within(target, "pedcli"):
                    yield str(path.relative_to(ROOT.parent)), line, target


def violations(prefix: str, banned: list[str] | tuple[str, ...]) -> str:
    """One line per import statement under `prefix` that reaches a banned module, '' when none."""
    bad: dict[tuple[str, int], str] = {}
    for file, line, target in imports_of(prefix):
        if any(within(target, b) for b in banned):
            bad.setdefault((file, line), target)  # the statement's module comes before its names
    return "\n".join(f"{file}:{line} imports {target}" for (file, line), target in sorted(bad.items()))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    bad = violations(layer, FORBIDDEN[layer])
    assert not bad, f"{layer} must not import {', '.join(FORBIDDEN[layer])}:\n{bad}"


def test_every_module_belongs_to_a_layer() -> None:
    """A new top-level module or package must be placed in the table above, or it escapes the rules."""
    layers = (*FORBIDDEN, *CLI)
    homeless = [n for n, _ in sources() if n != "pedcli" and not any(within(n, x) for x in layers)]
    assert not homeless, f"add these to a layer in FORBIDDEN (and to ARCHITECTURE.md): {homeless}"


def test_the_engine_imports_no_concrete_method() -> None:
    concrete = [f"pedcli.models.methods.{m.name}" for m in pkgutil.iter_modules(methods.__path__)]
    concrete = [c for c in concrete if c not in METHOD_API]
    assert "pedcli.models.methods.nafs" in concrete  # the scan sees the method modules
    bad = violations("pedcli.engine", concrete)
    assert not bad, f"the engine may use only the registry and base contract of methods:\n{bad}"


def test_the_scan_sees_lazy_relative_and_type_only_imports() -> None:
    """The rules above can only fail if the parser finds every form of import."""
    source = """
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from pedcli.engine.runs import load_run
def f():
    import pedcli.models.methods.base as b
    from ..models.methods import nafs
    from . import schema
"""
    found = {t for _, t in imported_modules(source, "pedcli.data.dataset")}
    assert {"pedcli.engine.runs", "pedcli.models.methods.base", "pedcli.models.methods.nafs"} <= found
    assert "pedcli.data.schema" in found
    package = {t for _, t in imported_modules("from .cache import x", "pedcli.data", is_package=True)}
    assert "pedcli.data.cache" in package
    assert len(sources()) > 50  # every module of the package is scanned
