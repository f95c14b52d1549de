"""The `pqfs` command: main(), the error boundary of the CLI, and how pqfs speaks to its user.

The rules (as age's cmd/age/tui.go has them for age):

- What a command was asked for (a file's bytes, `ls`, `info`, `verify`, `stats`, an identity)
  goes to stdout; everything else goes to stderr, so that a pipe carries only the output.
- A prompt appears only on a terminal and never echoes; the progress bar is drawn only when
  stderr is a terminal.
- An error is one line, `pqfs: error: ...`, and exit status 1 (EXIT_ERROR). Every PqfsError
  and OSError becomes that line here, in main(), and nothing else prints one. A command line
  argparse refuses is one line too, `pqfs CMD: error: ... (see --help)`, status 2.
- An error with a known fix is followed by one `pqfs: hint: ...` line (PqfsError.hint),
  such as `pqfs: hint: run: pqfs umount MP` for a stale mount.
- A warning is `pqfs: warning: ...` and the command goes on (messages.warn); a note of what
  was done (`created vault ...`, `added 3 file(s) ...`) has no prefix (messages.info).
- A message starts lower-case and ends without a period (`Public key:` is as age-keygen
  prints it). A name from the vault or the disk is escaped (catalog.shown). No message holds
  a secret or plaintext.
- Ctrl-C is `pqfs: interrupted`, status 130, never a traceback (interrupt.py). Any other
  exception is a bug: `pqfs: internal error: TYPE (rerun with PQFS_DEBUG=1)`, status 70.
  With PQFS_DEBUG=1 the traceback is shown instead of an error line.
"""

from __future__ import annotations

from pqfs.cli import interrupt

# isort: split
import argparse
import contextlib
import os
import sys
from collections.abc import Sequence

from pqfs import __version__
from pqfs.cli import mount_cmds, trust_cmds, vault_cmds
from pqfs.cli.args import Parser
from pqfs.cli.messages import EXIT_ERROR, EXIT_INTERNAL
from pqfs.errors import PqfsError
from pqfs.runtime import memory


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="pqfs", description="Post-quantum encrypted vaults for media (age v1 format).")
    p.add_argument("--version", action="version", version=f"pqfs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for add in (*vault_cmds.PARSERS, *trust_cmds.PARSERS, *mount_cmds.PARSERS):
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    debug = bool(os.environ.get("PQFS_DEBUG"))
    try:
        # Every command may hold the identity, a passphrase or plaintext: none dumps core.
        memory.harden_process(for_good=False)  # the mount's daemon: for good (daemon.run)
        args = build_parser().parse_args(argv)
        rc: int = args.func(args)
        return rc
    except PqfsError as e:
        if debug:
            raise
        print(f"pqfs: error: {e}", file=sys.stderr)
        if e.hint:
            print(f"pqfs: hint: {e.hint}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("pqfs: interrupted", file=sys.stderr)
        return interrupt.EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`pqfs cat ... | head`): not an error worth a message.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"pqfs: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # the last line of defence: never a traceback for a user
        if debug:
            raise
        print(
            f"pqfs: internal error: {type(e).__name__} (rerun with PQFS_DEBUG=1)", file=sys.stderr
        )
        return EXIT_INTERNAL
    except BaseExceptionGroup as e:  # trio's, around a KeyboardInterrupt in a task
        if debug or e.subgroup(KeyboardInterrupt) is None:
            raise
        print("pqfs: interrupted", file=sys.stderr)
        return interrupt.EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
