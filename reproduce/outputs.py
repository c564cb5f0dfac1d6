"""Where the reproduction scripts write, and the plain-text formats they write.

Every script writes machine-readable JSON and a Markdown table into `RESULTS_DIR` and its
figure into `FIGURES_DIR`, so the README can embed the same files a user regenerates.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import time
from collections.abc import Sequence
from typing import Any

REPRODUCE_DIR = pathlib.Path(__file__).resolve().parent
RESULTS_DIR = REPRODUCE_DIR / 'results'
FIGURES_DIR = REPRODUCE_DIR / 'figures'


def use_agg_backend() -> None:
  """Selects matplotlib's file-only backend (no display on CI or servers); call before pyplot."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')


def machine_note() -> str:
  """One line naming the CPU count and date, for the provenance of timings."""
  return (f'{os.cpu_count()} CPU cores ({platform.machine()}), '
          f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}')


def write_json(name: str, payload: Any, directory: pathlib.Path | None = None) -> pathlib.Path:
  """Writes `payload` as indented JSON to `<directory>/<name>.json` and returns the path."""
  directory = RESULTS_DIR if directory is None else pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / f'{name}.json'
  path.write_text(json.dumps(payload, indent=2, sort_keys=False) + '\n')
  return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub-flavoured Markdown table; every row must have len(header) cells."""
  for row in rows:
    if len(row) != len(header):
      raise ValueError(f'Row {row!r} has {len(row)} cells, the header has {len(header)}.')
  lines = ['| ' + ' | '.join(str(h) for h in header) + ' |',
           '|' + '|'.join('---' for _ in header) + '|']
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def write_markdown(name: str, text: str, directory: pathlib.Path | None = None) -> pathlib.Path:
  """Writes `text` to `<directory>/<name>.md` and returns the path."""
  directory = RESULTS_DIR if directory is None else pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / f'{name}.md'
  path.write_text(text)
  return path
