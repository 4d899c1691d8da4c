"""The package's layout holds: no import circles, no import up a layer, a ClientApp free of the server side.

Layers, from the bottom: shared (settings, wire protocol, adapters) < builtin (offline defaults) <
client < server (it may evaluate and check data as a client does) < the two apps < tools.
docs/architecture.md draws the same picture.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from flowertune_llm.client.imports import defer_submodule, hidden_module
from flowertune_llm.shared import protocol

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "flowertune_llm"
LAYERS = {"shared": 0, "builtin": 1, "client": 2, "server": 3, "client_app": 4, "server_app": 4, "tools": 5}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Return the package's modules that `path` imports anywhere (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in MODULES else node.module)
    return {name for name in found if name in MODULES}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_the_import_graph_has_no_circles():
    visiting, done, circles = [], set(), []

    def visit(module: str) -> None:
        visiting.append(module)
        for imported in sorted(GRAPH[module]):
            if imported in visiting:
                circles.append(visiting[visiting.index(imported):] + [imported])
            elif imported not in done:
                visit(imported)
        visiting.pop()
        done.add(module)

    for module in sorted(GRAPH):
        if module not in done:
            visit(module)
    assert circles == []


def test_no_module_imports_from_a_higher_layer():
    assert all(_layer(module) is not None for module in GRAPH if module != "flowertune_llm"), (
        "a module outside the layers: " + ", ".join(m for m in GRAPH if m != "flowertune_llm" and _layer(m) is None))
    upward = [(module, imported) for module, imports in GRAPH.items() for imported in imports
              if module != "flowertune_llm" and _layer(imported) is not None and _layer(imported) > _layer(module)]
    assert upward == []


def _client_app_closure() -> set[str]:
    """Return the package's modules a ClientApp process may load: its imports, at the top or in its handlers."""
    reached, queue = set(), ["flowertune_llm.client_app"]
    while queue:
        module = queue.pop()
        if module not in reached:
            reached.add(module)
            queue.extend(GRAPH[module])
    return reached


def test_the_client_app_reaches_nothing_of_the_server_side():
    reached = _client_app_closure()
    server_side = sorted(m for m in reached if m.startswith(("flowertune_llm.server", "flowertune_llm.tools")))
    assert server_side == []
    # And at run time: what the ClientApp and every module its handlers import really load.
    modules = ", ".join(sorted(reached))
    loaded = subprocess.run([sys.executable, "-c", (
        f"import sys, {modules}; "
        "print(sorted(m for m in sys.modules if m.startswith(('flowertune_llm.server', 'flowertune_llm.tools'))))")],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300)
    assert loaded.stdout.strip() == "[]"


