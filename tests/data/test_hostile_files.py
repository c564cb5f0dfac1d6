"""Hostile folder data sets: files that block, never end, or decode to gigabytes; forged names.

Every attack here is checked where the folder indexer (nfnets/data/folder.py) and the training
reads (nfnets/data/sources.py) meet it. Anything that could block or eat memory on a regression
is bounded: FIFOs are released by a helper thread after a deadline, and /dev/zero is read only
in a child process with a capped address space and a timeout.
"""

import contextlib
import os
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib

from PIL import Image
import pytest

from nfnets import files
from nfnets.data import folder
from nfnets.data import sources
from nfnets.data.options import DataOptions

# A reader blocked on a FIFO is released after this long, so a regression fails, not hangs.
_RELEASE_AFTER_S = 8.0


def _write_image(path, value=9, size=(12, 10), fmt="PNG"):
  Image.new("RGB", size, (value, 255 - value, 7)).save(path, format=fmt)


def _two_classes(root, per_class=3):
  for name in ("cat", "dog"):
    (root / name).mkdir(parents=True, exist_ok=True)
    for k in range(per_class):
      _write_image(root / name / f"{k}.png", 10 * k)
  return root


@contextlib.contextmanager
def _fifo_released_after(path, seconds=_RELEASE_AFTER_S):
  """Opens (and closes) the write end of the FIFO at `path` once `seconds` have passed.

  A reader blocked opening the FIFO is then released (it reads end-of-file), so a test of
  code that blocks on FIFOs fails on its elapsed time instead of hanging the suite.
  """
  done = threading.Event()

  def release():
    if done.wait(seconds):
      return
    while not done.is_set():
      try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
      except OSError:  # No reader has it open at this instant.
        pass
      time.sleep(0.05)

  thread = threading.Thread(target=release, daemon=True)
  thread.start()
  try:
    yield
  finally:
    done.set()
    thread.join()


# --- 1. non-regular files ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_fifo_named_like_an_image_is_skipped_without_blocking(tmp_path):
  root = _two_classes(tmp_path / "data")
  os.mkfifo(root / "cat" / "pipe.png")
  start = time.monotonic()
  with _fifo_released_after(root / "cat" / "pipe.png"):
    with pytest.warns(RuntimeWarning, match=r"Skipped 1 .*1 not a regular file") as record:
      index = folder.index_folder(str(root), "train", test_fraction=0.34)
  assert time.monotonic() - start < _RELEASE_AFTER_S
  assert not any("pipe.png" in p for p in index.paths)
  assert index.num_skipped == 1 and "FIFO" in str(record[0].message)


@pytest.mark.timeout(60)
def test_a_socket_named_like_an_image_is_skipped(tmp_path):
  root = _two_classes(tmp_path / "data")
  server = socket.socket(socket.AF_UNIX)
  try:
    server.bind(str(root / "dog" / "sock.png"))
    with pytest.warns(RuntimeWarning, match="1 not a regular file"):
      index = folder.index_folder(str(root), "train", test_fraction=0.34)
  finally:
    server.close()
  assert not any("sock.png" in p for p in index.paths)


_CHILD = textwrap.dedent("""
    import resource, sys, warnings
    # Reading /dev/zero to the end allocates without bound: cap this process at 4 GiB.
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    from nfnets.data import folder, sources
    root = sys.argv[1]
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      index = folder.index_folder(root, "train", test_fraction=0.34)
    print("WARNING", " | ".join(str(w.message) for w in caught))
    print("INDEXED", len(index.paths), index.num_skipped)
    source = sources.FolderSource(root, "train", 0.34)
    # The file read for training is replaced by a device after the index was built.
    import os
    victim = source._paths[0]
    os.remove(victim)
    os.symlink("/dev/zero", victim)
    try:
      source.read([0])
      print("READ-ACCEPTED")
    except ValueError as e:
      print("READ-REFUSED", e)
""")


@pytest.mark.timeout(120)
def test_a_device_named_like_an_image_is_refused_in_the_index_and_at_read(tmp_path):
  root = _two_classes(tmp_path / "data")
  os.symlink("/dev/zero", root / "cat" / "x.png")
  os.symlink("/dev/zero", root / "dog" / ".png")  # Dot-files are never indexed.
  start = time.monotonic()
  try:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(root)], capture_output=True,
                         text=True, timeout=90)
  except subprocess.TimeoutExpired:
    pytest.fail("indexing a folder with a /dev/zero symlink did not finish in 90 s")
  assert out.returncode == 0, out.stderr[-2000:]
  lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
  assert lines["INDEXED"] == "4 1", out.stdout  # 6 images - 2 held out; x.png skipped.
  assert "a character device" in lines["WARNING"] and "x.png" in lines["WARNING"]
  assert "READ-REFUSED" in lines, out.stdout
  assert "character device" in lines["READ-REFUSED"]
  assert "\n" not in lines["READ-REFUSED"]
  assert time.monotonic() - start < 90


