"""The package's import structure: no import cycles between modules, and folders stacked in layers
(docs/ARCHITECTURE.md "Layers"): a module imports only from its own folder or from a lower layer.

Imports are read with `ast`, so every import counts: module level, inside a function (lazy) and under
`if TYPE_CHECKING:`. A lazy import that exists only to keep torch (or another heavy library) off a CPU
or CLI path is exempt from the layer order when its line carries `# layering: lazy`; it still counts
for cycles.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.ports import free_port

PACKAGE = Path(__file__).resolve().parents[1] / "pdlaunch"
LAZY_MARKER = "# layering: lazy"

# Bottom first. A folder (or a top-level module) imports from lower layers only; the members of one
# layer do not import each other.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "metrics", "signal_flag"),  # our error types; the process-wide Prometheus registry; a stop flag
    ("memory", "model"),  # platform, CuMem pools, sleep; checkpoint loading, layers, attention
    ("config",),  # the deployment schema and its validation (reads checkpoints and the platform)
    ("kvcache", "runner"),  # KV block bookkeeping (block tables, prefix cache); one step's forward on a rank
    ("kv_transfer", "offload"),  # moving KV blocks between instances / to the CPU tier
    ("distributed",),  # TP groups and executors over the model runner
    ("engine",),  # scheduler, step inputs, sampling, outputs, LLMEngine
    ("http",),  # what the instance API and the proxy share: OpenAI errors, SSE, disconnects, auth, limits
    ("server",),  # one instance's HTTP API
    ("proxy", "launcher", "render"),  # the PD router; process supervision; cluster manifests
    ("bench",),  # load generator and transfer benchmark
    ("cli",),  # the typer app
    ("__main__",),  # `python -m pdlaunch`
]

# Imports that still run against the layer order, each with why it is there and what removes it.
# The test fails when one disappears (delete it here) or a new one appears (fix the import instead).
KNOWN_UPWARD: dict[tuple[str, str], str] = {}

# Import cycles not broken yet, each with its way out. Same rule: fix, then delete here.
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported pdlaunch module, line, marked lazy) for every import statement in the file."""
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []
    for node in ast.walk(ast.parse(source, str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # `from pdlaunch.x import y` imports the module pdlaunch.x.y when there is one.
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
            targets = submodules or [base]
        else:
            continue
        marked = LAZY_MARKER in lines[node.lineno - 1]
        for target in targets:
            while target and target not in MODULES:  # `import pdlaunch.a.b.Name` -> its module
                target = target.rpartition(".")[0]
            if target and target != "pdlaunch" and target != name:
                found.append((target, node.lineno, marked))
    return found


GRAPH: dict[str, list[tuple[str, int, bool]]] = {name: imports_of(name, path) for name, path in MODULES.items()}


def folder(module: str) -> str:
    """pdlaunch.engine.scheduler -> engine; pdlaunch.cli -> cli."""
    return module.split(".")[1]


def layer_of(module: str) -> int:
    top = folder(module)
    for index, members in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"{module}: folder {top!r} is in no layer of tests/test_layering.py LAYERS; add it")


def cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in MODULES:
        if root in index:
            continue
        work = [(root, iter(sorted({t for t, _, _ in GRAPH[root]})))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted({t for t, _, _ in GRAPH[child]}))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def upward_imports() -> dict[tuple[str, str], str]:
    """(importer, imported) -> 'file:line' for every import against the layer order."""
    found: dict[tuple[str, str], str] = {}
    for name, targets in GRAPH.items():
        for target, line, lazy in targets:
            if folder(name) == folder(target) or lazy:
                continue
            if layer_of(target) >= layer_of(name):
                found.setdefault((name, target), f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}")
    return found


def test_no_import_cycles() -> None:
    found = {tuple(component) for component in cycles()}
    new = found - set(KNOWN_CYCLES)
    assert not new, f"modules that import each other (move the shared piece into a module of its own): {new}"
    gone = set(KNOWN_CYCLES) - found
    assert not gone, f"broken, so remove them from KNOWN_CYCLES: {gone}"


def test_every_folder_has_a_layer() -> None:
    for name in MODULES:
        if name != "pdlaunch":
            layer_of(name)


def test_layer_order() -> None:
    found = upward_imports()
    new = {edge: where for edge, where in found.items() if edge not in KNOWN_UPWARD}
    assert not new, f"imports from a higher layer or a sibling (see docs/ARCHITECTURE.md 'Layers'): {new}"
    gone = sorted(set(KNOWN_UPWARD) - set(found))
    assert not gone, f"fixed, so remove them from KNOWN_UPWARD: {gone}"


@pytest.mark.parametrize("source, expected", [
    ("from pdlaunch.engine import scheduler\n", ["pdlaunch.engine.scheduler"]),
    ("from pdlaunch.engine.scheduler import Scheduler\n", ["pdlaunch.engine.scheduler"]),
    ("import pdlaunch.engine.scheduler\n", ["pdlaunch.engine.scheduler"]),
    ("def f():\n    from pdlaunch.engine.scheduler import Scheduler\n", ["pdlaunch.engine.scheduler"]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pdlaunch.engine import llm_engine\n",
     ["pdlaunch.engine.llm_engine"]),
    ("from .scheduler import Scheduler\n", ["pdlaunch.engine.scheduler"]),
    ("import torch\n", []),
])
def test_imports_are_read_everywhere(tmp_path: Path, source: str, expected: list[str]) -> None:
    """The reader sees lazy, TYPE_CHECKING and relative imports (a reader that missed them would pass
    every layering check)."""
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert [target for target, _, _ in imports_of("pdlaunch.engine.probe", path)] == expected


def test_lazy_marker_exempts_only_the_layer_order(tmp_path: Path) -> None:
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from pdlaunch.engine.llm_engine import LLMEngine  # layering: lazy\n")
    assert imports_of("pdlaunch.config.probe", path) == [("pdlaunch.engine.llm_engine", 2, True)]


@pytest.mark.parametrize("module", ["pdlaunch.proxy.__main__", "pdlaunch.cli"])
def test_the_proxy_and_the_cli_start_without_torch(module: str) -> None:
    """A proxy process (one per deployment, one per bench run) and the CLI import no torch: it costs a proxy
    2-3 s of a loaded core and ~300 MB before it answers, and the proxy never computes with it."""
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"{module} imports torch: {result.stdout.strip()[:300]}"


def test_a_cpu_instance_starts_without_torch_dynamo() -> None:
    """The engine imports torch, but not torch._dynamo (~2 s of a CPU instance's start): attention's lower-right
    causal mask takes torch.nn.attention.bias, which imports it, only on CUDA (model/attention.py)."""
    code = "import sys, pdlaunch.server.__main__, pdlaunch.engine.llm_engine; print('torch._dynamo' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", "the engine imports torch._dynamo"


def test_a_cpu_deployment_is_validated_and_planned_without_torch(tmp_path: Path) -> None:
    """The launcher of a `--device cpu` deployment starts its instances ~2 s sooner without torch: validation and
    the plan ask the host's devices through memory/host_devices.py, which imports torch only for a CUDA question."""
    code = (
        "import sys\n"
        "from pdlaunch.config.loader import load_valid_deployment\n"
        "from pdlaunch.launcher.plan import plan_deployment\n"
        f"cfg = load_valid_deployment(None, {{'model': {{'path': 'tiny'}}, 'device': 'cpu',\n"
        f"    'log_dir': {str(tmp_path)!r},\n"
        f"    'proxy': {{'port': {free_port()}}},\n"
        "    'instances': [{'role': 'prefill', 'count': 1}, {'role': 'decode', 'count': 1}]})\n"
        "plan = plan_deployment(cfg)\n"
        "print(len(plan.instances), 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["2", "False"], result.stdout
