"""The project's layers only point down, and no module imports itself back (docs/architecture.md).

Every ``import`` of every project file (also the ones inside functions: a lazy import is still a dependency) is
read with ``ast``. A file may import its own package and anything on a lower floor; a package on the top floor
(the entry points) may also import another top-floor package. An import that climbs, or a circle of imports, fails
naming the files.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The floors, lowest first. A top-level package or module of the project that is missing here fails the test:
# decide where it stands and add it.
FLOORS = (
    ("util",),                                      # generic helpers: boxes, distributed, logging, errors
    ("rundir", "datasets", "models"),               # one run's folder and checkpoints; the data; the networks
    ("engine", "visualize"),                        # train/evaluate one epoch; pictures of a model's outputs
    ("options", "training"),                        # main.py's flags, declared once with their meaning; the epoch loop
    ("flag_checks", "inference"),                   # the flags' checks; a detector from a checkpoint (flags' defaults)
    ("run_setup",),                                 # one run's configuration, resolved once (flags + checkpoints)
    ("main", "predict", "export", "hubconf", "slurm", "experiments", "tests"),  # entry points
)
FLOOR = {unit: level for level, units in enumerate(FLOORS) for unit in units}
TOP = len(FLOORS) - 1
SKIPPED_DIRS = {".venv", ".git", "__pycache__", "shared", "fixtures"}


def project_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if not SKIPPED_DIRS.intersection(p.relative_to(root).parts))


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path, modules: set[str]) -> list[tuple[str, int]]:
    """(project module, line) for every import in ``path``: ``from pkg import name`` counts as ``pkg.name`` when
    that is a module, else as ``pkg``; relative imports are resolved against the file's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1] if package else []
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # 'models.detr.DETR' -> 'models.detr'
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, node.lineno))
    return found


def import_graph(root: Path) -> dict[str, list[tuple[str, int]]]:
    files = project_files(root)
    modules = {module_name(p, root): p for p in files}
    return {name: imported_modules(path, root, set(modules)) for name, path in modules.items()}


def file_of(module: str, root: Path) -> str:
    package = root / module.replace(".", "/")
    return str((package / "__init__.py" if package.is_dir() else package.with_suffix(".py")).relative_to(root))


def upward_imports(graph: dict, root: Path) -> list[str]:
    problems = []
    for importer, targets in graph.items():
        unit = importer.split(".")[0]
        if unit not in FLOOR:
            problems.append(f"{file_of(importer, root)}: '{unit}' has no floor in tests/test_layers.py FLOORS")
            continue
        for target, line in targets:
            other = target.split(".")[0]
            if other == unit or other not in FLOOR:
                continue
            if FLOOR[other] > FLOOR[unit] or (FLOOR[other] == FLOOR[unit] and FLOOR[unit] != TOP):
                problems.append(f"{file_of(importer, root)}:{line} imports {file_of(target, root)}: "
                                f"'{unit}' (floor {FLOOR[unit]}) may not import '{other}' (floor {FLOOR[other]})")
    return problems


def import_cycles(graph: dict, root: Path) -> list[str]:
    """One line per circle of imports between files, as 'a.py -> b.py -> a.py' (each circle once)."""
    state, stack, cycles, seen = {}, [], [], set()

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target, _ in graph.get(module, ()):
            if state.get(target) == "open":
                circle = stack[stack.index(target):]
                key = frozenset(circle)
                if key not in seen:
                    seen.add(key)
                    cycles.append(" -> ".join(file_of(m, root) for m in [*circle, target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


@pytest.mark.quick
def test_imports_only_point_down():
    graph = import_graph(REPO)
    assert len(graph) > 50 and "rundir.checkpoint" in dict(graph["main"]) and "util.errors" in dict(graph["flag_checks"])
    assert upward_imports(graph, REPO) == []


def test_main_and_the_epoch_loop_read_the_resolved_config_only():
    """The flags are resolved in run_setup.py; main.py and training.py never reach back into their definitions
    (docs/architecture.md, "The args journey"). main.py's one use of flag_checks is its early parse (fast --help)."""
    graph = import_graph(REPO)
    assert "run_setup" in dict(graph["main"]) and "options" in dict(graph["run_setup"])
    assert "options" not in dict(graph["main"])
    assert {"options", "flag_checks", "run_setup"}.isdisjoint(dict(graph["training"]))


@pytest.mark.quick
def test_no_import_cycles():
    assert import_cycles(import_graph(REPO), REPO) == []


def test_the_walk_names_an_upward_import_and_a_cycle(tmp_path):
    """The checks on a made-up project: util importing options (a climb, also lazily in a function), and two
    modules of one package importing each other (a cycle)."""
    (tmp_path / "util").mkdir()
    (tmp_path / "util" / "__init__.py").write_text("")
    (tmp_path / "util" / "a.py").write_text("def f():\n    from options import X\n")
    (tmp_path / "util" / "b.py").write_text("from . import c\n")
    (tmp_path / "util" / "c.py").write_text("from util.b import g\n")
    (tmp_path / "options.py").write_text("from util import a\nX = 1\n")
    graph = import_graph(tmp_path)
    assert upward_imports(graph, tmp_path) == [
        "util/a.py:2 imports options.py: 'util' (floor 0) may not import 'options' (floor 3)"]
    assert import_cycles(graph, tmp_path) == ["options.py -> util/a.py -> options.py",
                                              "util/b.py -> util/c.py -> util/b.py"]
