"""The mount daemon as a process (issue 15): it never dumps core, keeps plaintext out of dumps
and swap, cannot be hung by a FIFO or a stalled store, writes private files, says when its log
goes nowhere, and survives or stops cleanly on signals during start-up; it keeps none of its
caller's descriptors. Everything runs the real `pqfs` and real FUSE mounts; every wait on a
process or a mount is bounded (`wait_for`, thread joins and subprocess timeouts of 60 s)."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import resource
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pqfs.format.keys import MAX_SCRYPT_LOG_N
from pqfs.vault import vault as vault_mod
from pqfs.vault.catalog import put_op
from pqfs.vault.objects import object_key
from pqfs.vault.schema import Entry
from pqfs.vault.vault import Vault, tune_scrypt

from .conftest import (
    PASSPHRASE,
    daemon_pid,
    mount_stats,
    mount_type,
    mounted,
    notify_socket,
    run_pqfs,
)

PQFS = [sys.executable, "-m", "pqfs"]
DEADLINE = 60.0
# Root without CAP_SYS_PTRACE: such a process may open /proc/PID/mem of a process of its own
# uid and capabilities only if that process is dumpable.
NO_PTRACE = ["setpriv", "--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace"]
T = TypeVar("T")


# ----------------------------------------------------------------------------- helpers ----


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = DEADLINE) -> T:
    """Poll `probe` until it returns something true; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.002)


def serving_pid(
    foreground: bool, proc: subprocess.Popen[bytes], sock: socket.socket, mp: Path
) -> int:
    """The pid serving the mount `proc` started: itself once it says READY=1 (`mount -f`), or
    the daemon a background `mount` left once it has exited 0."""
    if foreground:
        wait_ready(sock)
        return proc.pid
    assert finish(proc)[0] == 0
    return daemon_pid(mp)


def make_vault(tmp_path: Path, files: dict[str, bytes]) -> Vault:
    """A vault (through the API: fast) holding `files`."""
    v = Vault.create(str(tmp_path / "vault"), PASSPHRASE, log_n=10)
    src = tmp_path / "src"
    ops = []
    for name, data in files.items():
        f = src / name
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
        ops.append(put_op(v.add_file(str(f), name)))
    v.commit(ops)
    return v


def many_entries(n: int = 20_000) -> list[dict[str, object]]:
    """Catalog ops for `n` directories: a catalog that takes a while to load (~0.2 s here)."""
    return [put_op(Entry(f"d{i // 100}/e{i}", "dir", 0o755, 0)) for i in range(n)]


def object_path(v: Vault, name: str) -> Path:
    e = v.catalog(reload=True).get(name)
    assert e is not None and e.object
    return Path(v.storage.describe()) / object_key(e.object)


