"""Reading files a user hands us, safely: regular files only, bounded sizes, checked images.

Every reader of user-supplied files (the folder indexer, the folder source's training reads,
`predict`, the weights readers) opens them through here, so that a FIFO, a device (a symlink to
/dev/zero named `x.png`), a huge file or a decompression bomb (a 1 MB PNG that decodes to
20000 x 20000 pixels) is refused with one line naming the file, before anything blocks or
allocates. Names are printed through `printable`, so a file name cannot forge lines of output.
Standard library (and PIL for image headers, imported when needed): no TensorFlow, no JAX.

Limits (environment variables override them for a whole process):
  NFNETS_MAX_IMAGE_PIXELS   width x height of one image, times its frames for an animation
                            (default 89,478,485: PIL's own decompression-bomb threshold,
                            e.g. 9459 x 9459)
  NFNETS_MAX_FILE_BYTES     bytes of one image file read into memory (default 512 MiB)
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
from typing import BinaryIO, Optional

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
DEFAULT_MAX_FILE_BYTES = 512 << 20
# The image files a folder data set and `predict` take (a folder that trains is one that
# predicts); names starting with "." are skipped by both.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# The largest side, in pixels, a model is run at (data.image_size, data.eval_image_size, a
# weights file's eval_image_size). The largest of any variant is NF-RegNet-B8's 672 px test size
# (NFNet-F7: 608); 1024 leaves room for higher-resolution evaluation, while a typo such as 60000
# would need 43 GB for one float32 image and be killed for memory instead of refused.
MAX_IMAGE_SIZE = 1024


def _positive_env_int(name: str, default: int) -> int:
  raw = os.environ.get(name, "")
  text = raw.strip().replace("_", "")  # 100_000_000 reads as Python would.
  if not text:
    return default
  if not (text.isascii() and text.isdigit()) or int(text) < 1:
    raise ValueError(f"{name} must be a positive whole number, got {printable(raw)!r}; "
                     "unset it for the default")
  return int(text)


def max_image_pixels() -> int:
  return _positive_env_int("NFNETS_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS)


def max_file_bytes() -> int:
  return _positive_env_int("NFNETS_MAX_FILE_BYTES", DEFAULT_MAX_FILE_BYTES)


class UnreadableFileError(ValueError):
  """A file cannot be used: not a regular file, too large, or not a readable image."""


class NotRegularFileError(UnreadableFileError):
  """A FIFO, device, socket or directory where a file was expected (refused without reading)."""


class OverLimitError(UnreadableFileError):
  """A file over NFNETS_MAX_FILE_BYTES, or an image over NFNETS_MAX_IMAGE_PIXELS."""


def _kind(mode: int) -> str:
  for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                     (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                     (stat.S_ISDIR, "a directory")):
    if test(mode):
      return name
  return "not a regular file"


def _open_fd(path: str, hint: str) -> int:
  """A descriptor of `path`, opened non-blocking, refused unless it is a regular file."""
  try:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
  except OSError as e:
    # open() itself refuses a socket (ENXIO): say what the path is rather than errno's words.
    if e.errno == errno.ENXIO:
      mode = os.stat(path).st_mode
      if not stat.S_ISREG(mode):
        raise NotRegularFileError(
            f"{printable(path)}: {_kind(mode)}, not a regular file{hint}") from None
    raise
  mode = os.fstat(fd).st_mode
  if not stat.S_ISREG(mode):
    os.close(fd)
    raise NotRegularFileError(f"{printable(path)}: {_kind(mode)}, not a regular file{hint}")
  return fd


def open_regular(path: str, hint: str = "") -> BinaryIO:
  """`path` opened for binary reading, refused (one line + `hint`) unless a regular file.

  Opened non-blocking, so a FIFO cannot block the open, and checked with fstat on the open
  descriptor, so a path swapped between a check and the open cannot slip through.

  Raises:
    NotRegularFileError: not a regular file (after following symlinks).
    OSError: it cannot be opened (missing, permissions).
  """
  fd = _open_fd(path, hint)
  os.set_blocking(fd, True)
  return os.fdopen(fd, "rb")


def read_regular_file(path: str, max_bytes: Optional[int] = None) -> bytes:
  """The bytes of `path`, refusing anything but a regular file of at most `max_bytes`.

  Raises:
    NotRegularFileError: not a regular file (after following symlinks).
    OverLimitError: larger than the limit.
    OSError: the file cannot be opened or read (missing, permissions).
  """
  limit = max_file_bytes() if max_bytes is None else max_bytes
  fd = _open_fd(path, "")
  try:
    info = os.fstat(fd)
    if info.st_size > limit:
      raise OverLimitError(f"{printable(path)}: {info.st_size:,} bytes, over the limit of "
                           f"{limit:,} (NFNETS_MAX_FILE_BYTES)")
    chunks, total = [], 0
    while True:
      chunk = os.read(fd, 1 << 20)
      if not chunk:
        break
      total += len(chunk)
      if total > limit:  # The file grew while being read.
        raise OverLimitError(f"{printable(path)}: over the limit of {limit:,} bytes "
                             "(NFNETS_MAX_FILE_BYTES)")
      chunks.append(chunk)
    return b"".join(chunks)
  finally:
    os.close(fd)


def _image_header(data: bytes, where: str) -> tuple[int, int, int]:
  """(width, height, frames) from an encoded image's headers, without decoding its pixels."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as image:
      # Frames count because TensorFlow's GIF decoder holds every frame of an animation in
      # memory even when only the first is returned; counting them reads frame headers only.
      frames = int(getattr(image, "n_frames", 1) or 1)
      return int(image.width), int(image.height), frames
  except Image.DecompressionBombError as e:  # PIL's own hard limit, at twice its warning.
    found = re.search(r"\((\d+) pixels\).*?limit of (\d+)", str(e))
    size = (f"{int(found[1]):,} pixels, over PIL's decompression-bomb limit of {int(found[2]):,}"
            if found else _plain(e))
    raise OverLimitError(f"{printable(where)}: {size}; resize it first") from None
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds on bad headers)
    raise UnreadableFileError(f"{printable(where)}: not a readable image ({_plain(e)})") from None


