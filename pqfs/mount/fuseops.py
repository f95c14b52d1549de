"""The thin pyfuse3 adapter over `vfs.VaultFS`, and the one error boundary of the mount.

Every handler goes through `_boundary`: a PqfsError or OSError becomes its errno; anything else
is logged (without arguments that could hold data) and becomes EIO. No exception ever reaches
pyfuse3's loop, so no request can take the mount down. To a file operation EACCES means one
thing: the vault is locked (to an unlock: the wrong passphrase or identity). A damaged or
missing object is EIO, logged once with the file's path (by the reader or the opener: the
adapter does not know the path).

Extended attributes of the mount's root (read with getxattr, which a read-only mount allows):
  user.pqfs.stats    JSON statistics
  user.pqfs.control  the name of the daemon's control socket, for lock and unlock (control.py)
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import pyfuse3

from pqfs.errors import (
    BadPassphrase,
    Exists,
    Invalid,
    IsADirectory,
    Locked,
    NoIdentityMatch,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    PqfsError,
    ReadOnly,
)
from pqfs.format.keys import parse_identity_file
from pqfs.mount.control import XATTR_CONTROL, XATTR_STATS, Answer
from pqfs.mount.tree import Attr
from pqfs.mount.vfs import VaultFS
from pqfs.runtime.zeroize import wipe_bytes

log = logging.getLogger("pqfs.mount")
SMALL_BLKSIZE = 128 * 1024  # st_blksize below MountOptions.large_blksize_from

_ERRNO: list[tuple[type[PqfsError], int]] = [
    (NotFound, errno.ENOENT),
    (NotADirectory, errno.ENOTDIR),
    (IsADirectory, errno.EISDIR),
    (Locked, errno.EACCES),
    (BadPassphrase, errno.EACCES),
    (NoIdentityMatch, errno.EACCES),
    (ReadOnly, errno.EROFS),
    (Exists, errno.EEXIST),
    (NotEmpty, errno.ENOTEMPTY),
    (NotPermitted, errno.EPERM),
    (NoSpace, errno.ENOSPC),
    (Invalid, errno.EINVAL),
]

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def errno_of(exc: BaseException) -> int:
    for cls, code in _ERRNO:
        if isinstance(exc, cls):
            return code
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO  # authentication failures, damaged or missing objects, anything unexpected


def _boundary(fn: F) -> F:
    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: Any) -> Any:
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except (PqfsError, OSError) as e:
            code = errno_of(e)
            if code == errno.EIO and not (isinstance(e, PqfsError) and e.logged):
                log.error("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(code) from None
        except Exception as e:  # a bug: keep serving, report it without request data
            log.error("%s: internal error %s", fn.__name__, type(e).__name__, exc_info=True)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


class Operations(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, fs: VaultFS) -> None:
        super().__init__()
        self.fs = fs
        self.control_name = ""  # the control socket's name, once the daemon listens on it

    def init(self) -> None:
        """Called once the kernel has connected. The kernel refuses a shared mmap of a direct
        I/O file without asking the daemon (ENODEV, "No such device"), so this is the one
        place the log can say why, and what to do, before it happens."""
        if self.fs.options.direct_io:
            log.info(
                "reads bypass the kernel's page cache: mmap(MAP_SHARED) of a file, as Python's "
                "read-only mmap does, fails with ENODEV (No such device); mount with "
                "--page-cache for programs that need it"
            )

    def _attrs(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        e.entry_timeout = self.fs.options.attr_timeout
        e.attr_timeout = self.fs.options.attr_timeout
        e.st_mode = a.mode & (~0o7777 | self.fs.mode_mask)
        e.st_nlink = a.nlink
        e.st_uid = self.fs.uid
        e.st_gid = self.fs.gid
        e.st_rdev = 0
        e.st_size = a.size
        # cp and buffered readers read st_blksize at a time (MountOptions.large_blksize_from)
        opts = self.fs.options
        e.st_blksize = opts.max_read if a.size >= opts.large_blksize_from else SMALL_BLKSIZE
        e.st_blocks = -(-a.size // 512)
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = a.mtime_ns
        return e

    # ------------------------------------------------------------------ metadata ----

    @_boundary
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(self.fs.getattr(inode))

    @_boundary
    async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(self.fs.lookup(parent, os.fsdecode(name)))

    @_boundary
    async def opendir(self, inode: int, ctx: Any) -> int:
        if not stat.S_ISDIR(self.fs.getattr(inode).mode):
            raise NotADirectory("not a directory")
        self.fs.opendir(inode)
        return inode

    @_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for name, attr, next_id in self.fs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(attr), next_id):
                break

    async def releasedir(self, fh: int) -> None:
        self.fs.releasedir(fh)

    async def forget(self, inode_list: Iterable[tuple[int, int]]) -> None:
        pass  # inodes are derived from the catalog, not reference-counted

    @_boundary
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        space = await self.fs.statfs()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = space.block
        s.f_blocks = space.used_blocks + space.free_blocks  # df: used = the tree's files
        s.f_bfree = space.free_blocks
        s.f_bavail = space.avail_blocks
        s.f_files = space.entries + space.free_entries
        s.f_ffree = s.f_favail = space.free_entries
        s.f_namemax = 255
        return s

    # ------------------------------------------------------------------ data ----

    @_boundary
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        return self._info(await self.fs.open(inode, flags))

    def _info(self, fh: int) -> pyfuse3.FileInfo:
        if self.fs.options.direct_io:  # see MountOptions.direct_io
            return pyfuse3.FileInfo(fh=fh, direct_io=True)
        # keep_cache: a file's pages change only through this mount (the kernel's cache follows
        # its writes), or with a new inode (a replacement from elsewhere); lock() invalidates
        # them explicitly.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @_boundary
    async def read(self, fh: int, off: int, size: int) -> memoryview | bytes | bytearray:  # type: ignore[override]
        return await self.fs.read(fh, off, size)

    @_boundary
    async def release(self, fh: int) -> None:
        self.fs.release(fh)

    # ------------------------------------------------------------------ writes ----

    @_boundary
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, attr = await self.fs.create(parent_inode, os.fsdecode(name), mode, flags)
        return self._info(fh), self._attrs(attr)

    @_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        try:
            return await self.fs.write(fh, off, buf)
        finally:
            wipe_bytes(buf)  # pyfuse3's copy of the plaintext, ours alone: staged by now

    async def flush(self, fh: int) -> None:
        # close(2) waits for this answer; the commit follows the last release (writes.py), so
        # there is nothing to do here. ENOSYS once tells the kernel never to send a flush
        # again: a round trip less for every close (a copy of 1,000 small files: 1,000 fewer).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh)

    @_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.fs.sync_namespace()

    @_boundary
    async def setattr(
        self, inode: int, attr: pyfuse3.EntryAttributes, fields: Any, fh: int | None, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        a = await self.fs.setattr(
            inode,
            size=attr.st_size if fields.update_size else None,
            mode=attr.st_mode if fields.update_mode else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
        )
        return self._attrs(a)

    @_boundary
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: Any
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(self.fs.mkdir(parent_inode, os.fsdecode(name), mode))

    @_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.fs.unlink(parent_inode, os.fsdecode(name))

    @_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self.fs.rmdir(parent_inode, os.fsdecode(name))

    @_boundary
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: Any,
    ) -> None:
        await self.fs.rename(
            parent_inode_old, os.fsdecode(name_old), parent_inode_new, os.fsdecode(name_new), flags
        )

    @_boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> Any:
        raise NotPermitted("hard links are not supported: the vault holds one name per file")

    @_boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> Any:
        raise NotPermitted(
            "symbolic links are not supported: the vault holds files and directories"
        )

    @_boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any) -> Any:
        raise NotPermitted("device nodes, FIFOs and sockets are not supported")

    # ------------------------------------------------------------------ control ----

    @_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if inode == pyfuse3.ROOT_INODE and name == XATTR_STATS:
            return json.dumps(self.fs.stats()).encode()
        if inode == pyfuse3.ROOT_INODE and name == XATTR_CONTROL and self.control_name:
            return self.control_name.encode()
        raise pyfuse3.FUSEError(pyfuse3.ENOATTR)

    @_boundary
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return [XATTR_STATS, XATTR_CONTROL] if inode == pyfuse3.ROOT_INODE else []

    async def control(self, command: bytes, secret: bytearray, uid: int = 0) -> Answer:
        """A lock or unlock request from the control socket (control.py), which has checked
        the caller (`uid`) and wipes `secret` afterwards."""
        try:
            if command == b"sync":
                await self.fs.drain()
            elif command == b"lock":
                # What was written is committed first: staged data is unreadable without the
                # keys a lock wipes. If it cannot be, nothing is locked (and nothing lost).
                try:
                    await self.fs.drain(locking=True)
                except PqfsError as e:
                    return Answer(errno.EIO, f"{e}; not locked (retry, or unmount)")
                opened = self.fs.lock()
                # The kernel may hold decrypted pages of files opened before (keep_cache): drop
                # them before confirming, on a thread, since the call waits for reads in flight.
                await self.fs.offload(invalidate_inodes, opened)
                log.info("locked by uid %d", uid)
            elif command == b"unlock":
                await self.fs.unlock(passphrase=secret)
                log.info("unlocked by uid %d", uid)
            else:
                try:
                    idents = parse_identity_file(secret)
                except PqfsError:
                    return Answer(errno.EINVAL, "not an age identity file")
                await self.fs.unlock(identities=idents)
                log.info("unlocked with an identity by uid %d", uid)
        except (PqfsError, OSError) as e:
            return Answer(errno_of(e), str(e) if isinstance(e, PqfsError) else e.strerror or "")
        return Answer()


async def _no_xattrs(self: Operations, *args: Any) -> Any:
    # the vault holds no extended attributes (the kernel refuses them on a read-only mount)
    raise pyfuse3.FUSEError(errno.ENOTSUP)


for _name in ("setxattr", "removexattr"):
    setattr(Operations, _name, _no_xattrs)


def invalidate_inodes(inodes: Iterable[int]) -> None:
    """Drop the kernel's cached pages of these inodes (on a thread, through `VaultFS.offload`:
    the call may block)."""
    for ino in inodes:
        with contextlib.suppress(OSError):  # the kernel has already forgotten it
            pyfuse3.invalidate_inode(ino, attr_only=False)