def spawn(argv: list[str], env: dict[str, str], **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def finish(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """Exit status and stderr of a process that must end on its own within the deadline."""
    _, err = proc.communicate(timeout=DEADLINE)
    return proc.returncode, err.decode(errors="replace")


def answers(mp: Path) -> bool:
    """The mount at `mp` is there and answers stat (what readiness means)."""
    return mount_type(mp) == "fuse.pqfs" and os.stat(mp).st_dev != os.stat(mp.parent).st_dev


@contextmanager
def notified(tmp_path: Path, env: dict[str, str]) -> Iterator[tuple[dict[str, str], socket.socket]]:
    """An environment with NOTIFY_SOCKET, and the socket: a foreground mount says READY=1
    there once it serves (the tree loaded, the mount answering)."""
    with notify_socket(tmp_path / "notify") as sock:
        yield dict(env, NOTIFY_SOCKET=str(tmp_path / "notify")), sock


def wait_ready(sock: socket.socket) -> None:
    while "READY=1" not in sock.recv(4096).decode().splitlines():  # 60 s timeout
        pass


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def dead(pid: int) -> bool:
    return not alive(pid)


def stopped(pid: int) -> bool:
    """Every thread of `pid` stopped (SIGSTOP takes effect thread by thread)."""
    states = []
    for t in Path(f"/proc/{pid}/task").iterdir():
        with suppress(OSError):
            states.append((t / "stat").read_text().rsplit(")", 1)[1].split()[0])
    return all(st == "T" for st in states)


def children(pid: int) -> list[int]:
    """The daemons `pid` forked: children leading a session of their own (setsid(), the
    daemon's first step; a helper such as the `ldconfig -p` that ctypes.util runs does not)."""
    out: list[int] = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with suppress(OSError, IndexError):
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid and int(fields[3]) == int(d.name):
                    out.append(int(d.name))
    return out


def fd_targets(pid: int) -> set[str]:
    out = set()
    for n in os.listdir(f"/proc/{pid}/fd"):
        with suppress(OSError):
            out.add(os.readlink(f"/proc/{pid}/fd/{n}"))
    return out


def pending(pid: int) -> int:
    """The signals pending for a process (a stopped one keeps them there); 0 if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return 0
    return int(re.search(r"^ShdPnd:\s*([0-9a-f]+)", text, re.M).group(1), 16)  # type: ignore[union-attr]


@contextmanager
def cleanup(mp: Path, *procs: subprocess.Popen[bytes]) -> Iterator[None]:
    """Whatever happens in the block: no mount at `mp`, and no process of it (`procs`, their
    children, the daemon serving `mp`) left behind, stopped or running."""
    try:
        yield
    finally:
        pids = [c for p in procs for c in children(p.pid)]
        with suppress(AssertionError):
            pids.append(daemon_pid(mp))
        for pid in [p.pid for p in procs] + pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        _unmount(mp)
        for p in procs:
            try:
                p.communicate(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
        _unmount(mp)  # a parent may have completed its mount meanwhile
        for pid in pids:
            with suppress(AssertionError):
                wait_for(f"process {pid} to exit", partial(dead, pid), 20)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def _unmount(mp: Path) -> None:
    if mount_type(mp) is not None:
        subprocess.run([*PQFS, "umount", str(mp)], capture_output=True, timeout=DEADLINE)
    if mount_type(mp) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


def in_thread(fn: Callable[[], T], timeout: float = DEADLINE) -> T | BaseException | None:
    """fn() in a daemon thread: its result or exception, or None if it is still blocked at
    the deadline (a read hung in the kernel must not hang the test suite)."""
    box: list[T | BaseException] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as e:
            box.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return box[0] if box else None


def core_allowed() -> None:
    """Core dumps as large as this process may allow (raising the hard limit needs
    CAP_SYS_RESOURCE, which a container may not have)."""
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))


def mem_probe(pid: int) -> str:
    """Open /proc/PID/mem as root without CAP_SYS_PTRACE: "ok", or the errno's name."""
    code = (
        "import errno, sys\n"
        "try:\n"
        f"    open('/proc/{pid}/mem', 'rb').close()\n"
        "    print('ok')\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno])\n"
    )
    out = subprocess.run([*NO_PTRACE, sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def vmas(pid: int) -> list[tuple[int, set[str]]]:
    """(size, VmFlags) of every mapping of a process."""
    out: list[tuple[int, set[str]]] = []
    size = 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            size = int(m.group(2), 16) - int(m.group(1), 16)
        elif line.startswith("VmFlags:"):
            out.append((size, set(line.split()[1:])))
    return out


def vm_locked(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmLck:\s*(\d+) kB", text, re.M).group(1)) * 1024  # type: ignore[union-attr]


# ------------------------------------------------------------------- finding 2: cores ----


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
@pytest.mark.fuse
def test_the_daemon_never_dumps_core(
    tmp_path: Path, cli_env: dict[str, str], foreground: bool
) -> None:
    """Started with core dumps allowed, the daemon sets RLIMIT_CORE to 0 (soft and hard) and
    makes itself non-dumpable. Seen from outside: a process of the same uid and capabilities
    (root without CAP_SYS_PTRACE) opens /proc/PID/mem of an ordinary process started the same
    way, and is refused the daemon's; `pqfs stats` says the same."""
    v = make_vault(tmp_path, {"a.txt": b"hello"})
    mp = tmp_path / "mnt"
    mp.mkdir()
    argv = [*NO_PTRACE, *PQFS, "mount", *(["-f"] if foreground else []), v.storage.describe()]
    with notified(tmp_path, cli_env) as (env, sock):
        proc = spawn([*argv, str(mp)], env, preexec_fn=core_allowed)
        control = subprocess.Popen([*NO_PTRACE, "sleep", "600"], preexec_fn=core_allowed)
        try:
            with cleanup(mp, proc):
                _check_no_core(foreground, proc, control, sock, mp, cli_env)
        finally:
            control.kill()
            control.wait()


def _check_no_core(
    foreground: bool,
    proc: subprocess.Popen[bytes],
    control: subprocess.Popen[bytes],
    sock: socket.socket,
    mp: Path,
    cli_env: dict[str, str],
) -> None:
    pid = serving_pid(foreground, proc, sock, mp)
    assert (mp / "a.txt").read_bytes() == b"hello"
    limits = Path(f"/proc/{pid}/limits").read_text()
    assert re.search(r"^Max core file size\s+0\s+0\s+bytes", limits, re.M), limits
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    control_limits = Path(f"/proc/{control.pid}/limits").read_text()
    shown = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    assert re.search(rf"^Max core file size\s+{shown}\s+{shown}\s", control_limits, re.M)
    assert mem_probe(control.pid) == "ok"  # the probe can read a dumpable process
    assert mem_probe(pid) in ("EACCES", "EPERM")
    s = mount_stats(mp, cli_env)
    assert s["dumpable"] is False and s["core_limit"] == 0


@pytest.mark.fuse
def test_plaintext_buffers_are_out_of_dumps_and_locked_within_the_limit(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """After reads, the chunk cache's buffers (and the other plaintext buffers) are mappings
    marked `dd` (MADV_DONTDUMP) in smaps; the locked ones (`lo`, VmLck) are what the stats
    report, within RLIMIT_MEMLOCK. With a 64 KiB limit the mount still works: the buffers
    that do not fit are used unlocked and counted."""
    data = os.urandom(3 << 20)
    v = make_vault(tmp_path, {"big.bin": data})
    for limit in (None, 64 << 10):
        mp = tmp_path / f"mnt-{limit}"
        mp.mkdir()

        def memlock(limit: int | None = limit) -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))

        proc = spawn([*PQFS, "mount", v.storage.describe(), str(mp)], cli_env, preexec_fn=memlock)
        with cleanup(mp, proc):
            assert finish(proc)[0] == 0
            assert hashlib.sha256((mp / "big.bin").read_bytes()).digest() == (
                hashlib.sha256(data).digest()
            )
            pid = daemon_pid(mp)
            s = mount_stats(mp, cli_env)
            maps = vmas(pid)
            dontdump = sum(size for size, flags in maps if "dd" in flags)
            assert s["cache_bytes"] > 0 and dontdump >= s["cache_bytes"], (dontdump, s)
            locked = s["buffers_locked_bytes"]
            assert vm_locked(pid) >= locked
            assert sum(size for size, flags in maps if {"dd", "lo"} <= flags) >= locked
            if limit is None:
                assert locked > 0
                budget = s["memlock_budget"]
                assert budget is None or locked <= budget
            else:
                assert s["memlock_budget"] == limit
                assert locked <= limit and vm_locked(pid) <= limit
                assert s["buffers_unlocked_bytes"] >= s["cache_bytes"] - limit > 0


# ------------------------------------------------------------------- finding 6: FIFOs ----


@pytest.mark.fuse
def test_fifos_in_place_of_objects_fail_their_opens_not_the_mount(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """45 objects replaced by FIFOs (more than trio's 40 threads): opening each of those files
    through the mount fails at once with EIO and a log line naming the file; every other file
    still reads. Before, each open blocked a thread forever, and then every open hung."""
    files = {f"f{i:02}.bin": os.urandom(1000 + i) for i in range(45)}
    files["good.bin"] = os.urandom(200_000)
    v = make_vault(tmp_path, files)
    fifos = []
    for name in files:
        if name != "good.bin":
            p = object_path(v, name)
            p.unlink()
            os.mkfifo(p)
            fifos.append(p)
    log = tmp_path / "pqfs.log"
    mp = tmp_path / "mnt"
    with mounted(v.storage.describe(), mp, cli_env, "--log-file", str(log)), cleanup(mp):
        results: dict[str, object] = {}
        threads = [
            threading.Thread(
                target=lambda n=name: results.__setitem__(n, in_thread((mp / n).read_bytes)),
                daemon=True,
            )
            for name in files
            if name != "good.bin"
        ]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(DEADLINE + 5)
            assert len(results) == len(threads)
            for name, got in results.items():
                assert isinstance(got, OSError) and got.errno == errno.EIO, (name, got)
            assert (mp / "good.bin").read_bytes() == files["good.bin"]
        finally:
            # Release opens blocked on a FIFO (the old code): a writer lets them through.
            deadline = time.monotonic() + DEADLINE
            while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
                for p in fifos:
                    with suppress(OSError):
                        os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
                time.sleep(0.05)
    lines = log.read_text().splitlines()
    assert any("f07.bin" in ln and "not a regular file (a FIFO)" in ln for ln in lines), lines


@pytest.mark.fuse
def test_an_open_on_a_stalled_store_gives_up_after_the_timeout(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """An object whose storage stops answering (here: bind-mounted from a second pqfs mount
    whose daemon is stopped, so open() blocks in the kernel) fails its open with EIO after
    2 x --timeout, and the mount goes on serving other files meanwhile."""
    data = os.urandom(300_000)
    a = make_vault(tmp_path / "a", {"x.bin": data, "y.txt": b"still served\n"})
    obj = object_path(a, "x.bin")
    b = make_vault(tmp_path / "b", {"obj.age": obj.read_bytes()})
    ma, mb = tmp_path / "ma", tmp_path / "mb"
    log = tmp_path / "a.log"
    with mounted(b.storage.describe(), mb, cli_env), cleanup(mb):
        subprocess.run(["mount", "--bind", str(mb / "obj.age"), str(obj)], check=True)
        b_pid = daemon_pid(mb)
        try:
            args = ("--timeout", "3", "--log-file", str(log))
            with mounted(a.storage.describe(), ma, cli_env, *args), cleanup(ma):
                assert (ma / "x.bin").read_bytes() == data  # through the bind mount
                a_pid = daemon_pid(ma)
                # Released: FUSE's release comes after close() returns, and closing the object
                # is a request to the other mount too (a flush), which must not meet it
                # stopped. Its descriptor goes first, then the flush; a read through the
                # mount's loop, which does the close, is answered only after both.
                wait_for("the release", lambda: not any(obj.name in t for t in fd_targets(a_pid)))
                assert (ma / "y.txt").read_bytes() == b"still served\n"
                os.kill(b_pid, signal.SIGSTOP)
                wait_for("it to stop", partial(stopped, b_pid))
                try:
                    t0 = time.monotonic()
                    got = in_thread((ma / "x.bin").read_bytes)
                    took = time.monotonic() - t0
                    assert isinstance(got, OSError) and got.errno == errno.EIO, got
                    assert took >= 5.5, took  # the bound (2 x 3 s), not some other failure
                    assert (ma / "y.txt").read_bytes() == b"still served\n"
                finally:
                    os.kill(b_pid, signal.SIGCONT)  # before any cleanup touches the mounts
                assert (ma / "x.bin").read_bytes() == data  # and it opens again
        finally:
            os.kill(b_pid, signal.SIGCONT)
            subprocess.run(["umount", "-l", str(obj)], check=False)
    assert "did not open within 6 s" in log.read_text()


def test_add_refuses_a_fifo_and_stores_proc_files_whole(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """`pqfs add V FIFO` fails at once with one line (it used to wait for a writer forever);
    a /proc file (st_size 0) is stored with all its bytes, read to EOF (it was stored empty)."""
    vault = str(make_vault(tmp_path, {}).storage.describe())
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = subprocess.run(
        [*PQFS, "add", vault, str(fifo), "x"], env=cli_env, capture_output=True, timeout=DEADLINE
    )
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert err.count("\n") == 1 and "not a regular file (a FIFO)" in err and "Traceback" not in err
    run_pqfs("add", vault, "/proc/version", "version", env=cli_env)
    run_pqfs("add", vault, "/proc/self/status", "status", env=cli_env)
    assert (
        run_pqfs("cat", vault, "version", env=cli_env).stdout == Path("/proc/version").read_bytes()
    )
    status = run_pqfs("cat", vault, "status", env=cli_env).stdout
    assert status.startswith(b"Name:") and b"\nPid:" in status
    listing = run_pqfs("ls", vault, "-l", env=cli_env).stdout.decode()
    assert f" {len(status)} " in next(ln for ln in listing.splitlines() if ln.endswith(" status"))
    assert not any(ln.endswith(" x") for ln in listing.splitlines())


# ------------------------------------------------------------------- finding 8 ----


@pytest.mark.fuse
def test_vault_files_and_the_log_are_private(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """Under umask 022: the vault directory and its subdirectories 0700, identity.age,
    catalog segments, objects and the config 0600, also after passwd; an existing empty
    directory given to init becomes 0700; a --log-file is created 0600."""

    new = "another passphrase"

    def pqfs(*args: str, passphrase: str = PASSPHRASE.decode()) -> None:
        proc = subprocess.run(
            [*PQFS, *args],
            env=dict(cli_env, PQFS_PASSPHRASE=passphrase, PQFS_NEW_PASSPHRASE=new),
            capture_output=True,
            timeout=DEADLINE,
            preexec_fn=lambda: os.umask(0o022),
        )
        assert proc.returncode == 0, proc.stderr

    vault = tmp_path / "new" / "vault"
    (tmp_path / "a.txt").write_text("a")
    pqfs("init", str(vault))
    pqfs("add", str(vault), str(tmp_path / "a.txt"))
    pqfs("passwd", str(vault))
    modes = {str(p.relative_to(vault)): stat.S_IMODE(p.stat().st_mode) for p in vault.rglob("*")}
    assert stat.S_IMODE(vault.stat().st_mode) == 0o700
    assert modes["identity.age"] == modes["pqfs.json"] == 0o600
    segments = [k for k in modes if k.startswith("catalog/") and k.endswith(".age")]
    objects = [k for k in modes if k.startswith("objects/") and k.endswith(".age")]
    assert len(segments) >= 2 and len(objects) == 1
    assert {modes[k] for k in segments + objects} == {0o600}
    dirs = [k for k in modes if (vault / k).is_dir()]
    assert "catalog" in dirs and "objects" in dirs and {modes[k] for k in dirs} == {0o700}
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    pqfs("init", str(empty))
    assert stat.S_IMODE(empty.stat().st_mode) == 0o700
    log, mp = tmp_path / "pqfs.log", tmp_path / "mnt"
    mp.mkdir()
    with cleanup(mp):
        pqfs("mount", str(vault), str(mp), "--log-file", str(log), passphrase=new)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600


@pytest.mark.fuse
def test_a_background_mount_says_when_its_log_goes_nowhere(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """With no syslog listening (PQFS_SYSLOG_SOCKET points where nothing does), a background
    mount without --log-file warns on stderr, naming --log-file; with one listening, it warns
    not and its lines arrive there; with --log-file or -f (stderr) there is nothing to say."""
    vault = make_vault(tmp_path, {"a.txt": b"a"}).storage.describe()
    mp = tmp_path / "mnt"
    mp.mkdir()
    nowhere = dict(cli_env, PQFS_SYSLOG_SOCKET=str(tmp_path / "no-syslog"))
    with cleanup(mp):
        out = run_pqfs("mount", vault, str(mp), env=nowhere)
        *_, warning, mounted_line = out.stderr.decode().splitlines()
        assert warning.startswith("pqfs: warning: no syslog") and "--log-file" in warning
        assert "no-syslog" in warning and mounted_line.startswith("mounted ")
    with notified(tmp_path, nowhere) as (env, sock):
        proc = spawn([*PQFS, "mount", "-f", vault, str(mp)], env)
        with cleanup(mp, proc):
            wait_ready(sock)
            proc.send_signal(signal.SIGTERM)
            rc, err = finish(proc)
            assert rc == 0 and "no syslog" not in err and "INFO: mounted" in err, err
    with cleanup(mp):
        out = run_pqfs("mount", vault, str(mp), "--log-file", str(tmp_path / "l"), env=nowhere)
        assert "warning" not in out.stderr.decode()
    sock_path = tmp_path / "syslog"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, cleanup(mp):
        sock.bind(str(sock_path))
        sock.settimeout(DEADLINE)
        out = run_pqfs(
            "mount", vault, str(mp), env=dict(cli_env, PQFS_SYSLOG_SOCKET=str(sock_path))
        )
        assert "warning" not in out.stderr.decode()
        lines: list[str] = []
        while not any("mounted" in ln for ln in lines):
            lines.append(sock.recv(4096).decode())
        assert any(re.search(r"pqfs\[\d+\]: INFO: mounted ", ln) for ln in lines), lines


@pytest.mark.slow
def test_scrypt_calibration_never_goes_below_ages_default(
    tmp_path: Path, cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """However slow the machine measures (an absurdly small target stands for a busy one),
    the work factor is at least 2^18, age's default; at most what readers accept;
    PQFS_SCRYPT_LOG_N still overrides it. `pqfs init` writes such an identity."""
    monkeypatch.delenv("PQFS_SCRYPT_LOG_N", raising=False)
    assert tune_scrypt(target_seconds=1e-6) == 18
    assert vault_mod.SCRYPT_MIN_LOG_N == 18
    assert tune_scrypt(target_seconds=1e6) == MAX_SCRYPT_LOG_N
    monkeypatch.setenv("PQFS_SCRYPT_LOG_N", "10")
    assert tune_scrypt(target_seconds=1e-6) == 10
    env = {k: v for k, v in cli_env.items() if k != "PQFS_SCRYPT_LOG_N"}
    run_pqfs("init", str(tmp_path / "v"), env=env)
    header = (tmp_path / "v" / "identity.age").read_bytes().split(b"\n---", 1)[0].decode()
    (stanza,) = [ln for ln in header.splitlines() if ln.startswith("-> scrypt ")]
    assert int(stanza.split()[-1]) >= 18


# ------------------------------------------------------------------- signals ----


@pytest.mark.fuse
def test_ctrl_c_while_the_modules_load_is_one_line(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """SIGINT while pqfs's modules load (stopped as the cryptography library is mapped, so the
    signal lands there): `pqfs: interrupted`, exit 130, no traceback."""
    vault = make_vault(tmp_path, {}).storage.describe()
    mp = tmp_path / "mnt"
    mp.mkdir()
    proc = spawn([*PQFS, "mount", vault, str(mp)], cli_env)
    with cleanup(mp, proc):

        def loading() -> bool:
            with suppress(OSError):
                return "cryptography" in Path(f"/proc/{proc.pid}/maps").read_text()
            return False

        wait_for("cryptography to load", loading)
        os.kill(proc.pid, signal.SIGSTOP)
        wait_for("it to stop", partial(stopped, proc.pid))
        os.kill(proc.pid, signal.SIGINT)
        os.kill(proc.pid, signal.SIGCONT)
        assert finish(proc) == (130, "pqfs: interrupted\n")
        assert mount_type(mp) is None


@pytest.mark.fuse
def test_ctrl_c_while_the_daemon_starts_stops_it(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """SIGINT to `pqfs mount` while its daemon starts (held stopped until the parent has told
    it to stop): exit 130, one line, and no daemon and no mount are left (before, the parent
    exited and the daemon went on to mount). A catalog of 20,000 entries keeps the start-up
    going long after the fork."""
    v = make_vault(tmp_path, {})
    v.commit(many_entries())
    vault = v.storage.describe()
    mp = tmp_path / "mnt"
    mp.mkdir()
    proc = spawn([*PQFS, "mount", vault, str(mp)], cli_env)
    with cleanup(mp, proc):
        (daemon,) = wait_for("the daemon", lambda: children(proc.pid))
        os.kill(daemon, signal.SIGSTOP)
        wait_for("the daemon to stop", partial(stopped, daemon))  # then a signal stays pending
        os.kill(proc.pid, signal.SIGINT)
        # Sent SIGTERM: pending while it is stopped, or fatal at once if it does not handle it
        # yet (the kernel kills a stopped process for a fatal signal).
        sigterm = 1 << (signal.SIGTERM - 1)
        wait_for("SIGTERM to the daemon", lambda: not alive(daemon) or pending(daemon) & sigterm)
        with suppress(ProcessLookupError):  # killed, and reaped by the parent already
            os.kill(daemon, signal.SIGCONT)
        assert finish(proc) == (130, "pqfs: interrupted\n")
        assert not alive(daemon) and mount_type(mp) is None


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP, signal.SIGTERM])
@pytest.mark.fuse
def test_a_signal_once_the_mount_is_up_changes_nothing(
    tmp_path: Path, cli_env: dict[str, str], sig: signal.Signals
) -> None:
    """A signal reaching `pqfs mount` when its daemon has reported the mount ready (the parent
    held stopped meanwhile) neither fails the command nor kills it after "mounted": exit 0,
    and the mount stays up."""
    vault = make_vault(tmp_path, {"a.txt": b"a"}).storage.describe()
    mp = tmp_path / "mnt"
    mp.mkdir()
    proc = spawn([*PQFS, "mount", vault, str(mp)], cli_env)
    with cleanup(mp, proc):
        (daemon,) = wait_for("the daemon", lambda: children(proc.pid))
        os.kill(proc.pid, signal.SIGSTOP)
        wait_for("it to stop", partial(stopped, proc.pid))
        os.kill(proc.pid, sig)

        def reported() -> bool:  # the daemon answers, and has closed its end of the pipe
            pipes = {t for t in fd_targets(proc.pid) if t.startswith("pipe:")}
            return answers(mp) and not pipes & fd_targets(daemon)

        wait_for("readiness", reported)
        os.kill(proc.pid, signal.SIGCONT)
        rc, err = finish(proc)
        assert rc == 0 and err.splitlines()[-1].startswith("mounted "), (rc, err)
        assert "Traceback" not in err and alive(daemon)
        assert (mp / "a.txt").read_bytes() == b"a"


@pytest.mark.fuse
def test_ctrl_c_during_a_foreground_start_up_unmounts(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """SIGINT to `pqfs mount -f` as soon as the kernel mount exists, while it still loads a
    catalog of 20,000 entries: the mount is gone, no traceback, and since it never was ready
    (no READY=1), exit 130 with `pqfs: interrupted` (it used to exit 0, as if it had served);
    were it ready already, a SIGINT would be the normal stop, exit 0."""
    v = make_vault(tmp_path, {})
    v.commit(many_entries())
    mp = tmp_path / "mnt"
    mp.mkdir()
    with notified(tmp_path, cli_env) as (env, sock):
        proc = spawn([*PQFS, "mount", "-f", v.storage.describe(), str(mp)], env)
        with cleanup(mp, proc):
            wait_for("the kernel mount", lambda: proc.poll() is None and mount_type(mp))
            os.kill(proc.pid, signal.SIGSTOP)
            wait_for("it to stop", partial(stopped, proc.pid))
            os.kill(proc.pid, signal.SIGINT)
            os.kill(proc.pid, signal.SIGCONT)
            rc, err = finish(proc)
            assert "Traceback" not in err and mount_type(mp) is None, err
            sock.setblocking(False)
            said = []
            with suppress(BlockingIOError):
                while True:
                    said += sock.recv(4096).decode().splitlines()
            if "READY=1" in said:
                assert rc == 0, err
            else:
                assert rc == 130 and err.endswith("pqfs: interrupted\n"), (rc, err)


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
@pytest.mark.fuse
def test_the_daemon_keeps_none_of_its_callers_descriptors(
    tmp_path: Path, cli_env: dict[str, str], foreground: bool
) -> None:
    """`pqfs mount` started with a pipe and a file open (inheritable): the serving daemon holds
    neither (closing our end of the pipe gives EOF at once), and still its FUSE device."""
    vault = make_vault(tmp_path, {"a.txt": b"a"}).storage.describe()
    mp = tmp_path / "mnt"
    mp.mkdir()
    r, w = os.pipe()
    held = tmp_path / "held.txt"
    f = held.open("w")
    inherited = {f"pipe:[{os.fstat(r).st_ino}]", str(held)}
    argv = [*PQFS, "mount", *(["-f"] if foreground else []), vault, str(mp)]
    stack = ExitStack()
    try:
        with stack, notified(tmp_path, cli_env) as (env, sock):
            proc = spawn(argv, env, pass_fds=(r, w, f.fileno()))
            stack.enter_context(cleanup(mp, proc))
            pid = serving_pid(foreground, proc, sock, mp)
            links = fd_targets(pid)
            assert not inherited & links, links
            assert "/dev/fuse" in links
            os.close(w)
            w = -1
            os.set_blocking(r, False)
            assert os.read(r, 1) == b""  # no one else holds the write end
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        f.close()
