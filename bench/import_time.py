"""Seconds to import a module in a fresh interpreter: what every command pays before it starts.

  python bench/import_time.py --modules=ml_dtypes,jax --python=VENV_A/bin/python,VENV_B/bin/python

Each interpreter (e.g. venvs that differ in one package) imports each module in a new process,
the interpreters alternated, `--repeats` times; the best time per pair is kept (Python's
`-X importtime` total for the module, so interpreter start-up is not counted). The record holds
the versions of `--versions` packages seen by each interpreter and the load average.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys


def _import_seconds(python: str, module: str) -> float:
  proc = subprocess.run([python, '-X', 'importtime', '-c', f'import {module}'],
                        capture_output=True, text=True, check=True)
  # The module's own line is the last one that names it at the top level (no indentation).
  for line in reversed(proc.stderr.splitlines()):
    fields = line.split('|')
    if len(fields) == 3 and fields[2].rstrip() == f' {module}':
      return int(fields[1]) / 1e6
  raise RuntimeError(f'{python}: no import time for {module}')


def _versions(python: str, packages: list[str]) -> dict:
  code = ('import importlib.metadata as m, json, sys\n'
          f'out = {{"python": sys.version.split()[0]}}\n'
          f'for p in {packages!r}:\n'
          '  try: out[p] = m.version(p)\n'
          '  except m.PackageNotFoundError: out[p] = None\n'
          'print(json.dumps(out))')
  return json.loads(subprocess.run([python, '-c', code], capture_output=True, text=True,
                                   check=True).stdout)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--modules', default='ml_dtypes,jax', help='comma list of modules')
  parser.add_argument('--python', default=sys.executable,
                      help='comma list of interpreters to compare (default: this one)')
  parser.add_argument('--versions', default='numpy,ml_dtypes,jax',
                      help='comma list of packages whose versions are recorded')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--note', default='', help='what the interpreters are, for the record')
  parser.add_argument('--out', default=None, help='JSON file to write (default: print only)')
  args = parser.parse_args(argv)
  pythons, modules = args.python.split(','), args.modules.split(',')
  best = {(p, m): float('inf') for p in pythons for m in modules}
  load_before = os.getloadavg()
  for _ in range(args.repeats):
    for module in modules:
      for python in pythons:
        best[python, module] = min(best[python, module], _import_seconds(python, module))
  record = {
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
      'machine': f'{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}',
      'load_average_before_after': [list(load_before), list(os.getloadavg())],
      'note': args.note,
      'repeats': args.repeats,
      'interpreters': [{'python': p, 'versions': _versions(p, args.versions.split(',')),
                        'best_import_seconds': {m: round(best[p, m], 4) for m in modules}}
                       for p in pythons],
  }
  print(json.dumps(record, indent=1))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(record, f, indent=1)
  return record


if __name__ == '__main__':
  main()
