"""Every command in README.md and docs/*.md runs a command that exists, with flags it takes.

Commands are read from fenced code blocks and inline code spans (lines starting `python
experiment.py`, `python -m nfnets....`, `python -m reproduce....`, `python reproduce/...`,
`python bench/...` or `bash run.sh`; backslash continuations joined, comments dropped). For
each: the script or module exists; each `--flag` is defined by that command (read from its
source, see tests/docs_helpers.py; tests/test_commands.py checks those against each --help);
each `--config.a.b=` key exists in the config the command names (loaded with ml_collections as
experiment.py loads it; a workdir's saved config has every key). Placeholder values (DIR,
FOLDER, W, ...) are never used, so they need no special casing.
"""

import os

import pytest

from tests.command_helpers import REPO
from tests import docs_helpers


def test_reads_commands_across_lines_and_drops_comments(tmp_path):
  text = ("Run\n```bash\npython experiment.py --config=configs/demo.py \\\n"
          "    --workdir=DIR --config.train.batch_size=8   # a comment\n"
          "pip install x\n$ python -m nfnets.predict --weights=W FOLDER\n```\n"
          "and `python bench/benchmark.py --variant=F0\n--batch=32` inline.\n")
  found = docs_helpers._commands_in(text)  # pylint: disable=protected-access
  assert found == ["python experiment.py --config=configs/demo.py --workdir=DIR "
                   "--config.train.batch_size=8 # a comment",
                   "python -m nfnets.predict --weights=W FOLDER",
                   "python bench/benchmark.py --variant=F0 --batch=32"]
  name, args = docs_helpers.split(found[0])
  assert name == "experiment.py" and docs_helpers.flag_names(args) == [
      "config", "workdir", "config.train.batch_size"]
  assert docs_helpers.split(found[1]) == ("nfnets.predict", ["--weights=W", "FOLDER"])


def _config_keys(config_arg):
  """The ConfigDict a command's --config names (the full option set for a workdir's)."""
  from nfnets.inference import loading  # pylint: disable=g-import-not-at-top
  from nfnets.train import options  # pylint: disable=g-import-not-at-top
  if config_arg is None or config_arg.endswith(".json") or config_arg.startswith(
      "configs/workdir.py"):
    return options.to_config_dict()
  return loading.read_config(config_arg)


def _has_key(config, dotted):
  for part in dotted.split("."):
    if not hasattr(config, "keys") or part not in config:
      return False
    config = config[part]
  return True


def test_every_documented_command_exists_and_takes_its_flags(monkeypatch):
  monkeypatch.syspath_prepend(REPO)  # The configs import each other as `configs.common`.
  monkeypatch.chdir(REPO)  # Documented paths are relative to the repository root.
  commands = docs_helpers.documented_commands()
  assert len(commands) >= 10, commands  # The README's commands were found at all.
  problems = []
  for doc, command in commands:
    name, args = docs_helpers.split(command)
    if name == "run.sh":
      with open(os.path.join(REPO, "run.sh")) as f:
        run_sh = f.read()
      if args[:1] == ["test"] or "--" not in args:
        continue  # Its own modes, or pytest arguments.
      # Demo mode passes what follows '--' to experiment.py with the demo config.
      assert "--config=configs/demo.py" in run_sh
      name, args = "experiment.py", ["--config=configs/demo.py", *args[args.index("--") + 1:]]
    where = f"{doc}: {command}"
    if not os.path.isfile(docs_helpers.source_of(name)):
      problems.append(f"{where}: no such command {name}")
      continue
    defined = docs_helpers.flags_of(name)
    absl = docs_helpers.uses_absl(name)
    config = None
    for flag in docs_helpers.flag_names(args):
      if flag.startswith("config.") and "config." in defined:
        if config is None:
          config = _config_keys(docs_helpers.config_path(args))
        if not _has_key(config, flag[len("config."):]):
          problems.append(f"{where}: --{flag} is not a key of its config")
      elif flag not in defined and not (absl and flag in docs_helpers.ABSL_FLAGS):
        problems.append(f"{where}: {name} has no flag --{flag}")
  assert not problems, "\n".join(problems)


@pytest.mark.parametrize("command,problem", [
    ("python -m nfnets.predict --wieghts=W x.jpg", "has no flag --wieghts"),
    ("python experiment.py --config=configs/demo.py --config.train.batchsize=8",
     "--config.train.batchsize is not a key"),
    ("python bench/nope.py --x=1", "no such command"),
])
def test_the_check_catches_a_wrong_command(monkeypatch, command, problem):
  monkeypatch.setattr(docs_helpers, "documented_commands", lambda: [("README.md", command)] * 10)
  with pytest.raises(AssertionError, match=problem):
    test_every_documented_command_exists_and_takes_its_flags(monkeypatch)
