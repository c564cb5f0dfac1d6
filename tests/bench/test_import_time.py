"""bench/import_time.py as a user types it: one interpreter, two modules, one repeat."""

import importlib.metadata
import json
import sys

from tests.command_helpers import run


def test_records_each_modules_import_time_and_the_versions(tmp_path):
  out = tmp_path / "import_time.json"
  proc = run(["bench/import_time.py", "--modules=json,ml_dtypes", "--repeats=1",
              f"--out={out}"], timeout=120)
  assert proc.returncode == 0, proc.stderr
  record = json.loads(out.read_text())
  assert json.loads(proc.stdout) == record
  [interpreter] = record["interpreters"]
  assert interpreter["python"] == sys.executable
  assert interpreter["versions"]["ml_dtypes"] == importlib.metadata.version("ml_dtypes")
  seconds = interpreter["best_import_seconds"]
  assert sorted(seconds) == ["json", "ml_dtypes"] and all(0 < s < 60 for s in seconds.values())
