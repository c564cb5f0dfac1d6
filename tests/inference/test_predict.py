"""`python -m nfnets.predict` as a user types it: real photos, hostile files, every mistake.

Each test starts the command in a fresh process (tests/command_helpers.py) and asserts its exit
status, what it printed and, where it matters, its peak memory. Mistakes a user can make are
one line on stderr naming the file or option and what to do, with no traceback.
"""

import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest

from tests.command_helpers import control_characters, environment, run
from tests.inference.inference_helpers import TINY, random_params
from tests.photos import photo, photo_path
from nfnets import weights
from nfnets.weights.npz import ModelSpec

PREDICT = ("-m", "nfnets.predict")
# Class names a data set folder could carry: an escape sequence that clears the screen, and a
# newline followed by text that looks like a prediction line.
HOSTILE_NAMES = [f"class{i}\x1b[2J\nforged.jpg: 1.000 cat" for i in range(10)]


def bomb_png(path, width: int, height: int) -> None:
  """A 1-bit black PNG of width x height, written row by row (~50 KB for 20000 x 20000).

  Decoded as RGB it would take width * height * 3 bytes (1.2 GB for 20000 x 20000).
  """
  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  compressor = zlib.compressobj(9)
  row = b"\x00" * (1 + (width + 7) // 8)  # Filter type 0, then the packed bits.
  body = b"".join(compressor.compress(row * 500) for _ in range(height // 500))
  body += compressor.compress(row * (height % 500)) + compressor.flush()
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n")
    f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)))
    f.write(chunk(b"IDAT", body))
    f.write(chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """Weights (good, int32, garbage), real photos and a folder of hostile files."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("predict_cli")
  spec = ModelSpec("NFNet", 10, TINY["NFNet"], eval_image_size=32, class_names=HOSTILE_NAMES)
  params = random_params("NFNet", num_classes=10)
  weights.save_params(root / "tiny.npz", params, model=spec)
  # Our npz layout with int32 arrays (save_params itself refuses to write them).
  np.savez(root / "int32.npz", **{f"{m}::{k}": (100 * v).astype(np.int32)
                                  for m, leaves in params.items() for k, v in leaves.items()})
  (root / "garbage.npz").write_text("these are not weights\n")
  (root / "not_a_run").mkdir()
  (root / "out").mkdir()
  shutil.copy(photo_path("grace_hopper"), root / "grace.jpg")
  Image.fromarray(photo("china")[:200, :300]).save(root / "china.png")
  folder = root / "folder"
  folder.mkdir()
  Image.fromarray(photo("flower")).save(folder / "flower.jpg")
  shutil.copy(photo_path("grace_hopper"), folder / "name\x1b[31m\nforged.jpg: 1.000 x.jpg")
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  os.mkfifo(folder / "pipe.png")
  os.symlink("/dev/zero", folder / "zero.jpg")
  bomb_png(folder / "bomb.png", 20000, 20000)
  (folder / "notes.txt").write_text("not an image: ignored by extension")
  return root


def test_classifies_files_and_folders_and_refuses_hostile_files_without_blocking(root):
  out = root / "out" / "predictions.json"
  proc = run([*PREDICT, f"--weights={root / 'tiny.npz'}", f"--json={out}", "--batch_size=2",
              str(root / "grace.jpg"), str(root / "china.png"), str(root / "missing.jpg"),
              str(root / "folder")], timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "Traceback" not in proc.stderr and "function_node" not in proc.stderr, proc.stderr
  # Nothing from a file or class name reaches the terminal raw: no escapes, no forged lines.
  assert not control_characters(proc.stdout + proc.stderr)
  lines = proc.lines()
  assert len(lines) == 4, lines  # grace, china, flower and the oddly named copy of grace.
  assert all(line.count(" | ") == 4 for line in lines)  # Top 5 classes.
  assert any(r"name\x1b[31m\nforged.jpg" in line for line in lines), lines
  assert all(r"class" in line and r"\x1b[2J\n" in line for line in lines)
  skipped = {line.split(":", 1)[0]: line for line in proc.lines("stderr")
             if line.startswith("skipped ")}
  reasons = {os.path.basename(k.split(" ", 1)[1]): v for k, v in skipped.items()}
  assert sorted(reasons) == ["bomb.png", "broken.jpg", "missing.jpg", "pipe.png", "zero.jpg"]
  assert "does not exist" in reasons["missing.jpg"]
  assert "FIFO" in reasons["pipe.png"]
  assert "character device" in reasons["zero.jpg"]
  assert "not a readable image" in reasons["broken.jpg"]
  assert "pixels" in reasons["bomb.png"] and "limit" in reasons["bomb.png"]
  # The 20000 x 20000 PNG is refused from its header: decoding it would take 1.2 GB.
  assert proc.peak_rss_mb < 1000, proc.peak_rss_mb
  assert any(line.startswith("progress: ") for line in proc.lines("stderr")), proc.stderr
  assert "4 image(s) classified with " in proc.stderr and "5 skipped" in proc.stderr
  result = json.loads(out.read_text())
  assert result["image_size"] == 32 and len(result["predictions"]) == 4
  assert sorted(os.path.basename(s["file"]) for s in result["skipped"]) == sorted(reasons)
  # The same model in Python agrees with the command.
  from nfnets.inference import classifier  # pylint: disable=g-import-not-at-top
  clf = classifier.Classifier.from_weights(root / "tiny.npz")
  for record in result["predictions"]:
    (top,) = clf.top_k([record["file"]], k=5)
    assert [t["index"] for t in record["top"]] == [s.index for s in top]
    np.testing.assert_allclose([t["probability"] for t in record["top"]],
                               [s.probability for s in top], rtol=1e-5)
    assert record["top"][0]["name"] == HOSTILE_NAMES[top[0].index]  # JSON keeps names as they are.


# (command-line arguments with {root} for the test folder, exit status, text of the line).
ERROR_CASES = {
    "no weights": (["--top=3", "{root}/grace.jpg"], 2, "--weights"),
    "unknown flag": (["--weights={root}/tiny.npz", "--wieghts=x", "{root}/grace.jpg"], 2,
                     "wieghts"),
    "bad --top": (["--weights={root}/tiny.npz", "--top=0", "{root}/grace.jpg"], 2, "--top"),
    "bad --batch_size": (["--weights={root}/tiny.npz", "--batch_size=0", "{root}/grace.jpg"], 2,
                         "--batch_size"),
    "no images": (["--weights={root}/tiny.npz"], 2, "no image given"),
    "missing config": (["--weights={root}/tiny.npz", "--config=configs/nope.py",
                        "{root}/grace.jpg"], 2, "configs/nope.py"),
    "missing weights": (["--weights={root}/nope.npz", "{root}/grace.jpg"], 1,
                        "nope.npz does not exist"),
    "directory that is no workdir": (["--weights={root}/not_a_run", "{root}/grace.jpg"], 1,
                                     "not_a_run is not a run's workdir"),
    "int32 weights": (["--weights={root}/int32.npz", "{root}/grace.jpg"], 1, "int32"),
    "garbage weights": (["--weights={root}/garbage.npz", "{root}/grace.jpg"], 1, "garbage.npz"),
    "json in a missing directory": (["--weights={root}/tiny.npz", "--json={root}/nodir/p.json",
                                     "{root}/grace.jpg"], 1, "nodir does not exist"),
    "json is a directory": (["--weights={root}/tiny.npz", "--json={root}/out",
                             "{root}/grace.jpg"], 1, "is a directory"),
    "weights of another model": (["--weights={root}/tiny.npz", "--variant=F0",
                                  "{root}/grace.jpg"], 1, "does not fit NFNet"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_every_mistake_is_one_line_naming_the_file_or_option(root, case):
  args, code, message = ERROR_CASES[case]
  proc = run([*PREDICT, *(a.format(root=root) for a in args)], timeout=300)
  assert proc.returncode == code, (proc.returncode, proc.stderr)
  assert proc.stdout == ""
  (line,) = proc.lines("stderr")  # One line, no traceback.
  assert line.startswith("error: ") and message in line, line


def test_nfnets_debug_shows_the_traceback(root):
  proc = run([*PREDICT, f"--weights={root / 'tiny.npz'}", f"--json={root / 'nodir' / 'p.json'}",
              str(root / "grace.jpg")], env=environment(NFNETS_DEBUG="1"))
  assert proc.returncode != 0 and "Traceback" in proc.stderr and "nodir" in proc.stderr


def test_all_images_unreadable_exits_1(root):
  proc = run([*PREDICT, f"--weights={root / 'tiny.npz'}", str(root / "folder" / "broken.jpg")])
  assert proc.returncode == 1 and proc.stdout == ""
  assert "skipped " in proc.stderr and "0 image(s) classified" in proc.stderr


def test_peak_memory_grows_with_the_batch_not_the_folder(root):
  """Images are read, preprocessed and classified one batch at a time.

  The model evaluates at 160 px (300 KiB per preprocessed image), so a command holding a
  folder's images at once would grow by ~25 MB from 8 to 48 images (the images, then their
  stacked copy); measured, streaming grows by ~2 MB, and a batch of 32 instead of 4 adds ~130 MB. `-X importtime` lists every module the command imports: inference must not
  need TensorFlow.
  """
  spec = ModelSpec("NFNet", 10, TINY["NFNet"], eval_image_size=160)
  weights.save_params(root / "tiny160.npz", random_params("NFNet", num_classes=10), model=spec)
  for count in (8, 48):
    folder = root / f"memory_{count}"
    folder.mkdir()
    for i in range(count):  # Hard links: many files, one photo on disk.
      os.link(root / "grace.jpg", folder / f"{i:03d}.jpg")

  # Compile the batch-4, -16 and -32 programs here, into the suite's persistent cache the
  # commands read: a compile inside a measured run would add its own transient memory.
  from nfnets.inference import classifier  # pylint: disable=g-import-not-at-top
  clf = classifier.Classifier.from_weights(root / "tiny160.npz", batch_size=32)
  for batch in (4, 16, 32):
    clf.logits_of(np.zeros((batch, 160, 160, 3), np.float32))

  def peak(count, batch, importtime=False):
    proc = run([*(["-X", "importtime"] if importtime else []), *PREDICT,
                f"--weights={root / 'tiny160.npz'}", f"--batch_size={batch}", "--top=1",
                str(root / f"memory_{count}")], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.lines()) == count
    return proc

  small = peak(8, 4, importtime=True)
  imported = {line.rsplit("|", 1)[-1].strip() for line in small.stderr.splitlines()
              if line.startswith("import time:")}
  assert "jax" in imported and not any(m.split(".")[0] == "tensorflow" for m in imported)
  large = peak(48, 4)
  large_batch = peak(48, 32)
  assert large.peak_rss_mb - small.peak_rss_mb < 15, (small.peak_rss_mb, large.peak_rss_mb)
  # 32 preprocessed images (10 MB), their activations and the batch-32 program.
  assert large_batch.peak_rss_mb - large.peak_rss_mb > 30, (large.peak_rss_mb,
                                                            large_batch.peak_rss_mb)
