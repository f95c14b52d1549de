"""`pqfs mount --on-change CMD`: tell a media server what changed in the vault.

FUSE raises no inotify events for changes the kernel did not make through the mount itself,
and every change to a vault is made elsewhere (`pqfs add`, on this host or another): a media
server watching the mount with inotify (minidlna, Jellyfin, Gerbera) never sees a new file.
After a refresh that changed the tree, the mount runs CMD with the changed vault paths
(relative to the mount point) appended as arguments, so the hook can ask for a rescan.

Bounds, all kept here:
  * never through a shell: the argv the CLI split from CMD (shlex), then the paths;
  * one run at a time: changes that come while the hook runs are gathered and given to one
    next run, started when it has finished;
  * at most `hook_path_bytes` of paths (MountOptions); past that, no path at all, meaning
    "rescan everything";
  * killed after `hook_timeout`; its output (stdout and stderr) goes to the log, at most
    `hook_output_bytes` of it; its failure is logged and nothing it does affects the mount;
  * it gets vault paths, never content, and an environment without the passphrase
    variables; its stdin is /dev/null.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterable, Sequence

import trio

from pqfs.mount.options import MountOptions
from pqfs.runtime.zeroize import CHILD_ENV_DROPPED
from pqfs.vault.catalog import shown

log = logging.getLogger("pqfs.mount")


def hook_args(paths: Sequence[str], limit: int) -> list[str]:
    """The paths as arguments, or none at all when they take more than `limit` bytes."""
    size = sum(len(os.fsencode(p)) + 1 for p in paths)
    return list(paths) if size <= limit else []


class ChangeHook:
    """Runs the hook for changed paths, one run at a time (see the module docstring)."""

    def __init__(self, argv: Sequence[str], nursery: trio.Nursery, options: MountOptions) -> None:
        self.argv = list(argv)
        self.options = options
        self._nursery = nursery
        self._pending: set[str] = set()
        self._running = False

    def notify(self, paths: Iterable[str]) -> None:
        self._pending.update(paths)
        if self._pending and not self._running:
            self._running = True
            self._nursery.start_soon(self._drain)

    async def _drain(self) -> None:
        try:
            while self._pending:
                paths = sorted(self._pending)
                self._pending.clear()
                await self._run(paths)
        finally:
            self._running = False

    async def _run(self, paths: Sequence[str]) -> None:
        """One run; whatever happens is logged, never raised (this is a background task)."""
        args = hook_args(paths, self.options.hook_path_bytes)
        if not args:
            log.info("on-change: %d paths changed, too many to pass: run with none", len(paths))
        try:
            code, output = await execute([*self.argv, *args], self.options)
        except Exception as e:  # cannot start it (no such program...): the mount goes on
            log.warning("on-change hook %s could not run: %s", shown(self.argv[0]), e)
            return
        for line in output.decode(errors="replace").splitlines():
            log.info("on-change hook: %s", shown(line))
        if code is None:
            log.warning(
                "on-change hook still running after %.0f s: killed", self.options.hook_timeout
            )
        elif code < 0:
            log.warning("on-change hook was killed by signal %d", -code)
        elif code:
            log.warning("on-change hook exited with status %d", code)


async def execute(argv: list[str], options: MountOptions) -> tuple[int | None, bytes]:
    """Run argv to completion within `hook_timeout`: (exit status, None if it was killed for
    taking too long; the first `hook_output_bytes` of its output)."""
    limit = options.hook_output_bytes
    env = {k: v for k, v in os.environ.items() if k not in CHILD_ENV_DROPPED}
    proc = await trio.lowlevel.open_process(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    output = bytearray()

    async def read() -> None:
        assert proc.stdout is not None
        while chunk := await proc.stdout.receive_some(65536):
            output.extend(chunk[: max(0, limit - len(output))])

    try:
        with trio.move_on_after(options.hook_timeout) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await proc.wait()
                # Its output is read to the end, unless a child it left behind keeps the pipe.
                nursery.cancel_scope.deadline = trio.current_time() + options.hook_drain
    finally:
        if proc.returncode is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
        if proc.stdout is not None:
            with trio.CancelScope(shield=True):
                await proc.stdout.aclose()
    return (None if scope.cancelled_caught else proc.returncode), bytes(output)