def test_importing_the_client_app_loads_no_training_library():
    # A deployment starts a process per message: the handlers import what their message needs.
    loaded = subprocess.run([sys.executable, "-c", (
        "import sys, flowertune_llm.client_app; "
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets', 'flwr_datasets') if m in sys.modules))")],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300)
    assert loaded.stdout.strip() == "[]"


def test_the_training_code_leaves_wandb_unloaded_and_importable():
    # trl imports W&B at import time when it is installed (2-3 s a client process); clients never use it.
    pytest.importorskip("wandb")
    loaded = subprocess.run([sys.executable, "-c", (
        "import sys, flowertune_llm.client.training; before = 'wandb' in sys.modules; "
        "import wandb; print(before, wandb.__name__)")],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300)
    assert loaded.stdout.split()[-2:] == ["False", "wandb"]


def test_a_hidden_module_is_hidden_within_the_block_unless_already_loaded(tmp_path, monkeypatch):
    import json

    (tmp_path / "optional_extra.py").write_text("NAME = 'optional extra'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with hidden_module("optional_extra"), hidden_module("json"):
        assert importlib.util.find_spec("optional_extra") is None
        with pytest.raises(ImportError):
            import optional_extra  # noqa: F401
        import json as inside
    assert inside is json
    import optional_extra

    assert optional_extra.NAME == "optional extra"
    monkeypatch.delitem(sys.modules, "optional_extra")


def test_the_client_data_code_leaves_flower_datasets_plotting_unloaded_until_used():
    # flwr_datasets/__init__ imports its plots (matplotlib, seaborn, scipy): 1.5-2 s a client process.
    loaded = subprocess.run([sys.executable, "-c", (
        "import sys, flowertune_llm.client_app; "
        # What a train message imports; torch scans sys.modules (inspect.getmodule) on the way.
        "from flowertune_llm.client import data, training, kept_model, model, exact_match; "
        "import flwr_datasets; "
        "print(sorted(m for m in ('matplotlib', 'seaborn') if m in sys.modules)); "
        "plot = flwr_datasets.visualization.plot_label_distributions; "
        "print(plot.__module__, 'matplotlib' in sys.modules)")],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300)
    assert loaded.stdout.splitlines()[-2:] == ["[]", "flwr_datasets.visualization.label_distribution True"]


def test_a_deferred_submodule_loads_when_first_read(tmp_path, monkeypatch):
    package = tmp_path / "plotty"
    package.mkdir()
    (package / "__init__.py").write_text("from plotty import heavy\nLIGHT = 1\n")
    (package / "heavy.py").write_text("import sys\nsys.heavy_runs = getattr(sys, 'heavy_runs', 0) + 1\nVALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "heavy_runs", 0, raising=False)
    for name in ("plotty", "plotty.heavy"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    defer_submodule("plotty.heavy")
    import plotty

    assert plotty.LIGHT == 1 and sys.heavy_runs == 0
    # Scanning sys.modules, as inspect.getmodule does, is not a read.
    assert inspect.getmodule(test_a_deferred_submodule_loads_when_first_read).__name__ == __name__
    assert sys.modules["plotty.heavy"].__file__.endswith("heavy.py") and sys.heavy_runs == 0
    assert plotty.heavy.VALUE == 42 and sys.heavy_runs == 1
    from plotty.heavy import VALUE

    assert VALUE == 42 and sys.heavy_runs == 1 and type(sys.modules["plotty.heavy"]) is type(sys)
    for name in ("plotty", "plotty.heavy"):
        monkeypatch.delitem(sys.modules, name)


WIRE_NAMES = {value for name, value in vars(protocol).items() if name.isupper() and isinstance(value, str)}


def _spelled_wire_names(path: Path) -> list[str]:
    """Return wire names written as literals where messages are read or built (`x.content["arrays"]`, `RecordDict({...})`)."""
    spelled = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
                and node.value.attr in ("content", "metric_records", "array_records", "config_records")
                and isinstance(node.slice, ast.Constant)):
            spelled.append(f"{path.name}:{node.lineno} {node.slice.value!r}")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("RecordDict", "MetricRecord", "ConfigRecord") and node.args
                and isinstance(node.args[0], ast.Dict)):
            spelled += [f"{path.name}:{node.lineno} {key.value!r}" for key in node.args[0].keys
                        if isinstance(key, ast.Constant) and key.value in WIRE_NAMES]
    return spelled


def test_wire_names_are_spelled_only_in_the_protocol_module():
    spelled = [place for module, path in sorted(MODULES.items()) if module != "flowertune_llm.shared.protocol"
               for place in _spelled_wire_names(path)]
    assert spelled == []


def test_the_wire_check_sees_a_spelled_name(tmp_path):
    spelled = tmp_path / "spelled.py"
    spelled.write_text('reply = msg.content["arrays"]\nout = RecordDict({"metrics": m})\n')
    assert _spelled_wire_names(spelled) == ["spelled.py:1 'arrays'", "spelled.py:2 'metrics'"]


# Flower's public API; anything else of flwr is private and goes through shared/flower_compat.py.
FLOWER_PUBLIC = ("flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.simulation", "flwr.common.config",
                 "flwr.common.logger", "flwr_datasets")


def test_only_the_compat_module_imports_flowers_internals():
    private = []
    for module, path in sorted(MODULES.items()):
        if module == "flowertune_llm.shared.flower_compat":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            private += [f"{module}: {name}" for name in names
                        if name.split(".")[0] == "flwr" and not name.startswith(FLOWER_PUBLIC)]
    assert private == []
