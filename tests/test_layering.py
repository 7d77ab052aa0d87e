"""The package's layers: sub-packages by layer, imports pointing one way (down), never in a
cycle, never at another module's private names. README "Where things go" explains the map."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hawq"

#: sub-package -> layer; a module may import only from its own layer or below.
LAYERS = {"base": 0, "maths": 1, "feed": 2, "modules": 3, "analysis": 4, "post": 5,
          "workflows": 6, "ui": 7}
#: the top-level modules: the public API (imports anything) and ``python -m hawq``.
TOP = {"__init__": 8, "__main__": 9}


def _modules() -> dict[str, Path]:
    """'package.module' (or a top-level name) -> file, for every module of hawq."""
    out = {p.stem: p for p in SRC.glob("*.py")}
    for pkg in SRC.iterdir():
        if pkg.is_dir() and (pkg / "__init__.py").is_file():
            out.update({f"{pkg.name}.{p.stem}": p for p in pkg.glob("*.py")})
    return out


def _layer(name: str) -> int:
    return TOP[name] if name in TOP else LAYERS[name.split(".")[0]]


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(hawq module imported as 'package.module', names taken from it, line) for every import
    in ``path``, including imports inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "hawq":
                continue
            if len(parts) == 1:
                out.append(("__init__", [a.name for a in node.names], node.lineno))
            elif len(parts) == 2:  # from hawq.pkg import module
                for a in node.names:
                    out.append((f"{parts[1]}.{a.name}", [], node.lineno))
            else:
                out.append((".".join(parts[1:3]), [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "hawq":
                    out.append((".".join(parts[1:3]) if len(parts) > 2 else "__init__", [],
                                node.lineno))
    return out


def test_every_module_is_in_a_layer_package():
    stray = [n for n in _modules() if "." not in n and n not in TOP]
    assert not stray, f"put these modules in a layer package (see LAYERS): {stray}"
    unknown = [n for n in _modules() if "." in n and n.split(".")[0] not in LAYERS]
    assert not unknown, f"add these packages to LAYERS in {__file__}: {unknown}"


def test_imports_point_down():
    bad = []
    for name, path in _modules().items():
        for target, _names, line in _imports(path):
            if target == name or target.endswith(".__init__"):
                continue
            if _layer(target) > _layer(name):
                bad.append(f"{name}:{line} imports {target} (layer {_layer(target)} > "
                           f"{_layer(name)})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    mods = _modules()
    graph = {name: {t for t, _, _ in _imports(p) if t != name and t in mods}
             for name, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            cycle = visit(n)
            assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_no_private_names_of_other_modules():
    bad = [f"{name}:{line} imports {target}.{n}"
           for name, path in _modules().items()
           for target, names, line in _imports(path) if target != name
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_library_never_imports_the_cli():
    bad = [f"{name}:{line}" for name, path in _modules().items()
           if name not in ("ui.cli", "ui.cli_export", "__main__")
           for target, _n, line in _imports(path) if target in ("ui.cli", "ui.cli_export")]
    assert not bad, f"library modules importing the CLI: {bad}"


@pytest.mark.parametrize("name", sorted(n for n in _modules()
                                        if not n.split(".")[-1].startswith("_")))
def test_every_module_declares_all(name):
    tree = ast.parse(_modules()[name].read_text())
    names = {t.id for node in tree.body if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name)}
    names |= {node.target.id for node in tree.body if isinstance(node, ast.AnnAssign)
              and isinstance(node.target, ast.Name)}
    assert "__all__" in names, f"hawq/{name.replace('.', '/')}.py has no __all__"


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checker itself: a foundation module importing the workflow is reported upward."""
    fake = tmp_path / "errors.py"
    fake.write_text("def f():\n    from hawq.workflows.workflow import compress\n")
    assert _imports(fake) == [("workflows.workflow", ["compress"], 2)]
    assert _layer("workflows.workflow") > _layer("base.errors")
