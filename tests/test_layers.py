"""The package's imports go only down its layers, at the top of each
module, with no cycle (tests/inference checks that loading and sampling a
model imports no training code)."""
import ast
import os

ROOT = os.path.join(os.path.dirname(__file__), "..", "unimm")

# Layer of each module prefix (the longest prefix wins); a module may import
# its own layer or a lower one (DESIGN.md "Layers and layout").
LAYERS = {
    "unimm.nn": 0, "unimm.parallel": 0, "unimm.sampling": 0,
    "unimm.config_lib": 0, "unimm.progress": 0, "unimm.host_memory": 0,
    "unimm.errors": 0, "unimm.paths": 0,
    "unimm.models": 1, "unimm.tokenizers": 1,
    "unimm.checkpoints": 2,
    "unimm.data": 3, "unimm.evaluation": 3,
    "unimm.inference": 4, "unimm.api": 4,
    "unimm.train": 5,
    "unimm.main": 6, "unimm.experiments": 6, "unimm.end_to_end": 6,
    "unimm.plan": 6, "unimm.export": 6, "unimm.tools": 6,
    "unimm": 6,  # the package's __init__ re-exports the API (its version)
}
NAMES = {0: "core", 1: "models/tokenizers", 2: "checkpoints",
         3: "data/evaluation", 4: "inference", 5: "train", 6: "apps"}
# Imports allowed inside functions: optional heavy libraries only.
LAZY_OK = ("torch", "transformers", "tensorflow", "safetensors", "pyarrow")


def _modules() -> dict[str, str]:
  found = {}
  for folder, _, names in os.walk(ROOT):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3]
        module = rel.replace(os.sep, ".")
        found[module.removesuffix(".__init__")] = path
  return found


def layer(module: str) -> int:
  parts = module.split(".")
  for n in range(len(parts), 0, -1):
    if ".".join(parts[:n]) in LAYERS:
      return LAYERS[".".join(parts[:n])]
  raise AssertionError(f"{module} is in no layer; add it to LAYERS.")


def _imports(module: str, path: str, modules) -> list[tuple[str, int, bool]]:
  """(imported unimm module, line, at top level) of a module's imports."""
  tree = ast.parse(open(path).read())
  top = {id(n) for n in tree.body}
  package = module if path.endswith("__init__.py") else module.rpartition(
      ".")[0]
  out = []
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) -
                                          node.level + 1] + [base]).strip(".")
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
               for a in node.names]
    for name in names:
      out.append((name, node.lineno, id(node) in top))
  return out


MODULES = _modules()
EDGES = {m: [(n, line, at_top) for n, line, at_top in _imports(m, p, MODULES)]
         for m, p in MODULES.items()}


def test_imports_go_only_down_the_layers():
  wrong = []
  for module, edges in EDGES.items():
    for name, line, _ in edges:
      if name.split(".")[0] != "unimm" or name == "unimm" and (
          module == "unimm"):
        continue
      if layer(name) > layer(module):
        wrong.append(f"{MODULES[module]}:{line}: {module} "
                     f"({NAMES[layer(module)]}) imports {name} "
                     f"({NAMES[layer(name)]})")
  assert not wrong, "\n".join(wrong)


def test_imports_are_at_the_top_of_each_module():
  lazy = [f"{MODULES[m]}:{line}: import of {name} inside a block"
          for m, edges in EDGES.items() for name, line, at_top in edges
          if not at_top and not name.split(".")[0] in LAZY_OK]
  assert not lazy, "\n".join(lazy)


def test_there_is_no_import_cycle():
  graph = {m: sorted({n for n, _, _ in e if n in MODULES and n != m})
           for m, e in EDGES.items()}
  graph["unimm"] = []  # every submodule import runs the package first
  state, stack, cycles = {}, [], []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in graph[node]:
      if state.get(nxt) == "open":
        cycles.append(stack[stack.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node)
  assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_layer_test_sees_a_wrong_import(tmp_path):
  """The checks above are not vacuous: a planted upward import is caught."""
  bad = tmp_path / "bad.py"
  bad.write_text("from unimm.train import trainer\n")
  edges = _imports("unimm.models.bad", str(bad), MODULES)
  assert [(n, layer(n) > layer("unimm.models.bad")) for n, _, _ in edges
          ] == [("unimm.train.trainer", True)]
