"""absl's `app.run` with help that exits 0: `--help`, `-?`, `--helpshort`, `--helpfull`.

absl prints help on request but exits with status 1, as for an error. `run(main)` answers a
help request itself, on stdout with status 0: the command's docstring, its own flags (also
when started through a console script, where absl's short help finds no main-module flags),
and what `describe(argv)` adds (the run command: its config's fields). Everything else goes
to `app.run` unchanged.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags

SHORT = frozenset({"--help", "-help", "-?", "--?", "--helpshort", "-helpshort"})
FULL = frozenset({"--helpfull", "-helpfull"})


def help_request(argv: list[str]) -> str | None:
  """ "short" or "full" if argv asks for help (before a `--` separator), else None."""
  args = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
  if FULL & set(args):
    return "full"
  if SHORT & set(args):
    return "short"
  return None


def without_help(argv: list[str]) -> list[str]:
  """argv without its help arguments."""
  return [argv[0]] + [a for a in argv[1:] if a not in SHORT | FULL]


def print_help(module, kind: str) -> None:
  """Prints the command's docstring and flags (all flags for kind "full") on stdout."""
  print((module.__doc__ or f"USAGE: {sys.argv[0]} [flags]").rstrip())
  print()
  if kind == "full":
    print(flags.FLAGS.get_help())
  else:
    # absl files the flags of `python -m` modules under sys.argv[0].
    name = sys.argv[0] if module.__name__ == "__main__" else module.__name__
    own = flags.FLAGS.module_help(name)
    print(own or "(no flags)")
    print()
    print("Try --helpfull to get a list of all flags.")


def run(
  main: Callable[[list[str]], object],
  *,
  describe: Callable[[list[str]], None] | None = None,
  argv: list[str] | None = None,
) -> None:
  """`app.run(main)`, except that a help request prints help and exits with status 0.

  Args:
    main: the command's main(argv).
    describe: called with argv less its help arguments after the flags' help, to print more
      (it may parse the flags).
    argv: the command line (default sys.argv).
  """
  argv = sys.argv if argv is None else argv
  kind = help_request(argv)
  if kind is None:
    app.run(main, argv=argv)
    return
  app.define_help_flags()  # so that --helpfull lists them as absl would
  print_help(sys.modules[main.__module__], kind)
  if describe is not None:
    describe(without_help(argv))
  sys.exit(0)
