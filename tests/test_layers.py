"""The package's layering: no module imports one that (directly or not) imports it back."""

from __future__ import annotations

import ast
from pathlib import Path

from .conftest import REPO

PACKAGE = REPO / "liver_fcn"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports, at the top or inside functions."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for target in targets:
                # the longest module name the import names (a name imported from a module is that module)
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_in_the_package():
    assert cycles(import_graph()) == []


#: the layers, lowest first: a module imports only its own layer's modules and those of lower layers
LAYERS = [
    ["liver_fcn", "liver_fcn.errors", "liver_fcn.options", "liver_fcn.outputs", "liver_fcn.distributed"],
    ["liver_fcn.data"],
    ["liver_fcn.transforms"],
    ["liver_fcn.networks"],
    ["liver_fcn.losses", "liver_fcn.metrics"],
    ["liver_fcn.checkpoint"],
    ["liver_fcn.runs", "liver_fcn.bundle"],
    ["liver_fcn.training", "liver_fcn.evaluation", "liver_fcn.visualize", "liver_fcn.dicom_seg", "liver_fcn.rtstruct"],
    ["liver_fcn.inference"],
    ["liver_fcn.api"],
    ["liver_fcn.registry"],
    ["liver_fcn.tracking", "liver_fcn.reporting", "liver_fcn.offline"],
    ["liver_fcn.handlers"],
    ["liver_fcn.crossval", "liver_fcn.cli"],
]


def layer_of(module: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(module == m or (m != "liver_fcn" and module.startswith(m + ".")) for m in layer):
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS")


#: the one upward import allowed: the package root hands out its Python API (``liver_fcn.segment``)
#: from the top layer on first use (PEP 562 ``__getattr__``), so that ``import liver_fcn`` stays light
ROOT_API = ("liver_fcn", "liver_fcn.api")


def test_every_module_imports_only_its_layer_and_those_below():
    upward = [
        (module, target)
        for module, targets in import_graph().items()
        for target in targets
        if layer_of(target) > layer_of(module) and (module, target) != ROOT_API
    ]
    assert upward == []


#: what a module may import inside a function: libraries slow to import that only some commands need
#: (MLflow, matplotlib, SimpleITK, highdicom, rt-utils (OpenCV) and pydicom's code dictionaries), so that `liver-fcn
#: --help`, inference and the bundle's configs start without them; and in cli.py the module of each
#: subcommand
LAZY = ("mlflow", "matplotlib", "SimpleITK", "highdicom", "pydicom.sr", "rt_utils")
LAZY_BY_MODULE = {
    "liver_fcn.cli": ("liver_fcn",),
    "liver_fcn": ("liver_fcn.api",),
    # the registry's pyfunc class makes MLflow warn when defined: loaded when a training registers its model
    "liver_fcn.handlers.mlflow_run": ("liver_fcn.registry",),
    "liver_fcn.offline": ("liver_fcn.registry",),
}


def test_imports_inside_functions_only_keep_start_up_light():
    found = []
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        allowed = LAZY + LAZY_BY_MODULE.get(name, ())
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    target = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                    if not any(target == a or target.startswith(a + ".") for a in allowed):
                        found.append(f"{name}:{node.lineno} imports {target}")
    assert found == []
