"""Text files replaced whole: a reader sees the old file or the complete new one, never a torn
one, and a failed write (a full disk, a bad row, an interrupt) leaves no temporary file."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from typing import TextIO


@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, newline: str | None = None) -> Iterator[TextIO]:
  """Yields a new UTF-8 text file that replaces `path` when the block ends without an error.

  The file is `PATH.PID.RANDOM.tmp` in `path`'s folder (created if missing; the same file
  system, so the rename is atomic), opened with O_EXCL (never through a link planted at that
  name) and with the umask's permissions, as any new file; it is flushed, fsynced and renamed
  over `path`. On any error it is removed and the error raised.

  Raises:
    ValueError: `path` is a folder.
    OSError: the file cannot be written.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise ValueError(f"{path!r} is a folder; expected a file name")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with open(fd, "w", encoding="utf-8", newline=newline) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):  # already renamed: the original error is the one to report
      os.unlink(tmp)
    raise
