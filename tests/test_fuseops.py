"""The FUSE adapter's error boundary (pqfs.mount.fuseops), driven with a fake core: no mount.

What a handler raises reaches the kernel only as an errno (pyfuse3.FUSEError): a PqfsError or
OSError as its own, anything else as EIO, logged without the error's message (it may hold data).
"""

from __future__ import annotations

import errno
import logging
from typing import Any

import pyfuse3
import pytest

from pqfs.errors import (
    BadPassphrase,
    Exists,
    FormatError,
    HeaderMacError,
    Invalid,
    IsADirectory,
    Locked,
    NoIdentityMatch,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    PayloadError,
    PqfsError,
    ReadOnly,
    Unavailable,
    Unreadable,
    VaultError,
)
from pqfs.mount.control import XATTR_CONTROL, XATTR_STATS
from pqfs.mount.fuseops import Operations, errno_of
from pqfs.mount.tree import ROOT_INO, Attr


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (NotFound("x"), errno.ENOENT),
        (NotADirectory("x"), errno.ENOTDIR),
        (IsADirectory("x"), errno.EISDIR),
        (Locked("x"), errno.EACCES),
        (BadPassphrase("x"), errno.EACCES),
        (NoIdentityMatch("x"), errno.EACCES),
        (ReadOnly("x"), errno.EROFS),
        # damaged, missing or unreachable objects: EIO, whatever their class
        (PayloadError("chunk 2 failed authentication", 2), errno.EIO),
        (HeaderMacError("x"), errno.EIO),
        (FormatError("x"), errno.EIO),
        (Unreadable("x"), errno.EIO),
        (Unavailable("x"), errno.EIO),
        (VaultError("x"), errno.EIO),
        (PqfsError("x"), errno.EIO),
        (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
        (FileNotFoundError(errno.ENOENT, "gone"), errno.ENOENT),
        (OSError("no errno"), errno.EIO),
        (ValueError("a bug"), errno.EIO),
        (KeyError("a bug"), errno.EIO),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_errno_of(exc: BaseException, code: int) -> None:
    assert errno_of(exc) == code


class FakeOptions:
    direct_io = True
    attr_timeout = 1.0
    max_read = 1 << 20
    large_blksize_from = 64 << 20


class FakeCore:
    """Stands for VaultFS: each call raises what the test put in `raises`, if anything."""

    def __init__(self) -> None:
        self.options = FakeOptions()
        self.uid, self.gid = 1000, 1000
        self.mode_mask = 0o7777
        self.raises: BaseException | None = None
        self.calls: list[str] = []

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if self.raises is not None:
            raise self.raises

    def getattr(self, ino: int) -> Attr:
        self._call("getattr")
        return Attr(ino, 0o100644, 5, 0, 1)

    def lookup(self, parent: int, name: str) -> Attr:
        self._call("lookup")
        return Attr(7, 0o100644, 5, 0, 1)

    async def open(self, ino: int, flags: int) -> int:
        self._call("open")
        return 3

    async def read(self, fh: int, off: int, size: int) -> memoryview:
        self._call("read")
        return memoryview(b"plain")

    def release(self, fh: int) -> None:
        self._call("release")

    def stats(self) -> dict[str, object]:
        self._call("stats")
        return {"reads": 1}

    def lock(self) -> set[int]:
        self._call("lock")
        return set()

    def opendir(self, ino: int) -> None:
        self._call("opendir")

    def releasedir(self, ino: int) -> None:
        pass

    async def drain(self, locking: bool = False) -> None:
        self.calls.append("drain")
        if self.drain_raises is not None:
            raise self.drain_raises

    drain_raises: BaseException | None = None

    def mkdir(self, parent: int, name: str, mode: int) -> Attr:
        self._call("mkdir")
        return Attr(8, 0o040755, 0, 0, 2)

    def unlink(self, parent: int, name: str) -> None:
        self._call("unlink")

    async def rename(self, *args: object) -> None:
        self._call("rename")

    async def write(self, fh: int, off: int, data: bytes) -> int:
        self._call("write")
        return len(data)

    async def unlock(self, passphrase: Any = None, identities: Any = None) -> None:
        self._call("unlock")

    async def offload(self, fn: Any, *args: Any) -> Any:
        return fn(*args)


def handlers(ops: Operations) -> dict[str, Any]:
    """Each guarded handler, called with arguments that reach the core."""
    return {
        "getattr": lambda: ops.getattr(ROOT_INO),
        "lookup": lambda: ops.lookup(ROOT_INO, b"a"),
        "open": lambda: ops.open(7, 0, None),
        "read": lambda: ops.read(3, 0, 10),
        "release": lambda: ops.release(3),
        "getxattr": lambda: ops.getxattr(pyfuse3.ROOT_INODE, XATTR_STATS, None),
    }


async def _errno(call: Any) -> int:
    with pytest.raises(pyfuse3.FUSEError) as info:
        await call()
    return int(info.value.errno)


async def test_handlers_answer_through_the_core() -> None:
    core = FakeCore()
    ops = Operations(core)  # type: ignore[arg-type]
    assert (await ops.getattr(ROOT_INO)).st_size == 5
    assert (await ops.lookup(ROOT_INO, b"a")).st_ino == 7
    info = await ops.open(7, 0, None)
    assert info.fh == 3 and info.direct_io
    assert bytes(await ops.read(3, 0, 10)) == b"plain"
    await ops.release(3)
    assert await ops.getxattr(pyfuse3.ROOT_INODE, XATTR_STATS, None) == b'{"reads": 1}'
    assert core.calls == ["getattr", "lookup", "open", "read", "release", "stats"]


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (NotFound("no such file: a"), errno.ENOENT),
        (Locked("the vault is locked"), errno.EACCES),
        (ReadOnly("the mount is read-only"), errno.EROFS),
        (OSError(errno.ENOSPC, "full"), errno.ENOSPC),
    ],
)
async def test_expected_errors_become_their_errno_unlogged(
    exc: BaseException, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A missing name, a locked vault, a write: answers, not failures to log."""
    core = FakeCore()
    ops = Operations(core)  # type: ignore[arg-type]
    core.raises = exc
    with caplog.at_level(logging.DEBUG, logger="pqfs"):
        for name, call in handlers(ops).items():
            assert await _errno(call) == code, name
    assert caplog.records == []


async def test_eio_is_logged_once_with_the_handler_name(caplog: pytest.LogCaptureFixture) -> None:
    core = FakeCore()
    ops = Operations(core)  # type: ignore[arg-type]
    core.raises = PayloadError("chunk 2 failed authentication", 2)
    with caplog.at_level(logging.DEBUG, logger="pqfs"):
        assert await _errno(handlers(ops)["read"]) == errno.EIO
    assert [r.getMessage() for r in caplog.records] == ["read: chunk 2 failed authentication"]
    caplog.clear()
    logged = PayloadError("chunk 3 failed authentication", 3)
    logged.logged = True  # the core logged it already, with the file's path
    core.raises = logged
    with caplog.at_level(logging.DEBUG, logger="pqfs"):
        assert await _errno(handlers(ops)["read"]) == errno.EIO
        core.raises = Unreadable("a.mkv: damaged header")  # logged by the core's open
        assert await _errno(handlers(ops)["open"]) == errno.EIO
    assert caplog.records == []


async def test_a_bug_is_eio_logged_without_its_message(caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected exception may carry request data (a name, plaintext): the log names its
    type and the handler, with the traceback, and the mount goes on answering."""
    core = FakeCore()
    ops = Operations(core)  # type: ignore[arg-type]
    for name, call in handlers(ops).items():
        core.raises = RuntimeError("secret-plaintext")
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="pqfs"):
            assert await _errno(call) == errno.EIO, name
        (record,) = caplog.records
        assert record.getMessage() == f"{name}: internal error RuntimeError"
        assert record.exc_info is not None
        assert "secret-plaintext" not in record.getMessage()
        core.raises = None
        await call()  # the next request is answered as usual