@pytest.mark.timeout(60)
def test_the_training_read_refuses_a_file_turned_into_a_fifo(tmp_path):
  root = _two_classes(tmp_path / "data")
  source = sources.FolderSource(str(root), "train", 0.34)
  victim = source._paths[1]  # pylint: disable=protected-access
  os.remove(victim)
  os.mkfifo(victim)
  start = time.monotonic()
  with _fifo_released_after(victim):
    with pytest.raises(files.UnreadableFileError, match=r"FIFO.*fix or remove it") as info:
      source.read([0, 1])
  assert time.monotonic() - start < _RELEASE_AFTER_S
  assert victim in str(info.value) and "\n" not in str(info.value)


# --- 2. images over the pixel limit -----------------------------------------------------------


def test_images_over_the_pixel_limit_are_skipped_before_decoding(tmp_path, monkeypatch):
  root = _two_classes(tmp_path / "data", per_class=4)
  _write_image(root / "dog" / "huge.png", size=(200, 150))
  monkeypatch.setenv("NFNETS_MAX_IMAGE_PIXELS", "10000")  # 100 x 100.
  decoded = []
  real_decode = folder.tf.io.decode_image

  def spy(data, *args, **kwargs):
    decoded.append(len(data.numpy() if hasattr(data, "numpy") else data))
    return real_decode(data, *args, **kwargs)

  monkeypatch.setattr(folder.tf.io, "decode_image", spy)
  huge_size = (root / "dog" / "huge.png").stat().st_size
  with pytest.warns(RuntimeWarning, match=r"Skipped 1 .*1 over a size limit; first of each: "
                                          r".*NFNETS_MAX_IMAGE_PIXELS") as record:
    index = folder.index_folder(str(root), "train", test_fraction=0.25)
  assert "huge.png: 200 x 150 pixels" in str(record[0].message)
  assert not any("huge.png" in p for p in index.paths) and index.num_skipped == 1
  assert len(decoded) == 8 and huge_size not in decoded  # Refused from its header alone.
  # Deterministic: the same files, in the same order, on every indexing.
  folder._CACHE.clear()  # pylint: disable=protected-access
  with pytest.warns(RuntimeWarning):
    again = folder.index_folder(str(root), "train", test_fraction=0.25)
  assert again.paths == index.paths and again.labels.tolist() == index.labels.tolist()


def _png_header_claiming(path, width, height):
  """A PNG whose IHDR claims width x height (its data is a 1 x 1 image's): header-only bomb."""
  with open(path, "wb") as f:
    Image.new("L", (1, 1)).save(f, format="PNG")
  data = bytearray(path.read_bytes())
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  data[16:29] = ihdr
  data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
  path.write_bytes(bytes(data))


def test_huge_png_headers_are_refused_at_the_default_limit(tmp_path):
  # The attack's 1.2 MB PNG decoded to 20000 x 20000 x 3 bytes (1.2 GB); its header says so.
  root = _two_classes(tmp_path / "data")
  _png_header_claiming(root / "cat" / "bomb.png", 20000, 20000)  # Over PIL's own hard limit.
  _png_header_claiming(root / "dog" / "big.png", 10000, 10000)  # Over ours (89,478,485) only.
  with pytest.warns(RuntimeWarning) as record:
    index = folder.index_folder(str(root), "train", test_fraction=0.34)
  assert len(record) == 1, [str(w.message) for w in record]  # PIL's own warning is not shown.
  message = str(record[0].message)
  assert "2 over a size limit" in message
  assert "bomb.png: 400,000,000 pixels, over PIL's decompression-bomb limit" in message
  assert not any(p.endswith(("bomb.png", "big.png")) for p in index.paths)
  with pytest.raises(files.OverLimitError, match=r"big.png: 10000 x 10000 pixels, over the limit "
                                                 r"of 89,478,485 \(NFNETS_MAX_IMAGE_PIXELS\)"):
    with pytest.warns(Image.DecompressionBombWarning):  # PIL's, outside the indexer.
      files.read_image_file(str(root / "dog" / "big.png"))


def test_animated_gif_frames_count_towards_the_pixel_limit(tmp_path, monkeypatch):
  # TensorFlow's GIF decoder holds every frame in memory, even when only the first is kept.
  root = _two_classes(tmp_path / "data")
  # 40 distinct frames (PIL merges identical ones): 40 x 3000 = 120,000 pixels.
  frames = [Image.new("RGB", (60, 50), (6 * k, 0, 0)) for k in range(40)]
  frames[0].save(root / "cat" / "many.gif", save_all=True, append_images=frames[1:])
  frames[0].save(root / "cat" / "one.gif")
  monkeypatch.setenv("NFNETS_MAX_IMAGE_PIXELS", "100000")
  with pytest.warns(RuntimeWarning, match="1 over a size limit") as record:
    index = folder.index_folder(str(root), "train", test_fraction=0.2)
  assert "many.gif: 60 x 50 pixels x 40 frames" in str(record[0].message)
  assert any(p.endswith("one.gif") for p in index.paths)
  assert not any(p.endswith("many.gif") for p in index.paths)


