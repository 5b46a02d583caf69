"""The package's structure: imports go one way (no circle), and no command imports another command."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tdlrt_cli"
COMMANDS = {"train", "report", "export", "evaluate", "bench"}


def local_imports():
    """module -> the tdlrt_cli modules it imports (anywhere in the file: lazy imports count)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps |= {a.name for a in node.names}
        graph[path.stem] = deps & modules - {path.stem}
    return graph


def test_imports_have_no_circle():
    graph = local_imports()
    state = {}

    def visit(module, trail):
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != "open", "import circle: " + " -> ".join(trail + [dep])
            if dep not in state:
                visit(dep, trail + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_no_command_imports_another():
    graph = local_imports()
    for command in COMMANDS:
        assert not graph[command] & COMMANDS, f"{command} imports {sorted(graph[command] & COMMANDS)}"


def test_the_low_rank_core_imports_only_torch():
    for path in (PACKAGE / "lowrank").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert node.module.split(".")[0] in ("torch", "__future__", "typing", "dataclasses", "math",
                                                     "heapq", "time", "itertools", "functools"), (path, node.module)
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                raise AssertionError(f"{path.name} imports from outside lowrank")