async def test_fuse_errors_pass_through_unchanged() -> None:
    core = FakeCore()
    ops = Operations(core)  # type: ignore[arg-type]
    assert await _errno(lambda: ops.getxattr(ROOT_INO + 1, XATTR_STATS, None)) == pyfuse3.ENOATTR
    assert await _errno(lambda: ops.getxattr(pyfuse3.ROOT_INODE, b"user.x", None)) == (
        pyfuse3.ENOATTR
    )
    # no control socket yet: the attribute naming it does not exist
    assert await _errno(lambda: ops.getxattr(pyfuse3.ROOT_INODE, XATTR_CONTROL, None)) == (
        pyfuse3.ENOATTR
    )
    assert await _errno(lambda: ops.opendir(9, None)) == errno.ENOTDIR
    # what the vault cannot hold: EPERM (link(2)'s "not supported"), xattrs ENOTSUP
    assert await _errno(lambda: ops.link(5, 1, b"b", None)) == errno.EPERM
    assert await _errno(lambda: ops.symlink(1, b"l", b"t", None)) == errno.EPERM
    assert await _errno(lambda: ops.mknod(1, b"n", 0o10644, 0, None)) == errno.EPERM
    assert await _errno(lambda: ops.setxattr(1, b"user.x", b"v", None)) == errno.ENOTSUP
    # the core's write errors, each its errno
    for exc, code in [
        (Exists("x"), errno.EEXIST),
        (NotEmpty("x"), errno.ENOTEMPTY),
        (NoSpace("x"), errno.ENOSPC),
        (Invalid("x"), errno.EINVAL),
        (ReadOnly("x"), errno.EROFS),
        (Locked("x"), errno.EACCES),
    ]:
        core.raises = exc
        assert await _errno(lambda: ops.mkdir(1, b"d", 0o755, None)) == code
        assert await _errno(lambda: ops.unlink(1, b"f", None)) == code
        assert await _errno(lambda: ops.rename(1, b"a", 1, b"b", 0, None)) == code
        assert await _errno(lambda: ops.write(3, 0, b"x")) == code
    core.raises = None
    assert await ops.write(3, 0, b"abc") == 3