def test_the_training_read_refuses_an_image_grown_past_the_limit(tmp_path, monkeypatch):
  root = _two_classes(tmp_path / "data")
  source = sources.FolderSource(str(root), "train", 0.34)
  monkeypatch.setenv("NFNETS_MAX_IMAGE_PIXELS", "10000")
  _write_image(source._paths[0], size=(200, 150))  # pylint: disable=protected-access
  with pytest.raises(files.UnreadableFileError, match="200 x 150 pixels, over the limit"):
    source.read([0])


# --- 7. classes the data cannot train -----------------------------------------------------------


@pytest.mark.parametrize("layout", ["fraction", "explicit"])
def test_a_class_folder_without_any_image_is_an_error_naming_it(tmp_path, layout):
  base = tmp_path / "data"
  root = _two_classes(base / "train" if layout == "explicit" else base)
  if layout == "explicit":
    _two_classes(base / "test")
  (root / "empty_class").mkdir()
  (root / "empty_class" / "README.txt").write_text("no images here")
  with pytest.raises(ValueError, match=r"Class 'empty_class' in .* has no image file") as info:
    folder.index_folder(str(base), "train", test_fraction=0.34)
  assert "\n" not in str(info.value)


def test_a_test_split_may_lack_a_class_of_train(tmp_path):
  _two_classes(tmp_path / "train")
  (tmp_path / "test" / "cat").mkdir(parents=True)
  _write_image(tmp_path / "test" / "cat" / "0.png")
  (tmp_path / "test" / "dog").mkdir()
  assert folder.index_folder(str(tmp_path), "test").labels.tolist() == [0]


def test_a_class_left_without_training_images_is_an_error(tmp_path):
  root = _two_classes(tmp_path / "data")
  (root / "solo").mkdir()
  _write_image(root / "solo" / "only.png")
  # round(0.6 * 3) = 2 of cat's 3 images are held out; round(0.6 * 1) = 1 of solo's 1.
  with pytest.raises(ValueError, match=r"Class 'solo' .* has 1 readable image.* none is left "
                                       r"for training"):
    folder.index_folder(str(root), "train", test_fraction=0.6)


@pytest.mark.parametrize("layout", ["fraction", "explicit"])
def test_a_single_class_is_an_error(tmp_path, layout):
  base = tmp_path / "data"
  for split in (("train", "test") if layout == "explicit" else ("",)):
    (base / split / "only").mkdir(parents=True)
    for k in range(3):
      _write_image(base / split / "only" / f"{k}.png", k)
  with pytest.raises(ValueError, match=r"1 class folder \('only'\).*at least 2 classes"):
    folder.index_folder(str(base), "train", test_fraction=0.34)


# --- 8. names that could forge output lines -----------------------------------------------------


def test_names_with_newlines_and_escapes_are_printed_escaped(tmp_path):
  root = _two_classes(tmp_path / "data")
  evil = "cat\n\x1b[32mINFO all files verified\x1b[0m"
  (root / evil).mkdir()
  _write_image(root / evil / "0.png")
  _write_image(root / evil / "1.png")
  (root / evil / "bad\n\x1b[2K.png").write_bytes(b"not an image")
  with pytest.warns(RuntimeWarning) as record:
    index = folder.index_folder(str(root), "train", test_fraction=0.34)
  message = str(record[0].message)
  assert "\n" not in message and "\x1b" not in message
  assert r"bad\n\x1b[2K.png" in message
  assert evil in index.class_names  # The names themselves are data, kept as they are.
  (root / evil / "0.png").unlink()
  (root / evil / "1.png").unlink()
  folder._CACHE.clear()  # pylint: disable=protected-access
  with pytest.raises(ValueError) as info:
    folder.index_folder(str(root), "train", test_fraction=0.34)
  assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
  assert r"cat\n\x1b[32mINFO" in str(info.value)


# --- 6. image sizes in the options ----------------------------------------------------------------


@pytest.mark.parametrize("field", ["image_size", "eval_image_size"])
def test_image_sizes_are_bounded_in_the_data_options(field):
  with pytest.raises(ValueError, match=rf"data.{field} .*at most 1024") as info:
    DataOptions(**{field: 60000})
  assert "\n" not in str(info.value)
  assert getattr(DataOptions(**{field: 1024}), field) == 1024


def test_printable_escapes_control_characters():
  assert files.printable("a\nb\x1b[1mc\td") == r"a\nb\x1b[1mc\td"
  assert files.printable("naïve café ✓") == "naïve café ✓"
  assert files.printable("\x00") == r"\x00"
