"""The package's layering, read from its source: which subpackage may import which, and no import cycles.

core <- workdir <- model <- pruning, training <- quantization, reconstruction, evaluation <- configs <- engine <- stages
<- cli. Pruning math, training and quantization never touch the work directory, so they are tested on plain tensors; the
windowed engine (planning, claims, running windows, assembly, restoring evicted activations) lies below the stages, and
no stage module imports another: only stages combine every domain.
"""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "freelunch_cli"
ALLOWED = {
    "core": {"core"},
    "workdir": {"core", "workdir"},
    "model": {"core", "workdir", "model"},
    "pruning": {"core", "model", "pruning"},
    "training": {"core", "model", "training"},
    "quantization": {"core", "training", "quantization"},
    "reconstruction": {"core", "workdir", "model", "training", "reconstruction"},
    "evaluation": {"core", "workdir", "model", "evaluation"},
    "configs": {"core", "pruning", "training", "quantization", "reconstruction", "configs"},  # lazily, inside methods: torch-free
    "engine": {"core", "workdir", "model", "pruning", "training", "reconstruction", "configs", "engine"},
    "stages": {
        "core",
        "workdir",
        "model",
        "pruning",
        "training",
        "quantization",
        "reconstruction",
        "evaluation",
        "configs",
        "engine",
        "stages",
    },
    "cli": {"core", "workdir", "evaluation", "configs", "stages", "cli"},
}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "freelunch_cli" else None


def _imports() -> dict[str, set[str]]:
    """Module -> the freelunch_cli modules it imports anywhere in its source (lazy imports included)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("freelunch_cli"):
                found |= {
                    f"{node.module}.{a.name}"
                    if (PACKAGE.parent / node.module.replace(".", "/") / f"{a.name}.py").exists()
                    else node.module
                    for a in node.names
                }
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("freelunch_cli")}
        graph[name] = found - {name}
    return graph


def test_every_module_lives_in_a_layer():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "cli.py"], top  # everything else lives in a subpackage


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for module, imported in _imports().items():
        layer = "cli" if module in ("freelunch_cli.cli", "freelunch_cli.__main__") else _layer(module)
        for target in imported:
            if layer is not None and _layer(target) is not None and _layer(target) not in ALLOWED[layer]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_stage_module_imports_another():
    """Machinery that several stages share lives below them (engine, configs), so each stage reads on its own."""
    wrong = [
        f"{module} imports {target}"
        for module, imported in _imports().items()
        if _layer(module) == "stages"
        for target in imported
        if _layer(target) == "stages" and target != "freelunch_cli.stages"
    ]
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = _imports()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_command_line_loads_no_torch_for_help():
    """Stage configs are torch-free, so building the CLI (and `freelunch --help`) does not import torch."""
    code = "import sys, freelunch_cli.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
