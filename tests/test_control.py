"""The mount is read-only to the kernel (`ro`), and lock/unlock reach the daemon through its
control socket, which answers only root and the user who mounted (control.py)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from pqfs.mount import control
from tests.conftest import mounted, run_pqfs

pytestmark = pytest.mark.fuse


@pytest.fixture
def one_file_vault(tmp_path: Path, cli_env: dict[str, str]) -> Path:
    vault_dir = tmp_path / "vault"
    run_pqfs("init", str(vault_dir), env=cli_env)
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(70000))
    run_pqfs("add", str(vault_dir), str(src), "a.bin", env=cli_env)
    return vault_dir


def _mount_options(mp: Path) -> list[str]:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(mp):
            return fields[3].split(",")
    raise AssertionError(f"{mp} is not mounted")


def _request_as(uid: int, address: bytes, command: str, secret: bytes = b"") -> bytes:
    """Send a request, as `pqfs lock` and `unlock` do (control.request), from a child process
    running as `uid`; the answer as "CODE MESSAGE"."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, only the client
        code = 1
        try:
            os.close(rfd)
            os.setgid(uid)
            os.setuid(uid)
            answer = control.request(address, command, secret)
            os.write(wfd, f"{answer.code} {answer.message}".encode())
            code = 0
        except BaseException as e:
            os.write(wfd, f"child failed: {e!r}".encode())
        finally:
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        answer = r.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, answer
    return answer


def test_the_mount_is_read_only_to_the_kernel(
    tmp_path: Path, cli_env: dict[str, str], one_file_vault: Path
) -> None:
    with mounted(one_file_vault, tmp_path / "mnt", cli_env, "--read-only") as mp:
        assert "ro" in _mount_options(mp)
        assert not os.access(mp / "a.bin", os.W_OK)
        with pytest.raises(OSError) as e:
            (mp / "new.txt").write_bytes(b"x")
        assert e.value.errno == errno.EROFS
        st = os.statvfs(mp)
        assert st.f_flag & os.ST_RDONLY
        run_pqfs("lock", str(mp), env=cli_env)  # lock and unlock work on an ro mount
        with pytest.raises(PermissionError):
            (mp / "a.bin").read_bytes()
        run_pqfs("unlock", str(mp), env=cli_env)
        assert len((mp / "a.bin").read_bytes()) == 70000


def test_the_control_socket_answers_only_root_and_the_owner(
    tmp_path: Path, cli_env: dict[str, str], one_file_vault: Path
) -> None:
    with mounted(one_file_vault, tmp_path / "mnt", cli_env) as mp:
        address = os.getxattr(mp, control.XATTR_CONTROL)
        nobody = 65534
        answer = _request_as(nobody, address, "lock")
        assert answer == f"{errno.EPERM} {control.REFUSED}".encode()
        # however much it sends: the daemon answers before reading it, and the client still
        # reads that answer (closing a socket with unread data resets it)
        answer = _request_as(nobody, address, "unlock", b"x" * (1 << 20))
        assert answer == f"{errno.EPERM} {control.REFUSED}".encode()
        assert len((mp / "a.bin").read_bytes()) == 70000  # not locked
        bad = control.request(address, "format-disk")
        assert bad.code == errno.EINVAL
        wrong = control.request(address, "unlock", b"not the passphrase")
        assert wrong.code == errno.EACCES  # an unlocked mount tries it, and stays unlocked
        assert control.request(address, "lock").code == 0
        proc = run_pqfs("unlock", str(mp), env={**cli_env, "PQFS_PASSPHRASE": "wrong"}, check=False)
        assert proc.returncode == 1
        assert proc.stderr.decode().strip() == "pqfs: error: wrong passphrase"
        with pytest.raises(PermissionError):
            (mp / "a.bin").read_bytes()
