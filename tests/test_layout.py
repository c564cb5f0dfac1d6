"""The package layout's rules: which part may import which, and what the public names are.

  models   imports nothing of train, data, weights, analysis or inference; importing it loads
           neither TensorFlow, scipy nor orbax;
  data     imports no JAX model, optimizer or training code;
  weights  imports numpy only (no JAX, TensorFlow or orbax);
  nothing in nfnets/ imports experiment.py, configs/, bench/ or reproduce/.
Checked on the source (every import statement of every module) and in fresh interpreters.
"""

import ast
import os
import subprocess
import sys

import pytest

import nfnets

PACKAGE = os.path.dirname(nfnets.__file__)
# part -> the parts (and top-level modules) it must never import.
FORBIDDEN = {
    "models": ("nfnets.train", "nfnets.data", "nfnets.weights", "nfnets.analysis",
               "nfnets.inference", "nfnets.augment", "tensorflow", "scipy", "orbax"),
    "data": ("nfnets.train", "nfnets.models", "nfnets.inference", "nfnets.augment", "haiku",
             "optax"),
    "weights": ("nfnets.train", "nfnets.data", "nfnets.models", "jax", "tensorflow", "orbax"),
    "augment": ("nfnets.train", "nfnets.models", "tensorflow"),
    "analysis": ("nfnets.train", "nfnets.data", "tensorflow"),
}
NEVER = ("experiment", "configs", "bench", "reproduce")


def _imports(path):
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module


def _modules():
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        yield os.path.relpath(path, PACKAGE).split(os.sep)[0], path


def test_no_module_imports_across_a_forbidden_arrow():
  bad = []
  for part, path in _modules():
    for imported in _imports(path):
      if imported.split(".")[0] in NEVER:
        bad.append((path, imported))
      for forbidden in FORBIDDEN.get(part, ()):
        if imported == forbidden or imported.startswith(forbidden + "."):
          bad.append((path, imported))
  assert not bad, bad


def test_the_rule_would_catch_a_violation(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from nfnets.train import loop\nimport tensorflow as tf\n")
  assert set(_imports(str(bad))) == {"nfnets.train", "tensorflow"}


@pytest.mark.parametrize("module,absent", [
    ("nfnets.models", ("tensorflow", "scipy", "orbax", "nfnets.train", "nfnets.data")),
    ("nfnets", ("tensorflow", "scipy", "orbax", "jax")),
    ("nfnets.weights", ("jax", "tensorflow", "orbax")),
])
def test_importing_a_part_loads_only_what_it_needs(module, absent):
  code = (f"import sys, {module}; print(sorted(m for m in sys.modules "
          f"if m.split('.')[0] in {absent!r} or m in {absent!r}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]", out.stdout


def test_public_names_resolve_lazily():
  for name in nfnets.__all__:
    assert getattr(nfnets, name) is not None, name
  with pytest.raises(AttributeError, match="no attribute 'nope'"):
    nfnets.nope  # pylint: disable=pointless-statement
