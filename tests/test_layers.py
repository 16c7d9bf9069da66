"""The package reads bottom-up: models -> export -> engines -> runtime -> api -> cli.

Every module of linear_export is parsed with `ast`; each `import` and `from .. import` in it,
at module level or inside a function (TYPE_CHECKING blocks included), is resolved to the
most specific linear_export module it names. Then:

(a) no module imports a module of a higher layer. Ranks:
    -1  errors, outputs, hashing (anything may import them)
     0  models        1  export        2  engines        3  runtime
     3.5 evaluation and demo: they run generations (runtime, engines) and nothing below
         the CLI imports them; they may import each other's layers below, not the api or cli
     4  api           4.5 the package's __init__ (re-exports the api)
     5  cli           6  __main__ (runs the cli)
    A module of a top-level name not listed here fails the test until it is given a rank.
(b) no import cycle among modules (Tarjan's strongly connected components).
(c) no cli command module imports another one: cli/options.py is the shared option table
    and cli/__init__.py registers the commands; both may be imported / may import them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import linear_export

PACKAGE = "linear_export"
LAYERS = {"models": 0, "export": 1, "engines": 2, "runtime": 3, "api": 4, "cli": 5}
OTHER_RANKS = {"": 4.5, "errors": -1, "outputs": -1, "hashing": -1,
               "evaluation": 3.5, "demo": 3.5, "__main__": 6}
# Edges that break (a) today and are being removed by a change in flight.
KNOWN_UPWARD: set = set()  # edges allowed to break (a) for a change in flight: none today
CLI_SHARED = {"linear_export.cli", "linear_export.cli.options"}


def module_files(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, whether it is a package __init__)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _known(name: str, modules: dict) -> str | None:
    """`name` if it is a module, else its longest prefix that is one (None: outside)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path, package: str = PACKAGE) -> dict[str, set[str]]:
    """Each module's imports of modules of the same package (itself excluded)."""
    modules = module_files(root, package)
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(here[: len(here) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                # `from pkg import sub` names the submodule when there is one
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                         for alias in node.names]
            else:
                continue
            for target in names:
                if target == package or target.startswith(package + "."):
                    resolved = _known(target, modules)
                    if resolved and resolved != name:
                        targets.add(resolved)
        graph[name] = targets
    return graph


def top_name(module: str) -> str:
    """The top-level name under the package: 'runtime' for linear_export.runtime.bench."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def rank(module: str) -> float:
    name = top_name(module)
    if name in LAYERS:
        return LAYERS[name]
    if name in OTHER_RANKS:
        return OTHER_RANKS[name]
    raise AssertionError(f"{module} has no layer; give its top-level name '{name}' a rank in "
                         "tests/test_layers.py (and say why in the docstring).")


def upward_imports(graph: dict[str, set[str]], known=frozenset()) -> list[str]:
    return sorted(f"{module} (rank {rank(module)}) imports {target} (rank {rank(target)})"
                  for module, targets in graph.items() for target in targets
                  if rank(target) > rank(module) and (top_name(module), target) not in known)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def is_cli_command(module: str) -> bool:
    return top_name(module) == "cli" and module not in CLI_SHARED


def cli_cross_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{module} imports {target}" for module, targets in graph.items()
                  if is_cli_command(module) for target in targets if is_cli_command(target))


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(Path(linear_export.__file__).parent)


def test_every_module_has_a_layer(graph):
    for module in graph:
        rank(module)


def test_no_module_imports_a_higher_layer(graph):
    assert upward_imports(graph, KNOWN_UPWARD) == []


def test_no_import_cycle(graph):
    # Imports between cli commands are test_cli_commands_do_not_import_each_other's to
    # forbid (build <-> generate is a cycle today); once that passes none can be left here.
    without_cli_commands = {
        module: {t for t in targets if not (is_cli_command(module) and is_cli_command(t))}
        for module, targets in graph.items()}
    assert cycles(without_cli_commands) == []


def test_cli_commands_do_not_import_each_other(graph):
    assert cli_cross_imports(graph) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "linear_export" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "linear_export"


def test_the_checks_find_what_they_forbid(tmp_path):
    """A made-up package with an upward import (in a function), a cycle and a cli cross-import."""
    root = _write(tmp_path, {
        "__init__.py": "",
        "models/__init__.py": "",
        "models/gpt.py": "def f():\n    from ..runtime import policies\n",
        "runtime/__init__.py": "",
        "runtime/policies.py": "from linear_export.runtime.cache import KVCache\n",
        "runtime/cache.py": "from . import policies\nfrom ..models.gpt import GPT\n",
        "cli/__init__.py": "from . import build\n",
        "cli/options.py": "",
        "cli/build.py": "from .options import X\nfrom .generate import run\n",
        "cli/generate.py": "from . import options\n",
    })
    found = import_graph(root)
    assert found["linear_export.runtime.cache"] == {"linear_export.runtime.policies",
                                                     "linear_export.models.gpt"}
    assert upward_imports(found) == [
        "linear_export.models.gpt (rank 0) imports linear_export.runtime.policies (rank 3)"]
    assert cycles(found) == [["linear_export.models.gpt", "linear_export.runtime.cache",
                              "linear_export.runtime.policies"]]
    assert cli_cross_imports(found) == ["linear_export.cli.build imports "
                                        "linear_export.cli.generate"]


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60  # in cli/ and runtime/, where the application's flow is read
FLOW_FOLDERS = ("cli", "runtime")


def size_problems(root: Path, package: str = PACKAGE) -> list[str]:
    """Modules over MAX_MODULE_LINES lines; cli/runtime functions over MAX_FUNCTION_LINES."""
    problems = []
    for module, (path, _) in module_files(root, package).items():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            problems.append(f"{module}: {text.count(chr(10))} lines")
        if top_name(module) not in FLOW_FOLDERS:
            continue
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1  # from `def`, decorators aside
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"{module}.{node.name}: {length} lines")
    return problems


def test_modules_and_flow_functions_stay_short():
    assert size_problems(Path(linear_export.__file__).parent) == []


def test_the_size_check_finds_a_long_function_and_module(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(61))
    root = _write(tmp_path, {"__init__.py": "", "runtime/__init__.py": "",
                             "runtime/loop.py": f"def step():\n{body}",
                             "models/__init__.py": "", "models/big.py": "x = 1\n" * 401})
    assert size_problems(root) == ["linear_export.models.big: 401 lines",
                                   "linear_export.runtime.loop.step: 62 lines"]
