"""Reading commands out of the docs, and the flags each command defines (not a test module).

Flags are read from each command's source with `ast` (absl `flags.DEFINE_*("name", ...)`,
ml_collections `config_flags.DEFINE_config_file("config", ...)`, argparse
`add_argument("--name", ...)`), so checking every documented command costs no process;
tests/test_commands.py checks that each command's own --help lists the same flags.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import shlex
from typing import Optional

from tests.command_helpers import REPO

# How a documented command starts: an interpreter running one of the project's entry points.
COMMAND_START = re.compile(
    r"^(python[0-9.]* (experiment\.py|-m nfnets\.[\w.]+|-m reproduce\.\w+|reproduce/\w+\.py"
    r"|bench/\w+\.py)|bash run\.sh)(\s|$)")
# absl's own flags, which every absl command takes.
ABSL_FLAGS = {"help", "helpfull", "helpshort", "helpxml", "flagfile", "undefok", "verbosity",
              "v", "logtostderr", "alsologtostderr", "log_dir", "stderrthreshold",
              "only_check_args", "pdb", "pdb_post_mortem", "run_with_profiling",
              "run_with_pdb", "use_cprofile_for_profiling", "logger_levels",
              "showprefixforinfo"}


def source_of(name: str) -> str:
  """The file of a command: 'experiment.py', 'bench/x.py', 'reproduce.x', 'nfnets.a.b'."""
  if name.endswith(".py"):
    return os.path.join(REPO, name)
  return os.path.join(REPO, *name.split(".")) + ".py"


@functools.lru_cache(maxsize=None)
def _tree(name: str) -> ast.Module:
  with open(source_of(name)) as f:
    return ast.parse(f.read())


def uses_absl(name: str) -> bool:
  return any(isinstance(node, ast.ImportFrom) and node.module == "absl"
             and any(alias.name == "flags" for alias in node.names)
             for node in ast.walk(_tree(name)))


@functools.lru_cache(maxsize=None)
def flags_of(name: str, shown_only: bool = False) -> frozenset[str]:
  """The flag names (without '--') the command's source defines; 'config.' marks a config flag.

  absl booleans are also listed negated ('noema'); argparse's BooleanOptionalAction likewise
  ('no-x'). `shown_only` leaves out argparse flags hidden from --help (help=SUPPRESS).
  """
  found = set()
  for node in ast.walk(_tree(name)):
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
      continue
    call = node.func.attr
    strings = [a.value for a in node.args if isinstance(a, ast.Constant)
               and isinstance(a.value, str)]
    if call.startswith("DEFINE_") and strings:
      found.add(strings[0])
      if call in ("DEFINE_boolean", "DEFINE_bool"):
        found.add("no" + strings[0])
      if call.startswith("DEFINE_config_"):
        found.add(strings[0] + ".")
    elif call == "add_argument":
      if shown_only and any(isinstance(k.value, ast.Attribute) and k.value.attr == "SUPPRESS"
                            for k in node.keywords if k.arg == "help"):
        continue
      options = [s[2:] for s in strings if s.startswith("--")]
      found.update(options)
      if any(isinstance(k.value, ast.Attribute) and k.value.attr == "BooleanOptionalAction"
             for k in node.keywords if k.arg == "action"):
        found.update("no-" + o for o in options)
  return frozenset(found)


def flags_in_help(text: str) -> set[str]:
  """Flag names a --help/--helpfull text shows ('--[no]ema' gives 'ema' and 'noema')."""
  found = set()
  for negatable, flag in re.findall(r"--(\[no\])?([A-Za-z][\w.-]*)", text):
    found.add(flag)
    if negatable:
      found.add("no" + flag)
    if flag.endswith("no-") or flag.startswith("no-"):
      found.add(flag)
  # argparse shows BooleanOptionalAction as '--x, --no-x' (both caught above); absl shows a
  # config flag as '--config' with overrides described in its text.
  return found | {f + "." for f in found}


def _commands_in(text: str) -> list[str]:
  """Commands in fenced code blocks and inline code spans, backslash continuations joined."""
  blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
  commands = []
  for block in blocks:
    block = re.sub(r"\\\n\s*", " ", block)
    for line in block.splitlines():
      line = " ".join(line.split()).removeprefix("$ ")
      if COMMAND_START.match(line):
        commands.append(line)
  outside = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
  for span in re.findall(r"`([^`]+)`", outside):
    span = " ".join(span.replace("\\\n", " ").split())
    if COMMAND_START.match(span):
      commands.append(span)
  return commands


def documented_commands() -> list[tuple[str, str]]:
  """(document, command) for README.md and docs/*.md."""
  docs = [os.path.join(REPO, "README.md")]
  docs_dir = os.path.join(REPO, "docs")
  if os.path.isdir(docs_dir):
    docs += sorted(os.path.join(docs_dir, n) for n in os.listdir(docs_dir) if n.endswith(".md"))
  found = []
  for doc in docs:
    with open(doc) as f:
      found += [(os.path.relpath(doc, REPO), c) for c in _commands_in(f.read())]
  return found


def split(command: str) -> tuple[str, list[str]]:
  """(the command's name as `source_of` takes it, its arguments) of a documented command.

  Comments are dropped; for `bash run.sh`, the name is 'run.sh' and the arguments are those it
  passes to experiment.py (after '--', demo mode only).
  """
  words = shlex.split(command, comments=True)
  if words[:2] == ["bash", "run.sh"]:
    rest = words[2:]
    return "run.sh", rest
  words = words[1:]  # The interpreter.
  if words[0] == "-m":
    return words[1], words[2:]
  return words[0], words[1:]


def flag_names(args: list[str]) -> list[str]:
  """The '--name' flags among a command's arguments (values and positionals left out)."""
  return [a[2:].split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2]


def config_path(args: list[str]) -> Optional[str]:
  for a in args:
    if a.startswith("--config="):
      return a.split("=", 1)[1]
  return None
