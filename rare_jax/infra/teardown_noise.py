"""Silences one known piece of library teardown noise in the commands: "Event loop is closed".

When Orbax fails to restore a damaged checkpoint, its `run_sync` runs the restore in a fresh
asyncio loop with `run_until_complete` and closes the loop as soon as the first array read
fails, while the reads of the other arrays (one per array and device: 8 on 8 devices) are
still pending in TensorStore. When each finishes, TensorStore's done-callback calls
`loop.call_soon_threadsafe` on the closed loop; the `RuntimeError("Event loop is closed")` it
raises has nowhere to go and is printed as an "unraisable" traceback, after the command's own
clear error (seen with orbax-checkpoint 0.12.8, tensorstore 0.1.86). Nothing is lost: the
reads were of a checkpoint already refused.

`ignore_closed_event_loop_callbacks()` installs a `sys.unraisablehook` that drops exactly
those (a `RuntimeError` "Event loop is closed" raised by asyncio's `_check_closed`) and passes
everything else to the previous hook. Commands call it in `main`; library code never does.
"""

from __future__ import annotations

import os
import sys

_ASYNCIO_BASE_EVENTS = os.path.join("asyncio", "base_events.py")


def is_closed_event_loop_callback(unraisable) -> bool:
  """Whether an unraisable exception is a callback hitting an asyncio loop already closed."""
  error = getattr(unraisable, "exc_value", None)
  if not isinstance(error, RuntimeError) or str(error) != "Event loop is closed":
    return False
  frame = getattr(unraisable, "exc_traceback", None) or error.__traceback__
  if frame is None:
    return False
  while frame.tb_next is not None:
    frame = frame.tb_next
  code = frame.tb_frame.f_code
  return code.co_name == "_check_closed" and code.co_filename.endswith(_ASYNCIO_BASE_EVENTS)


def ignore_closed_event_loop_callbacks() -> None:
  """Installs the filtering `sys.unraisablehook` (once; see the module docstring)."""
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_event_loop_callbacks", False):
    return

  def hook(unraisable) -> None:
    if not is_closed_event_loop_callback(unraisable):
      previous(unraisable)

  hook._drops_closed_event_loop_callbacks = True
  sys.unraisablehook = hook
