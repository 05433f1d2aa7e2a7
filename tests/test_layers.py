"""The package's layers are one-way and its modules import no circle (STYLE.md, "One-way layers").

Every `import` in ddlm/ is read from the source (function-level imports included, since a late import
is still a dependency): main -> train -> eval -> sampling -> losses -> models, schedules, processes, data;
checkpoint loading goes through ddlm.checkpoints, which none of the lower layers import.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(modules: set[str]) -> dict[str, set[str]]:
    """module -> the ddlm modules it imports (`from ddlm.x import y` counts as ddlm.x.y when that is a
    module, else as ddlm.x)."""
    graph = {}
    for path in sorted((ROOT / "ddlm").rglob("*.py")):
        name = _module_name(path)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("ddlm"))
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ddlm"):
                for a in node.names:
                    sub = f"{node.module}.{a.name}"
                    deps.add(sub if sub in modules else node.module)
        graph[name] = {d for d in deps if d != name}
    return graph


def _all_modules() -> set[str]:
    return {_module_name(p) for p in (ROOT / "ddlm").rglob("*.py")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the modules (package __init__ re-exports excluded), or None."""
    edges = {m: {d for d in ds if d in graph and not _is_package(d)} for m, ds in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(edges[m]):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (found := visit(m)):
            return found
    return None


def _is_package(name: str) -> bool:
    return (ROOT / pathlib.Path(*name.split(".")) / "__init__.py").exists()


def test_no_module_imports_a_circle():
    graph = _imports(_all_modules())
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


# Modules (prefixes) that a layer must not import, and the layers it concerns.
FORBIDDEN = {
    "ddlm.sampling": ("ddlm.eval", "ddlm.train", "ddlm.main", "ddlm.serve"),
    "ddlm.eval": ("ddlm.train", "ddlm.main", "ddlm.serve"),
    "ddlm.train": ("ddlm.main", "ddlm.serve"),
    "ddlm.checkpoints": ("ddlm.models", "ddlm.loading", "ddlm.sampling", "ddlm.eval", "ddlm.train", "ddlm.main", "ddlm.serve"),
    "ddlm.loading": ("ddlm.sampling", "ddlm.eval", "ddlm.train", "ddlm.main", "ddlm.serve"),
    "ddlm.losses": ("ddlm.models", "ddlm.sampling", "ddlm.eval", "ddlm.train", "ddlm.checkpoints", "ddlm.serve"),
    "ddlm.models": ("ddlm.sampling", "ddlm.eval", "ddlm.train", "ddlm.main", "ddlm.losses", "ddlm.checkpoints", "ddlm.serve"),
    "ddlm.data": ("ddlm.models", "ddlm.sampling", "ddlm.eval", "ddlm.train", "ddlm.main", "ddlm.checkpoints", "ddlm.serve"),
    # The server is the top floor beside ddlm.main: neither imports the other.
    "ddlm.main": ("ddlm.serve",),
    "ddlm.serve": ("ddlm.main",),
    "ddlm.schedules": ("ddlm.",),
    "ddlm.processes": ("ddlm.",),
}


def _violations(graph, forbidden) -> list[str]:
    out = []
    for module, deps in graph.items():
        for layer, banned in forbidden.items():
            if module == layer or module.startswith(layer + "."):
                out += [f"{module} imports {d}" for d in sorted(deps) if d.startswith(banned)]
    return out


def test_imports_run_down_the_layers():
    assert _violations(_imports(_all_modules()), FORBIDDEN) == []


@pytest.mark.parametrize(
    "graph, expect_cycle, expect_violation",
    [
        ({"ddlm.a": {"ddlm.b"}, "ddlm.b": {"ddlm.a"}}, True, False),
        ({"ddlm.a": {"ddlm.b"}, "ddlm.b": set()}, False, False),
        ({"ddlm.sampling.cli": {"ddlm.eval.sample_quality"}, "ddlm.eval.sample_quality": set()}, False, True),
    ],
)
def test_the_checks_see_a_circle_and_an_upward_import(graph, expect_cycle, expect_violation):
    assert (_cycle(graph) is not None) == expect_cycle
    assert bool(_violations(graph, FORBIDDEN)) == expect_violation
