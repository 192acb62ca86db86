"""The shape of the code, checked by parsing src/: short functions, imports that run one way, a lazy package."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "moderncnn"
MAX_FUNCTION_LINES = 80

# The layers of DESIGN.md, lowest first: a module may import its own part or a lower layer, never a higher one.
# models and data share the lowest layer and import neither each other nor anything above.
LAYERS = {"_version": -1, "hardware": -1, "models": 0, "data": 0, "checkpoint": 1, "runlock": -1, "runs": 2, "report": 3, "exported": 3, "training": 4,
          "predict": 5, "compare": 5, "bench": 5, "export": 5, "cli": 6, "__main__": 7}


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        yield path, parts


def _part(parts) -> str:
    return parts[0]


def _imported_parts(path: Path, parts):
    """The top-level parts of moderncnn that ``path`` imports (relative imports resolved)."""
    package = list(parts[:-1]) if parts[-1] != "__init__" else list(parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("moderncnn."):
                    yield alias.name.split(".")[1], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("moderncnn."):
                    yield node.module.split(".")[1], node.lineno
                continue
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = base + (node.module.split(".") if node.module else [])
            if target:
                yield target[0], node.lineno
            else:  # "from . import x" at the package root: x itself, or the root's __version__
                for alias in node.names:
                    if alias.name != "__version__":
                        yield alias.name, node.lineno


def test_no_function_in_src_is_longer_than_80_lines():
    long = []
    for path, _ in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_imports_run_one_way():
    wrong = []
    for path, parts in _modules():
        if parts == ("__init__",):
            continue  # the package root loads its exports lazily, by name
        own = _part(parts)
        for target, line in _imported_parts(path, parts):
            if target == own or target not in LAYERS:
                continue
            if LAYERS[target] >= LAYERS[own]:
                wrong.append(f"{path.relative_to(SRC)}:{line} imports {target}")
    assert not wrong, wrong


def test_the_layer_checker_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "report" / "bad.py"
    bad.parent.mkdir()
    bad.write_text("from ..training import train\nimport moderncnn.cli\n")
    found = list(_imported_parts(bad, ("report", "bad")))
    assert [t for t, _ in found] == ["training", "cli"]


def test_only_main_imports_the_cli():
    importers = [str(path.relative_to(SRC)) for path, parts in _modules()
                 if any(t == "cli" for t, _ in _imported_parts(path, parts)) and parts[0] != "cli"]
    assert importers == ["__main__.py"]


@pytest.mark.parametrize("statement,absent", [
    ("import moderncnn.models", ["moderncnn.training", "moderncnn.data", "moderncnn.report", "moderncnn.cli"]),
    ("import moderncnn; moderncnn.create_model('resnet18', num_classes=3)", ["moderncnn.training", "moderncnn.cli"]),
    ("import moderncnn.data", ["moderncnn.training", "moderncnn.models"]),
    ("import moderncnn.report.run", ["moderncnn.training"]),
])
def test_imports_load_only_what_they_need(statement, absent):
    code = f"import sys; {statement}; print([m for m in {absent!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_train_is_a_plain_function_whose_keywords_are_the_config_fields():
    import dataclasses
    import inspect
    import pydoc
    import types

    import moderncnn
    import moderncnn.training.callbacks  # importing the package does not replace the function
    from moderncnn.runs import TrainConfig
    assert isinstance(moderncnn.train, types.FunctionType)
    parameters = inspect.signature(moderncnn.train).parameters
    keywords = [p.name for p in parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert keywords == [f.name for f in dataclasses.fields(TrainConfig)]
    assert list(parameters)[:3] == ["config", "explicit", "callbacks"]
    assert all(p.default is None for p in parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY)
    assert "train(config=None" in pydoc.render_doc(moderncnn, renderer=pydoc.plaintext)
    assert moderncnn.Callback is moderncnn.training.callback.Callback


def _warn_from(module: str, category: str) -> None:
    """Raise a warning attributed to ``module`` (the warnings filter matches the caller's ``__name__``)."""
    exec(compile(f"import warnings\nwarnings.warn('old call', {category})", "<test>", "exec"), {"__name__": module})


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
def test_a_deprecation_warning_raised_in_moderncnn_fails_the_suite(category):
    """pyproject's filterwarnings: these warnings from moderncnn's own modules are errors, from others not."""
    with pytest.raises(category, match="old call"):
        _warn_from("moderncnn.export", category.__name__)
    with pytest.warns(category, match="old call"):
        _warn_from("some_other_package", category.__name__)


def test_the_package_ships_its_type_marker_and_has_one_version_source():
    import importlib.metadata
    import importlib.resources
    import tomllib

    import moderncnn
    assert (importlib.resources.files("moderncnn") / "py.typed").is_file()
    pyproject = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["moderncnn"]
    assert moderncnn.__version__ == importlib.metadata.version("moderncnn") == pyproject["project"]["version"]
    assert pyproject["project"]["version"] not in (SRC / "__init__.py").read_text()  # not written a second time


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node, less the bodies of ``if TYPE_CHECKING:`` (annotations only: never imported at run time)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", None) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _file_imports(files: dict, name: str, path: Path):
    """The moderncnn modules (files) that ``path`` imports anywhere in it, lazily inside functions too."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name in files)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            for alias in node.names:  # "from .x import y": y may be a module of its own
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base


def import_cycles(src: Path) -> list:
    """The groups of files of ``src`` that import one another in a circle (strongly connected components)."""
    files = {_module_name(p, src): p for p in src.rglob("*.py")}
    graph = {n: {t for t in _file_imports(files, n, p) if t in files and t != n} for n, p in files.items()}
    order, low, stack, cycles = {}, {}, [], []

    def visit(v):
        order[v] = low[v] = len(order)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in order:
            visit(v)
    return cycles


def test_no_two_files_in_src_import_each_other_even_indirectly():
    assert import_cycles(SRC) == []


def test_the_cycle_checker_sees_a_cycle_through_a_lazy_import(tmp_path):
    pkg = tmp_path / "moderncnn"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "models" / "__init__.py").write_text("from .registry import create_model\n")
    (pkg / "models" / "registry.py").write_text("def create_model():\n    from . import vgg\n")
    (pkg / "models" / "vgg.py").write_text("from .registry import create_model\n")
    (pkg / "models" / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                             "    from .vgg import x\n")
    assert import_cycles(pkg) == [["moderncnn.models.registry", "moderncnn.models.vgg"]]


def test_the_config_visits_no_file_more_than_three_times_on_its_way_to_the_first_epoch(tmp_path):
    import importlib.util
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "config_trace.py"
    spec = importlib.util.spec_from_file_location("config_trace", script)
    config_trace = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_trace)
    path = config_trace.trace_config_path(config_trace.make_folder(tmp_path / "data"), tmp_path / "runs")
    assert path[0][0] == "runs.py" and path[-1] == ("training/loop.py", "train_one_epoch")
    visits = config_trace.visits(path)
    assert {"training/resolve.py", "training/setup.py", "training/budget.py"} <= set(visits)
    assert max(visits.values()) <= 3, visits
    assert config_trace.visits([("a.py", "f"), ("a.py", "g"), ("b.py", "h"), ("a.py", "k")]) == {"a.py": 2, "b.py": 1}
