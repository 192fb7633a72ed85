"""The layering of the package, checked from the source: every import of every kinetix module
(module level and inside functions) is parsed with `ast`, and the import graph must be acyclic,
import only downward through the layers (docs/architecture.md), keep the kinetics core free of
the rest of kinetix and of the training / data stack, keep the models free of the data layer,
and never import a command from the library. The checker itself is tested on small fake
packages, so a rule that could never fail would show here.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

LAYERS = {
    "kinetix.kinetics": 0,
    "kinetix.cli": 0,
    "kinetix.maps": 1,
    "kinetix.figures": 1,
    "kinetix.data": 2,
    "kinetix.models": 2,
    "kinetix.training": 3,
    "kinetix.inference": 4,
    "kinetix.evaluation": 5,
    "kinetix.experiment": 6,
}
"""Layer of each top-level part of kinetix (longest prefix wins); commands sit above all."""

COMMANDS = frozenset(
    f"kinetix.{name}" for name in ("train", "predict", "evaluate", "simulate", "parametric", "fit")
)
COMMAND_LAYER = 7
MAX_COMMAND_LINES = 110

COMPAT_ALIASES = frozenset(
    {
        ("kinetix.training", "kinetix.experiment"),
        ("kinetix.training", "kinetix.inference"),
    }
)
"""Upward edges allowed: the package `kinetix.training` still answers for names that moved to
the layers above it (`train_and_evaluate`, the inference helpers), looked up lazily on attribute
access (PEP 562) for users' code written against the former single module."""

KINETICS_FORBIDDEN = ("flax", "optax", "orbax", "grain", "nibabel")


# ------------------------------------------------------------------------------------ checker ---
def module_name(path: pathlib.Path, src_root: pathlib.Path) -> str:
    parts = list(path.relative_to(src_root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def find_modules(src_root: pathlib.Path, package: str) -> dict[str, pathlib.Path]:
    """{dotted name: path} of every module of `package` under `src_root`."""
    return {module_name(p, src_root): p for p in sorted((src_root / package).rglob("*.py"))}


def imports_of(name: str, path: pathlib.Path, modules) -> set[str]:
    """Every module `name` imports (absolute names), at any depth of its syntax tree."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in modules else base)
    return out


def import_graph(src_root: pathlib.Path, package: str):
    """({module: set of imported modules of the package}, {module: set of all imports})."""
    modules = find_modules(src_root, package)
    everything = {m: imports_of(m, p, modules) for m, p in modules.items()}
    inside = {m: {i for i in imps if i in modules and i != m} for m, imps in everything.items()}
    return inside, everything


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes (first = last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer(module: str, layers=LAYERS, commands=COMMANDS) -> int | None:
    if module in commands:
        return COMMAND_LAYER
    best = None
    for prefix, rank in layers.items():
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, rank)
    return None if best is None else best[1]


def layering_violations(graph, layers=LAYERS, commands=COMMANDS, allowed=COMPAT_ALIASES):
    """Edges (a, b) where a imports a command or a module of a higher layer."""
    bad = []
    for a, targets in graph.items():
        for b in targets:
            if (a, b) in allowed:
                continue
            if b in commands and a not in commands:
                bad.append((a, b, "a library module imports a command"))
                continue
            la, lb = layer(a, layers, commands), layer(b, layers, commands)
            if la is None or lb is None:
                bad.append((a, b, "a module outside the known layers"))
            elif lb > la:
                bad.append((a, b, f"imports upward (layer {la} -> {lb})"))
    return sorted(bad)


# ---------------------------------------------------------------------------- the real package ---
@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT, "kinetix")


def test_every_module_is_in_a_layer(graph):
    inside, _ = graph
    assert len(inside) > 30
    unplaced = [m for m in inside if m != "kinetix" and layer(m) is None]
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"


def test_no_import_cycle(graph):
    inside, _ = graph
    assert find_cycle(inside) is None, f"import cycle: {' -> '.join(find_cycle(inside))}"


def test_layers_import_only_downward_and_no_command(graph):
    inside, _ = graph
    assert layering_violations(inside) == []


def test_kinetics_core_imports_nothing_else(graph):
    inside, everything = graph
    for module, imports in everything.items():
        if not module.startswith("kinetix.kinetics"):
            continue
        other = [i for i in inside[module] if not i.startswith("kinetix.kinetics")]
        assert not other, f"{module} imports {other}"
        heavy = [i for i in imports if i.split(".")[0] in KINETICS_FORBIDDEN]
        assert not heavy, f"{module} imports {heavy}"


def test_models_do_not_import_data(graph):
    inside, _ = graph
    for module, imports in inside.items():
        if module.startswith("kinetix.models"):
            data = [i for i in imports if i.startswith("kinetix.data")]
            assert not data, f"{module} imports {data}"


def test_training_loop_imports_no_evaluation(graph):
    inside, _ = graph
    reach, todo = set(), ["kinetix.training.loop"]
    while todo:
        for nxt in inside.get(todo.pop(), ()):
            if nxt not in reach:
                reach.add(nxt)
                todo.append(nxt)
    assert not [m for m in reach if m.startswith(("kinetix.evaluation", "kinetix.experiment"))]


def test_commands_are_thin():
    for command in sorted(COMMANDS):
        path = ROOT / (command.replace(".", "/") + ".py")
        if path.exists():
            lines = len(path.read_text().splitlines())
            assert lines <= MAX_COMMAND_LINES, f"{path.name} has {lines} lines"


# ------------------------------------------------------------------------- the checker itself ---
def _fake_package(tmp_path, files: dict[str, str]) -> pathlib.Path:
    for rel, text in files.items():
        path = tmp_path / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    root = _fake_package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "import pkg.b\n",
            "b.py": "def f():\n    from pkg import c\n",
            "c.py": "from . import a\n",
        },
    )
    inside, _ = import_graph(root, "pkg")
    assert inside["pkg.b"] == {"pkg.c"} and inside["pkg.c"] == {"pkg.a"}
    assert find_cycle(inside) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    inside["pkg.c"] = set()
    assert find_cycle(inside) is None


def test_checker_finds_upward_and_command_imports(tmp_path):
    root = _fake_package(
        tmp_path,
        {
            "__init__.py": "",
            "low/__init__.py": "from pkg.high import x\n",
            "high.py": "from pkg import low\nfrom pkg import cmd\n",
            "cmd.py": "import pkg.high\n",
        },
    )
    inside, _ = import_graph(root, "pkg")
    layers = {"pkg.low": 0, "pkg.high": 1}
    bad = layering_violations(inside, layers, frozenset({"pkg.cmd"}), frozenset())
    assert bad == [
        ("pkg.high", "pkg.cmd", "a library module imports a command"),
        ("pkg.low", "pkg.high", "imports upward (layer 0 -> 1)"),
    ]
    allowed = frozenset({("pkg.low", "pkg.high")})
    assert len(layering_violations(inside, layers, frozenset({"pkg.cmd"}), allowed)) == 1
