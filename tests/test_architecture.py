"""The package's floors: dependencies point down, there is no import cycle, and the optimizer needs no Lightning."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_layca"

FLOORS: dict[str, int] = {
    "argument_types": 0,
    "tags": 0,
    "sums": 0,
    "auto_choice": 0,
    "compiling": 1,
    "wrapping": 0,
    "muon": 0,
    "schedule_free": 1,
    "adapters": 0,
    "distributed": 1,
    "selection": 1,
    "schedules": 1,
    "figures": 1,
    "callbacks.records": 2,
    "step.rule": 1,
    "step.kernels": 2,
    "step.eager": 2,
    "rotation": 2,
    "start_weights": 3,
    "target_curve": 1,
    "targets": 2,
    "target_controller": 4,
    "monitored": 3,
    "measurement": 3,
    "step.base_steps": 1,
    "step.equilibrium": 1,
    "step.base_kernels": 3,
    "step.families": 3,
    "step.compiled": 4,
    "step.base_compiled": 5,
    "step": 5,
    "layers": 5,
    "rates": 5,
    "diagnostics": 5,
    "step.sgd_form": 6,
    "plan": 7,
    "stepping": 8,
    "layca": 9,
    "loggers": 9,
    "callbacks.strategies": 9,
    "callbacks.horizon": 10,
    "callbacks.output": 10,
    "callbacks.monitor": 11,
    "callbacks.layca_callback": 12,
    "callbacks": 13,
}
"""Every module of the package on its floor: a module imports only modules on lower floors (the root package, the
facade of everything, is left out)."""

MATH = (
    "sums",
    "step",
    "step.rule",
    "step.kernels",
    "step.eager",
    "step.base_steps",
    "step.base_kernels",
    "step.equilibrium",
    "step.families",
    "step.compiled",
    "step.base_compiled",
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The package's modules that ``path`` imports anywhere (functions and ``TYPE_CHECKING`` blocks included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.startswith("lightning_layca."):
                local = name.removeprefix("lightning_layca.")
                while local and local not in FLOORS:  # `from pkg import function`: the module is the prefix
                    local = local.rpartition(".")[0]
                if local:
                    found.add(local)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py") if module_name(p)}
    return {name: imports_of(path) - {name} for name, path in modules.items()}


def test_every_module_has_a_floor() -> None:
    assert set(graph()) == set(FLOORS)


def test_dependencies_point_down() -> None:
    upward = [(m, d) for m, deps in graph().items() for d in deps if FLOORS[d] >= FLOORS[m]]
    assert upward == []


def test_there_is_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(edges[module]):
            if state.get(dep) == "open":
                cycles.append([*path[path.index(dep) :], dep] if dep in path else [module, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_cycle_check_finds_a_planted_cycle(monkeypatch: pytest.MonkeyPatch) -> None:
    planted = graph()
    planted["sums"] = planted["sums"] | {"layca"}
    monkeypatch.setattr(sys.modules[__name__], "graph", lambda: planted)
    with pytest.raises(AssertionError):
        test_there_is_no_import_cycle()


def test_the_monitor_and_the_step_math_do_not_import_each_other() -> None:
    edges = graph()

    def closure(module: str) -> set[str]:
        seen, todo = set(), [module]
        while todo:
            for dep in edges[todo.pop()] - seen:
                seen.add(dep)
                todo.append(dep)
        return seen

    assert closure("callbacks.monitor") & set(MATH) == {"sums"}  # the sums are shared, below both
    # So are the compilation of kernels and the rule of when to compile: the step and the monitor each register
    # their own kernels with the one, and feed their own timings to the other.
    for shared in ("compiling", "auto_choice"):
        assert shared in closure("callbacks.monitor") and shared in closure("step.compiled") | closure("plan")
    assert not closure("rotation") & (set(MATH) - {"sums"})
    for module in MATH:
        assert not closure(module) & {"rotation", "callbacks", "callbacks.monitor", "layca", "plan"}, module


def test_the_optimizer_and_its_math_import_and_step_without_lightning() -> None:
    script = textwrap.dedent(
        """
        import sys

        class NoLightning:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("lightning", "pytorch_lightning"):
                    raise ImportError(f"{name} is not importable in this test")

        sys.meta_path.insert(0, NoLightning())
        import torch
        import lightning_layca as ll
        from lightning_layca import monitored, plan, rotation, stepping, sums, wrapping
        from lightning_layca.step import compiled, eager, families, rule

        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        opt = ll.Layca(torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), rotation_rate=0.1)
        model(torch.randn(16, 4)).square().mean().backward()
        layers = monitored.MonitoredLayers("test")
        layers.bind(model)  # the initial weights
        opt.step()
        assert layers.measure(distances=True).distances[0] > 0
        loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("lightning", "pytorch_lightning"))
        print("lightning modules:", loaded)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "lightning modules: []" in result.stdout