def image_dimensions(data: bytes, where: str) -> tuple[int, int]:
  """(width, height) from an encoded image's header, without decoding its pixels.

  Raises:
    UnreadableFileError: the header is not one of a known image format.
  """
  width, height, _ = _image_header(data, where)
  return width, height


def check_image_pixels(data: bytes, where: str, max_pixels: Optional[int] = None) -> None:
  """Refuses an image whose headers declare more than `max_pixels` pixels (before decoding).

  The pixels of every frame of an animation count (see `_image_header`).

  Raises:
    OverLimitError: over the limit.
    UnreadableFileError: the header is not one of a known image format.
  """
  limit = max_image_pixels() if max_pixels is None else max_pixels
  width, height, frames = _image_header(data, where)
  if width * height * frames > limit:
    size = f"{width} x {height} pixels" + (f" x {frames} frames" if frames > 1 else "")
    raise OverLimitError(
        f"{printable(where)}: {size}, over the limit of {limit:,} "
        "(NFNETS_MAX_IMAGE_PIXELS); resize it first or raise the limit")


def read_image_file(path: str, max_pixels: Optional[int] = None) -> bytes:
  """The encoded bytes of an image file, checked as a regular file within the pixel limit."""
  data = read_regular_file(path)
  check_image_pixels(data, path, max_pixels)
  return data


def printable(text: str) -> str:
  """`text` safe to print on one terminal line: control characters and escapes shown as \\x.."""
  return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _plain(error: BaseException) -> str:
  """An exception's first line, without library internals (PIL names the buffer it was handed,
  "cannot identify image file <_io.BytesIO object at 0x7f...>")."""
  text = str(error).strip().splitlines()
  line = re.sub(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>", "", text[0]) if text else ""
  return printable(line[:200]) if line else type(error).__name__
