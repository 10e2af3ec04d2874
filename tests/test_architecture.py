"""The import direction of docs/DESIGN.md, and no reaching into another module's private names.

Each module of ``prunable`` has a layer (:data:`LAYERS`); a module may import only
modules of lower layers. Leaves (errors, reasons, plan, meta, handlers, surgery)
import nothing above them; graph uses surgery; importance reads handlers; pruner
orchestrates; io, cli and the demo sit on top.
"""

import ast
import functools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "prunable"

#: layer of each module: imports must point to a strictly lower layer
LAYERS = {
    "errors": 0, "reasons": 0, "accumulate": 0, "landing": 0, "plan": 0, "meta": 0, "inputs": 0,
    "handlers": 1, "staging": 1, "distributed": 1, "recurrent": 2,
    "surgery": 2, "constraints": 1,
    "attention": 3, "shadow": 3, "sdpa": 4, "importance": 3, "restore": 3, "copies": 3,
    "configs": 3, "temperature": 3,
    "rules": 4, "nn": 4,
    "trace": 5,
    "graph": 6, "models": 6,
    "flops": 7, "oracle": 7, "latency": 7,
    "selection": 8, "validation": 8, "schedule": 8, "scoring": 8, "sizes": 8,
    "admission": 9,
    "pruner": 10,
    "io": 11, "transfer": 11, "lightning": 11, "data": 11, "demo_report": 11,
    "demo": 12, "cli": 13, "__main__": 14, "__init__": 14,
}

#: known exceptions, each with the reason it is still there
EXCEPTIONS: dict[tuple[str, str], str] = {}


@functools.cache
def _modules() -> dict[str, ast.Module]:
    """Parsed source of every module, by dotted name inside the package (``data.japanese``)."""
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): ast.parse(p.read_text(), str(p))
            for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(name: str) -> int | None:
    """Layer of a module; a subpackage's modules share the subpackage's layer."""
    return LAYERS.get(name.split(".")[0])


def _imports(tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """``(imported prunable module, names taken from it, line)`` for every relative or prunable import."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("prunable")):
            base = (node.module or "").removeprefix("prunable").lstrip(".").split(".")[0]
            if base:
                out.append((base, [a.name for a in node.names], node.lineno))
            else:  # from . import io
                out += [(a.name, [], node.lineno) for a in node.names]
    return out


@pytest.mark.parametrize("name", sorted(_modules()))
def test_imports_point_down(name):
    tree, layer = _modules()[name], _layer(name)
    assert layer is not None, f"prunable.{name} has no layer: add it to LAYERS in {__file__}"
    top = name.split(".")[0]
    wrong = [f"line {line}: {name} (layer {layer}) imports {dep} (layer {LAYERS[dep]})"
             for dep, _, line in _imports(tree)
             if dep in LAYERS and dep != top and LAYERS[dep] >= layer and (top, dep) not in EXCEPTIONS]
    assert not wrong, wrong


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_private_names_from_other_modules(name):
    tree = _modules()[name]
    private = [f"line {line}: from .{dep} import {n}" for dep, names, line in _imports(tree)
               for n in names if n.startswith("_") and not n.startswith("__")]
    modules = {dep for dep, names, _ in _imports(tree) if not names}
    private += [f"line {node.lineno}: {node.value.id}.{node.attr}" for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert not private, private


#: ``nn`` names that are no layer type: the base classes and the data-parallel wrappers
NOT_LAYERS = {"Module", "Parameter", "DataParallel", "parallel"}
#: the modules allowed to name layer classes: the handler registry and its attention handlers
LAYOUT_OWNERS = {"handlers", "attention"}


@pytest.mark.parametrize("name", sorted(set(_modules()) - LAYOUT_OWNERS))
def test_no_isinstance_on_layer_types_outside_handlers(name):
    """Layout lives in handlers: no ``isinstance(m, nn.Conv2d)`` elsewhere (see :data:`NOT_LAYERS`)."""
    wrong = []
    for node in ast.walk(_modules()[name]):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance":
            for part in ast.walk(node.args[1]) if len(node.args) == 2 else ():
                if (isinstance(part, ast.Attribute) and isinstance(part.value, ast.Name) and part.value.id == "nn"
                        and part.attr not in NOT_LAYERS):
                    wrong.append(f"line {node.lineno}: isinstance(..., nn.{part.attr})")
    assert not wrong, wrong
