"""The house's layering: every import inside mtmim_cli points down or stays inside its own
package (or top-level module); an import across peers of one layer is refused like one up.

    errors -> base -> index -> data -> models -> eval -> train -> orchestration | deploy |
    report | demo -> api -> app -> commands -> cli

`eval/` never imports `train/`: evaluation scores features and never trains. `train/` may use
eval's scoring (its validator measures verification accuracy during a run). Work that trains
and then evaluates (the FG-NET re-fit) lives in `orchestration/`; `deploy/`, `report/` and
`demo/` sit beside it and never import each other (nor it). The base modules (atomic, paths,
...) are peers too: only `errors` lies under them. Lazy imports inside functions count: they
are dependencies all the same, and so does `from mtmim_cli import <package>`. A new top-level
module or package must be given a layer here before it can land.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mtmim_cli"

LAYERS: list[set[str]] = [
    {"__init__", "errors"},
    {"atomic", "paths", "progress", "sharding", "threads", "source", "allocator",
     "plot_style", "digest"},   # base: small single-job modules, peers of one another
    {"index"},          # nearest-neighbour search: numpy and faiss only
    {"data"},
    {"models"},
    {"eval"},
    {"train"},
    {"orchestration", "deploy", "report", "demo"},
    {"api"},            # the public Python API: over deploy's gallery, under the commands
    {"app"},
    {"commands"},
    {"cli"},
]


def _layer(part: str) -> int:
    for k, names in enumerate(LAYERS):
        if part in names:
            return k
    raise AssertionError(f"mtmim_cli.{part}: give it a layer in tests/test_layers.py")


def _part(module: str) -> str:
    """'mtmim_cli.eval.run' -> 'eval'; 'mtmim_cli' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_submodule(name: str) -> bool:
    return (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name / "__init__.py").is_file()


def imported_modules(source: str) -> list[str]:
    """Every mtmim_cli module an import statement names (at any depth of the file);
    `from mtmim_cli import eval` names mtmim_cli.eval, `from mtmim_cli import __version__`
    the package's __init__."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import: use the absolute mtmim_cli path"
            names = [node.module or ""]
            if node.module == "mtmim_cli":
                names = [f"mtmim_cli.{a.name}" if _is_submodule(a.name) else "mtmim_cli"
                         for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out += [n for n in names if n == "mtmim_cli" or n.startswith("mtmim_cli.")]
    return out


def violations(module: str, source: str) -> list[str]:
    """Imports of `module` (e.g. 'mtmim_cli.models.identity') that point up or across peers."""
    here = _part(module)
    bad = []
    for target in imported_modules(source):
        there = _part(target)
        if there == here:
            continue
        if _layer(there) > _layer(here):
            bad.append(f"{module} -> {target} (up: {here} is below {there})")
        elif _layer(there) == _layer(here):
            bad.append(f"{module} -> {target} (across: {here} and {there} are peers)")
    return bad


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def test_every_import_points_down() -> None:
    bad = [v for module, path in _modules() for v in violations(module, path.read_text())]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_every_module_has_a_layer() -> None:
    for module, _ in _modules():
        _layer(_part(module))


@pytest.mark.parametrize("module, source, ok", [
    ("mtmim_cli.models.identity", "from mtmim_cli.train.checkpoint import x", False),
    ("mtmim_cli.models.identity", "def f():\n    import mtmim_cli.train.loop\n", False),
    ("mtmim_cli.eval.features", "from mtmim_cli.train import loop", False),
    ("mtmim_cli.train.validate", "from mtmim_cli.eval.features import x", True),
    ("mtmim_cli.data.cache", "from mtmim_cli.orchestration.refit import x", False),
    ("mtmim_cli.orchestration.refit", "from mtmim_cli.train.finetune import x\n"
                                      "from mtmim_cli.eval import protocols", True),
    ("mtmim_cli.train.loop", "from mtmim_cli import __version__\nfrom mtmim_cli.data import cache", True),
    # the package form names the package
    ("mtmim_cli.models.identity", "from mtmim_cli import train", False),
    ("mtmim_cli.eval.features", "def f():\n    from mtmim_cli import __version__, orchestration\n", False),
    ("mtmim_cli.train.loop", "from mtmim_cli import eval, errors", True),
    # peers of one layer
    ("mtmim_cli.deploy.embed", "from mtmim_cli.orchestration.refit import x", False),
    ("mtmim_cli.report.page", "from mtmim_cli import demo", False),
    ("mtmim_cli.atomic", "from mtmim_cli.paths import shared_dir", False),
    ("mtmim_cli.atomic", "from mtmim_cli.errors import MtmimError", True),
    ("mtmim_cli.report.page", "from mtmim_cli.report import figures", True),
    ("mtmim_cli.commands.align_cmd", "from mtmim_cli.app import app", True),
    ("mtmim_cli.app", "from mtmim_cli.commands import align_cmd", False),
])
def test_the_checker_sees_upward_and_sideways_imports(module: str, source: str, ok: bool) -> None:
    assert (violations(module, source) == []) is ok


# --- No circles: the layering above allows imports inside one package in any direction, so
# two modules of one package could still import each other (eval/features.py and
# eval/trunk_memo.py did, one of them lazily). A circle works only as long as one side
# imports late; the graph below is of modules (not packages) and fails on any circle.

def module_imports(module: str, source: str) -> set[str]:
    """The mtmim_cli modules `module`'s source imports (at any depth: lazy ones too):
    `from mtmim_cli.eval import trunk_memo` names mtmim_cli.eval.trunk_memo, `from
    mtmim_cli.eval.features import x` mtmim_cli.eval.features, `from mtmim_cli.eval import
    x` (not a module) the package mtmim_cli.eval. A package's __init__ that runs on the way
    to a module is not an edge: Python handles a package importing its own modules."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if not (base == "mtmim_cli" or base.startswith("mtmim_cli.")):
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if _is_module(sub) else base)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names
                    if a.name == "mtmim_cli" or a.name.startswith("mtmim_cli.")}
    out.discard(module)
    return out


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel.with_suffix(".py")).is_file() or (PACKAGE / rel / "__init__.py").is_file()


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every group of modules that import each other, directly or through others (the
    strongly connected components of more than one module, or one importing itself), each
    sorted, the list sorted (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    group.append(m)
                    if m == node:
                        break
                if len(group) > 1 or node in graph.get(node, ()):
                    found.append(sorted(group))
    return sorted(found)


def import_graph() -> dict[str, set[str]]:
    return {module: module_imports(module, path.read_text()) for module, path in _modules()}


def test_no_module_imports_itself_through_others() -> None:
    found = circles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_graph_sees_every_form_of_import() -> None:
    src = ("from mtmim_cli.eval import trunk_memo, FLIP\nimport mtmim_cli.data.cache\n"
           "def f():\n    from mtmim_cli.eval.features import forward_views\n"
           "from mtmim_cli import errors\nimport numpy\n")
    assert module_imports("mtmim_cli.eval.x", src) == {
        "mtmim_cli.eval.trunk_memo", "mtmim_cli.eval", "mtmim_cli.data.cache",
        "mtmim_cli.eval.features", "mtmim_cli.errors"}


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ({"a": {"b"}, "b": {"a"}}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c", "e"}, "e": set()}, [["a", "b"], ["c", "d"]]),
    ({"a": {"a"}}, [["a"]]),
    ({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}, []),   # a diamond is no circle
])
def test_circles_are_found_and_only_circles(graph: dict[str, set[str]],
                                            expected: list[list[str]]) -> None:
    assert circles(graph) == expected