@pytest.mark.parametrize(
    ("command", "exc", "code"),
    [
        (b"unlock", BadPassphrase("wrong passphrase"), errno.EACCES),
        (b"unlock", Unavailable("storage did not answer"), errno.EIO),
        (b"unlock", OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
        (b"lock", Locked("x"), errno.EACCES),
    ],
)
async def test_control_answers_an_errno_and_a_message(
    command: bytes, exc: BaseException, code: int
) -> None:
    """Lock and unlock (the control socket's requests) answer as the handlers do: the errno of
    what the core raised, with its message (an OSError's strerror)."""
    core = FakeCore()
    ops = Operations(core)  # type: ignore[arg-type]
    core.raises = exc
    answer = await ops.control(command, bytearray(b"passphrase"))
    assert answer.code == code
    expected = exc.strerror if isinstance(exc, OSError) else str(exc)
    assert answer.message == expected
    core.raises = None
    assert (await ops.control(command, bytearray(b"passphrase"))).code == 0
    answer = await ops.control(b"unlock-identity", bytearray(b"not an identity"))
    assert (answer.code, answer.message) == (errno.EINVAL, "not an age identity file")


async def test_a_lock_whose_commits_fail_locks_nothing() -> None:
    """Written data is committed before a lock wipes the keys it needs: if that fails, the
    answer says so and the mount stays unlocked (nothing lost)."""
    core = FakeCore()
    ops = Operations(core)  # type: ignore[arg-type]
    core.drain_raises = Unavailable("could not commit a.txt: storage did not answer")
    answer = await ops.control(b"lock", bytearray())
    assert answer.code == errno.EIO
    assert answer.message == (
        "could not commit a.txt: storage did not answer; not locked (retry, or unmount)"
    )
    assert "lock" not in core.calls
    core.drain_raises = None
    assert (await ops.control(b"lock", bytearray())).code == 0
    assert core.calls[-2:] == ["drain", "lock"]
    assert (await ops.control(b"sync", bytearray())).code == 0
