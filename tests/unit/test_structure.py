"""The package's structure: imports go one way (no circle), and no command imports another command."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent.parent / "tdlrt_cli"
COMMANDS = {"train", "report", "export", "evaluate", "bench", "compress"}


def local_imports():
    """module -> the tdlrt_cli modules it imports (anywhere in the file: lazy imports count). A subpackage
    (lowrank, models, report) is one module: the imports of all its files, its own ones left out."""
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py")} | packages
    files = [(p.stem, p, 1) for p in PACKAGE.glob("*.py")]
    files += [(package, p, 2) for package in packages for p in (PACKAGE / package).glob("*.py")]
    graph = {}
    for module, path, depth in files:
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == depth:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps |= {a.name for a in node.names}
        graph[module] = graph.get(module, set()) | (deps & modules - {module})
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


def test_every_relative_import_names_a_module_that_exists():
    """``from .x import`` inside a subpackage is one of its own files, ``from ..x import`` one of the package's
    (a moved file's lazy imports are checked here; they fail only when their function runs)."""
    for path in PACKAGE.rglob("*.py"):
        here = path.parent
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                base = here
                for _ in range(node.level - 1):
                    base = base.parent
                target = base.joinpath(*node.module.split("."))
                assert target.with_suffix(".py").is_file() or (target / "__init__.py").is_file(), \
                    f"{path.relative_to(PACKAGE)}: from {'.' * node.level}{node.module} import ... names no module"


def test_the_code_map_in_docs_development_lists_every_module_in_dependency_order():
    """The "Code map" table of docs/development.md: every module once, each after all the modules it imports."""
    import re

    page = (PACKAGE.parent / "docs" / "development.md").read_text()
    table = page.split("## Code map", 1)[1].split("\n## ", 1)[0]
    listed = []
    for line in table.splitlines():
        if line.startswith("| `"):
            for name in re.findall(r"`([\w/.]+)`", line.split(" | ")[0]):
                module = name.split("/")[0] if "/" in name else name.removesuffix(".py")
                if module not in listed:
                    listed.append(module)
    graph = local_imports()
    assert set(listed) == set(graph) - {"__init__"}, sorted(set(listed) ^ (set(graph) - {"__init__"}))
    for module in listed:
        for dep in graph[module]:
            assert listed.index(dep) < listed.index(module), f"{module} imports {dep}, listed below it"


def test_the_readme_is_short_and_every_relative_link_of_the_readme_and_docs_resolves():
    """README.md has at most 200 lines; every relative link and image path in README.md and docs/*.md (outside
    code) names an existing file or folder, relative to the page that holds it (http(s) links and #anchors
    aside)."""
    import re

    root = PACKAGE.parent
    readme = root / "README.md"
    assert len(readme.read_text().splitlines()) <= 200, "README.md is longer than 200 lines: move detail to docs/"
    pages = [readme, *sorted((root / "docs").glob("*.md"))]
    assert len(pages) > 1, "no docs/*.md"
    broken = []
    for page in pages:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # fenced code
        text = re.sub(r"`[^`\n]*`", "", text)                                   # inline code
        for target in re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text):
            if re.match(r"(https?|mailto):", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(root)}: {target}")
    assert not broken, broken


def test_functions_and_modules_fit_on_a_screen():
    """No function in tdlrt_cli/ is over 80 lines; no module over 500 (the integrator, steps 1-5 of the paper's
    algorithm in one file, over 600)."""
    too_long = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        limit = 600 if path.name == "integrator.py" else 500
        if len(text.splitlines()) > limit:
            too_long.append(f"{path.relative_to(PACKAGE)}: {len(text.splitlines())} lines (at most {limit})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                too_long.append(f"{path.relative_to(PACKAGE)}: {node.name} is {node.end_lineno - node.lineno + 1} "
                                f"lines (at most 80)")
    assert not too_long, "; ".join(too_long)


def test_the_command_line_checks_its_input_before_torch_is_imported():
    """`tdlrt` refuses bad input in about a second: importing the CLI (and the config checks) leaves torch out."""
    import subprocess
    import sys

    code = "import sys, tdlrt_cli.cli, tdlrt_cli.validation, tdlrt_cli.families; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


def test_the_method_families_name_the_fixed_rank_layer_kinds():
    from tdlrt_cli.families import FIXED_RANK
    from tdlrt_cli.lowrank.baselines import FIXED

    assert FIXED_RANK == FIXED
