"""The package's layout: wings import only downward, no import cycles, a short top level.

Layers, lowest first (a module may import its own layer and the ones below it):
  infra -> data, models -> active -> deep -> workdirs -> webapp -> the commands at the top.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "rare_jax"
LAYERS = {"infra": 0, "data": 1, "models": 1, "active": 2, "deep": 3, "workdirs": 4, "webapp": 5}
TOP = 6  # the commands and the package face


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
  """The rare_jax modules that `name` imports (anywhere in it, top level or in a function)."""
  out = set()
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      out.update(alias.name for alias in node.names if alias.name.startswith("rare_jax"))
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
        base = base.rstrip(".")
      if not base.startswith("rare_jax"):
        continue
      for alias in node.names:
        candidate = f"{base}.{alias.name}"
        out.add(candidate if candidate in modules else base)
  return out - {name}


def _layer(module: str) -> int:
  parts = module.split(".")
  if len(parts) == 1:
    return TOP  # rare_jax itself
  return LAYERS.get(parts[1], TOP)


@pytest.fixture(scope="module")
def graph():
  modules = _modules()
  return {name: _imports(name, path, modules) for name, path in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
  """Each import of a module from a higher layer than the importer's, as a sentence."""
  return [
    f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})"
    for name, deps in sorted(graph.items())
    for dep in sorted(deps)
    if _layer(dep) > _layer(name) and dep != "rare_jax"
  ]


def import_cycles(graph: dict[str, set[str]]) -> list[str]:
  """Each import cycle found by a depth-first walk, as `a -> b -> a`."""
  state, cycles = {}, []

  def visit(node, stack):
    state[node] = "open"
    for dep in sorted(graph.get(node, ())):
      if dep not in graph or dep == "rare_jax":
        continue
      if state.get(dep) == "open":
        cycles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
      elif dep not in state:
        visit(dep, stack + [dep])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  return cycles


def test_no_import_reaches_a_higher_layer(graph):
  assert not upward_imports(graph), "\n".join(upward_imports(graph))


def test_no_import_cycles(graph):
  assert not import_cycles(graph), "\n".join(import_cycles(graph))


def test_top_level_is_short():
  top = sorted(p.name for p in PACKAGE.glob("*.py"))
  assert len(top) <= 12, top


def test_the_checks_see_an_upward_import_and_a_cycle(graph):
  """The checks can fail: the real graph with an infra module importing the runner, and the
  runner importing the webapp back, is caught by both."""
  broken = {name: set(deps) for name, deps in graph.items()}
  broken["rare_jax.infra.sharding"].add("rare_jax.active.runner")
  assert upward_imports(broken) == [
    "rare_jax.infra.sharding (layer 0) imports rare_jax.active.runner (layer 2)"
  ]
  broken["rare_jax.active.runner"].add("rare_jax.infra.sharding")
  assert any("rare_jax.infra.sharding" in cycle for cycle in import_cycles(broken))
  assert _imports(  # the parser finds what the runner imports
    "rare_jax.active.runner", PACKAGE / "active" / "runner.py", _modules()
  ) >= {"rare_jax.active.loop", "rare_jax.infra.sharding"}
