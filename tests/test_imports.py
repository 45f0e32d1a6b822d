"""No import cycles between clip_jax's modules, counting imports inside functions too.

A module's graph edge goes to each clip_jax module it imports (`import a.b`, `from a import b`
where b is a module, or `from a import name`, which imports a's __init__). A package that
imports its submodule and a submodule that imports names from its package's __init__ form a
cycle as much as two sibling modules do (clip_jax.convert <-> clip_jax.convert.__main__ was
one).
"""
import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "clip_jax"


def module_files() -> dict[str, pathlib.Path]:
  modules = {}
  for path in PACKAGE.rglob("*.py"):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    modules[".".join(parts)] = path
  return modules


def import_graph() -> dict[str, set[str]]:
  modules = module_files()

  def owner(name: str) -> str:  # the longest prefix of `name` that is one of our modules
    while name and name not in modules:
      name = name.rpartition(".")[0]
    return name

  graph = {name: set() for name in modules}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      targets = []
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          parents = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(parents + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                   for a in node.names]
      for target in map(owner, targets):
        if target and target != name:
          graph[name].add(target)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_the_checker_finds_a_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert cycles(graph) == [["a", "b", "c"]]
  graph = import_graph()
  assert "clip_jax.step" in graph["clip_jax.train"] or any(
      "clip_jax.step" in deps for deps in graph.values())
  assert "clip_jax.convert" in graph["clip_jax.convert.__main__"]


def test_no_import_cycles():
  assert cycles(import_graph()) == []
