"""The package's layers: imports point one way (down), never in a cycle, never at another
module's private names. The map below is the contributor's guide (README "Where things go")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "hawq"

#: layer of every module; a module may import only from its own layer or below.
LAYERS = {
    # 0. foundations: errors, registries, atomic I/O, plotting helpers
    "errors": 0, "registry": 0, "io": 0, "plots": 0,
    # 1. pure maths: quantizer arithmetic, budgets, allocation (no modules, no data)
    "quantizers": 1, "budgets": 1, "allocation": 1, "plan": 1, "ddpg": 1,
    # 2. how a model is fed and judged; built-in datasets
    "tasks": 2, "data": 2,
    # 3. module surgery: quantized twins, attention, layer lists, built-in models, forward passes
    "qmodules": 3, "attention": 3, "surgery": 3, "accounting": 3, "models": 3, "passes": 3,
    "evaluate": 3,
    # 4. sensitivity: Hessian engine, Fisher, measured losses, registries of metrics,
    #    channel-wise and data-free sensitivities, distillation
    "hessian": 4, "fisher": 4, "hessian_density": 4, "sensitivity": 4, "activations": 4,
    "sensitivities": 4, "channelwise": 4, "zeroq": 4, "distill": 4,
    # 5. post-training, fine-tuning, export; configs and allocation steps
    "biascorr": 5, "refine": 5, "finetune": 5, "export": 5, "onnx_export": 5, "config": 5,
    "pipeline": 5,
    # 6. workflows
    "workflow": 6,
    # 7. user-facing: report, loading user objects, command line
    "report": 7, "loading": 7, "cli": 8, "cli_export": 8, "__main__": 9, "__init__": 10,
}


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in SRC.glob("*.py")}


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(hawq module imported, names taken from it, line) for every import in ``path``,
    including imports inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "hawq":
                continue
            if len(parts) == 1:  # from hawq import x: x may be a module or a top-level name
                for a in node.names:
                    out.append((a.name if a.name in LAYERS else "__init__", [a.name], node.lineno))
            else:
                out.append((parts[1], [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "hawq":
                    out.append((parts[1] if len(parts) > 1 else "__init__", [], node.lineno))
    return out


def test_every_module_has_a_layer():
    missing = sorted(set(_modules()) - set(LAYERS))
    assert not missing, f"add these modules to LAYERS in {__file__}: {missing}"


def test_imports_point_down():
    bad = []
    for name, path in _modules().items():
        for target, _names, line in _imports(path):
            if target == name:
                continue
            if LAYERS.get(target, 99) > LAYERS[name]:
                bad.append(f"{name}.py:{line} imports {target} (layer {LAYERS.get(target)} > "
                           f"{LAYERS[name]})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {name: {t for t, _, _ in _imports(p) if t != name and t in LAYERS}
             for name, p in _modules().items()}
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
    bad = [f"{name}.py:{line} imports {target}.{n}"
           for name, path in _modules().items()
           for target, names, line in _imports(path) if target != name
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_library_never_imports_the_cli():
    bad = [f"{name}.py:{line}" for name, path in _modules().items()
           if name not in ("cli", "cli_export", "__main__")
           for target, _n, line in _imports(path) if target in ("cli", "cli_export")]
    assert not bad, f"library modules importing the CLI: {bad}"


@pytest.mark.parametrize("name", sorted(p.stem for p in SRC.glob("*.py")
                                        if not p.stem.startswith("_")))
def test_every_module_declares_all(name):
    tree = ast.parse((SRC / f"{name}.py").read_text())
    names = {t.id for node in tree.body if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name)}
    names |= {node.target.id for node in tree.body if isinstance(node, ast.AnnAssign)
              and isinstance(node.target, ast.Name)}
    assert "__all__" in names, f"hawq/{name}.py has no __all__"


def test_layer_test_catches_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a fake low-level module importing the workflow is reported."""
    fake = tmp_path / "errors.py"
    fake.write_text("from hawq.workflow import compress\n")
    found = _imports(fake)
    assert found == [("workflow", ["compress"], 1)]
    assert LAYERS["workflow"] > LAYERS["errors"]
