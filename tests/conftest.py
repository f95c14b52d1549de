"""Shared fixtures. Vaults here use a low scrypt work factor (PQFS_SCRYPT_LOG_N) so that tests
stay fast; the production default is tuned to ~1 s (see vault.tune_scrypt)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from pqfs.vault.vault import Vault

pytest_plugins = ["tests.s3fixtures"]
ROOT = Path(__file__).resolve().parent.parent
PASSPHRASE = b"correct horse battery staple"

os.environ.setdefault("PQFS_SCRYPT_LOG_N", "10")
# A shell starts a command run in the background (`./test.sh &`, a CI runner's nohup) with
# SIGINT ignored, and every process inherits that: the tests' Ctrl-C would then reach no pqfs
# process. A handled signal is reset to its default at exec, so one handler here gives every
# child the default disposition back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# The suite starts `python -m pqfs` hundreds of times: without the bytecode cache each of them
# compiles every pqfs module again (~40 ms of CPU apiece), a tenth of the fast tier's time.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


# -------------------------------------------------------------------------- tiers ----
# Markers by resource (pyproject.toml; README, Development): the fast tier deselects `fuse`,
# `s3`, `media` and `slow`. `s3` follows from the fixtures (each S3 fixture needs `seaweed`);
# the others are written beside the tests. The guards below fail a test that mounts FUSE, runs
# the S3 server or a media tool without its marker: the fast tier cannot come to need them
# unnoticed.

MEDIA_TOOLS = frozenset({"ffmpeg", "ffprobe", "metaflac", "flac", "sox", "mediainfo"})
FUSE_DEVICE = ("/dev/fuse", b"/dev/fuse", Path("/dev/fuse"))
_running: pytest.Item | None = None  # the test being set up, run or torn down


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "seaweed" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.s3)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[object]:
    global _running
    _running = item
    try:
        return (yield)
    finally:
        _running = None


def require_marker(name: str, what: str) -> None:
    """Fail the running test if it does `what` without being marked `name`."""
    item = _running
    if item is not None and item.get_closest_marker(name) is None:
        pytest.fail(f"{item.nodeid} {what} but is not marked {name!r} (see tests/conftest.py)")


def _audit(event: str, args: tuple[Any, ...]) -> None:
    # Every process the tests start, and the in-process opens of the FUSE device.
    if event == "subprocess.Popen":
        argv = args[1]
        prog = argv if isinstance(argv, str | bytes | os.PathLike) else argv[0]
        name = os.path.basename(os.fsdecode(prog).split()[0]) if prog else ""
        if name in MEDIA_TOOLS:
            require_marker("media", f"runs {name}")
    elif event == "open" and args[0] in FUSE_DEVICE:
        require_marker("fuse", "opens /dev/fuse")


def pytest_configure(config: pytest.Config) -> None:
    sys.addaudithook(_audit)


# Hypothesis profiles, chosen by PQFS_HYPOTHESIS_PROFILE: "ci" (the default, what ./test.sh
# runs) gives every property test its own number of examples; "fast" (for the fast tier's quick
# loop) at most 25 of them. A test's own max_examples outranks any profile, so the tests take
# theirs through examples().
settings.register_profile("ci")
settings.register_profile("fast", max_examples=25)
settings.load_profile(os.environ.get("PQFS_HYPOTHESIS_PROFILE", "ci"))


def examples(n: int) -> int:
    """max_examples for a property test that runs `n` of them in the ci profile."""
    if settings.get_current_profile_name() == "fast":
        return min(n, settings.default.max_examples)
    return n


@pytest.fixture(autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's own trust state (vault/trust.py: pins of vault id, config generation and
    catalog head), as a fresh host would have it; every pqfs process it starts inherits it."""
    path = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("PQFS_STATE_DIR", str(path))
    return path


@pytest.fixture
def vault(tmp_path: Path) -> Vault:
    """A fresh, unlocked vault (post-quantum identity plus an X25519 one for age interop)."""
    return Vault.create(str(tmp_path / "vault"), PASSPHRASE, classic=True, log_n=10)


@pytest.fixture
def pq_vault(tmp_path: Path) -> Vault:
    """A fresh, unlocked vault with only the post-quantum identity."""
    return Vault.create(str(tmp_path / "pqvault"), PASSPHRASE, log_n=10)


@pytest.fixture
def cli_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = dict(os.environ)
    env["PQFS_PASSPHRASE"] = PASSPHRASE.decode()
    env["PQFS_SCRYPT_LOG_N"] = "10"
    env.pop("PQFS_DEBUG", None)
    yield env


def run_pqfs(
    *args: str, env: dict[str, str] | None = None, input: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """Run the real `pqfs` entry point in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "pqfs", *args],
        env=env,
        input=input,
        capture_output=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"pqfs {' '.join(args)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}"
        )
    return proc


def sha_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (through a mount: ordinary reads)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def mount_stats(mp: Path, env: dict[str, str]) -> dict[str, Any]:
    """`pqfs stats --json` of a mount."""
    return json.loads(run_pqfs("stats", str(mp), "--json", env=env).stdout)  # type: ignore[no-any-return]


def tree_snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: to assert that nothing changed on disk."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ------------------------------------------------------------------------- mounts ----


def mount_type(path: Path) -> str | None:
    from pqfs.mount.daemon import mount_type as _mount_type

    return _mount_type(str(path))


def wait_gone(pid: int, timeout: float = 60.0) -> None:
    """Wait until process `pid` has exited (polled: a busy machine takes its time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still running")


def daemon_pid(mountpoint: Path) -> int:
    """The pid of the pqfs daemon serving `mountpoint`."""
    target = str(mountpoint)
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if (
            "mount" in args
            and "pqfs" in " ".join(args)
            and any(a == target or os.path.abspath(a) == target for a in args[1:])
        ):
            return int(d.name)
    raise AssertionError(f"no pqfs daemon for {mountpoint}")


@contextlib.contextmanager
def mounted(
    vault_dir: Path | str, mountpoint: Path, env: dict[str, str], *args: str
) -> Iterator[Path]:
    """`pqfs mount` (background daemon) for the duration of the block, then `pqfs umount`."""
    require_marker("fuse", "mounts FUSE")
    mountpoint.mkdir(exist_ok=True)
    run_pqfs("mount", str(vault_dir), str(mountpoint), *args, env=env)
    try:
        assert mount_type(mountpoint) == "fuse.pqfs"
        yield mountpoint
    finally:
        if mount_type(mountpoint) is not None:
            proc = run_pqfs("umount", str(mountpoint), env=env, check=False)
            if proc.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


@contextlib.contextmanager
def notify_socket(path: Path) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(60)
    try:
        yield sock
    finally:
        sock.close()


@contextlib.contextmanager
def foreground_mount(
    argv: list[str], env: dict[str, str], mountpoint: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`pqfs ARGV` (a `mount -f`) as a child process; killed and unmounted if still there."""
    require_marker("fuse", "mounts FUSE")
    proc = subprocess.Popen([sys.executable, "-m", "pqfs", *argv], env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if mount_type(mountpoint) is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def stop_with_sigterm(proc: subprocess.Popen[bytes], sock: socket.socket, mountpoint: Path) -> None:
    """SIGTERM, as systemd stops a unit: STOPPING=1, a clean exit, and the mount gone."""
    proc.send_signal(signal.SIGTERM)
    assert "STOPPING=1" in sock.recv(4096).decode().splitlines()
    assert proc.wait(timeout=30) == 0
    assert mount_type(mountpoint) is None
