"""Vaults on S3-compatible object storage (AWS S3, MinIO, Ceph, B2, R2, SeaweedFS).

`s3://bucket/prefix` holds exactly the keys a local vault holds under its directory, so a vault
copied object by object between the two opens unchanged. Endpoint, region and credentials come
from the standard AWS environment variables and config files (AWS_ENDPOINT_URL, AWS_PROFILE, ...),
plus `--endpoint-url`.

Every call here blocks: the mount runs them on its worker threads, never on the trio loop. One
boto3 client (thread-safe) is shared, with a connection pool of CONNECTIONS.

Reads are HTTP Range GETs. The mount asks for runs of whole chunks (adjacent chunks merged into
one request, several requests in flight during playback); opening an object is one GET of its
first OPEN_FETCH bytes, which also gives the object size (Content-Range), the header and the
first chunk, and for the mount a second GET, sent alongside, of the final chunk (S3Source).
With a disk cache, requests are widened to whole cache blocks and served from disk once
fetched.

Range GETs, the hot path, skip botocore's per-request machinery: botocore presigns one GET URL
per object (SigV4 in the query string, made again well before it expires, and at once after a
403), and each range request is a plain HTTP GET of that URL with a Range header over a small
pool of persistent http.client connections (the stdlib HTTP layer beneath urllib3 and botocore),
its body read straight into the caller's buffer; a random read's GET is even sent and awaited
on the mount's trio loop (`s3async`), with a worker taking over if that one attempt fails.
Measured against SeaweedFS on this project's VM, 128 KiB at random offsets of a 1 GiB object,
page cache dropped: p50 2.9 ms through boto3's get_object, 1.6 ms over a urllib3 pool, 1.55 ms
over http.client. Where an HTTP proxy is configured (HTTP(S)_PROXY), GETs go through boto3
instead, which honours it.

Faults: timeouts, resets, 5xx and throttling are retried with exponential backoff and full
jitter until the operation's time budget (`timeout`) is spent; then RemoteError (EIO in the mount).
A slow or dead request holds only its own worker; the mount bounds workers per open file.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import os
import random
import re
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar, cast

from pqfs.errors import Unavailable, VaultError
from pqfs.runtime.memory import scratch
from pqfs.runtime.pools import DaemonExecutor
from pqfs.storage.base import TMP_PREFIX, Storage, StorageOptions
from pqfs.storage.diskcache import BLOCK, DiskCache
from pqfs.storage.s3async import Fallback, LoopGets, answered_range, closed_by_peer

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

CONNECTIONS = 16  # concurrent requests (the mount's worker threads) and pooled connections
OPEN_FETCH = 3 * BLOCK  # first GET of an object: header, nonce and a first 128 KiB read
HEAD_READS = 4  # reads served from the opening fetch before it is released
# What the second GET of an opening fetches from the final chunk's start (S3Source `tail`): a
# final chunk is at most 64 KiB + 16 (stream.CT_CHUNK); a whole block covers it, and fewer
# bytes come back at the object's end.
TAIL_FETCH = BLOCK + 16
PART_SIZE = 8 << 20  # multipart upload part (S3's minimum is 5 MiB)
UPLOADS_IN_FLIGHT = 3  # parts uploading at once while the next one is encrypted
BACKOFF_BASE = 0.05  # seconds; doubled per attempt, capped, with full jitter
BACKOFF_CAP = 2.0
STALE_UPLOAD_AGE = 24 * 3600  # gc aborts multipart uploads older than this (interrupted adds)
PRESIGN_TTL = 3600  # seconds a presigned range GET URL is valid
# ... but it is made again after this long: a URL also dies with the temporary credentials
# (STS, SSO, instance roles) it was signed with, which botocore renews 10-15 minutes before
# they expire; signing costs ~0.3 ms per object.
PRESIGN_RENEW = 300
# Refusals of a presigned GET that a new signature cures (expired URL or session credentials).
_RESIGN_CODES = {"ExpiredToken", "ExpiredRequest", "TokenRefreshRequired", "RequestExpired"}
PRESIGNED_KEYS = 4096  # objects whose presigned GET URL is kept (least recently used dropped)

T = TypeVar("T")

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-_]{1,62}")
_RETRY_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "RequestLimitExceeded",
}


class RemoteError(VaultError):
    """The object store did not answer within the time budget, or refused the request."""


def parse_url(url: str) -> tuple[str, str]:
    """`s3://bucket[/prefix]` -> (bucket, prefix ending in "/" or empty)."""
    rest = url[len("s3://") :] if url.startswith("s3://") else ""
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise VaultError(f"not an S3 vault location: {url!r} (expected s3://bucket/prefix)")
    prefix = prefix.strip("/")
    if ".." in prefix.split("/"):
        raise VaultError(f"invalid S3 prefix in {url!r}")
    return bucket, prefix + "/" if prefix else ""


def _status(e: BaseException) -> tuple[int, str]:
    if isinstance(e, _HTTPStatus):
        return e.status, e.code
    resp = getattr(e, "response", None) or {}
    code = str(resp.get("Error", {}).get("Code", ""))
    return int(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0), code


class _HTTPStatus(Exception):
    """An error answer to a presigned GET: its status and S3 error code."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"{status} {code}")
        self.status, self.code = status, code


_ERROR_CODE = re.compile(rb"<Code>([A-Za-z0-9.]{1,64})</Code>")


class _Connections:
    """Idle persistent HTTP(S) connections for presigned range GETs, at most CONNECTIONS kept
    per host (a request takes one or opens one, and gives it back only after reading its
    response to the end; more requests at once than that open connections that are closed
    after use, as urllib3's non-blocking pool does).

    Why not a urllib3 pool: per request it parses the long presigned URL twice (~40 us here).
    A connection the server has closed while idle is replaced before use (checked as urllib3
    does), so it costs no retry."""

    def __init__(self, connect_timeout: float, read_timeout: float, ca_file: str | None) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._ca_file = ca_file
        self._ssl: ssl.SSLContext | None = None
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, str], list[http.client.HTTPConnection]] = {}
        self._closed = False

    def get(self, scheme: str, netloc: str) -> http.client.HTTPConnection:
        while True:
            with self._lock:
                idle = self._idle.get((scheme, netloc))
                conn = idle.pop() if idle else None
            if conn is None:
                break
            if conn.sock is not None and not closed_by_peer(conn.sock.fileno()):
                return conn
            conn.close()
        if scheme == "https":
            conn = http.client.HTTPSConnection(
                netloc, timeout=self._connect_timeout, context=self.context()
            )
        else:
            conn = http.client.HTTPConnection(netloc, timeout=self._connect_timeout)
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(self._read_timeout)  # connect and read have their own bounds
        except BaseException:
            conn.close()
            raise
        return conn

    def context(self) -> ssl.SSLContext:
        """The TLS settings of every HTTPS GET (botocore's CA bundle, or AWS_CA_BUNDLE)."""
        with self._lock:
            if self._ssl is None:
                self._ssl = ssl.create_default_context(cafile=self._ca_file)
            return self._ssl

    def put(self, scheme: str, netloc: str, conn: http.client.HTTPConnection) -> None:
        """Give back a connection whose last response was read to its end."""
        with self._lock:
            idle = self._idle.setdefault((scheme, netloc), [])
            if len(idle) < CONNECTIONS and not self._closed:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True  # a GET still running gives its connection back to nobody
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


class S3Storage(Storage):
    io_workers = CONNECTIONS
    jobs_per_object = CONNECTIONS // 2  # a slow object never holds every worker
    read_chunks = 64  # 4 MiB readahead GETs: half the server and client CPU of 1 MiB ones
    reuse_read_buffers = False

    def __init__(self, url: str, options: StorageOptions | None = None) -> None:
        opts = options or StorageOptions()
        self.bucket, self.prefix = parse_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.timeout = opts.timeout
        self.disk_cache = (
            DiskCache(opts.disk_cache, opts.disk_cache_size) if opts.disk_cache else None
        )
        # Each attempt is bounded well inside the budget, so a dead server is retried and a
        # blackholed one still fails in about `timeout`. Retries are ours (with the budget).
        self._connect_timeout = max(0.5, min(5.0, opts.timeout / 4))
        self._read_timeout = max(1.0, min(20.0, opts.timeout / 3))
        self._client = self._make_client(opts)
        self._lock = threading.Lock()
        self._http = self._make_http()
        self._loop_gets = (
            LoopGets(CONNECTIONS, self._http.context) if self._http is not None else None
        )
        # key -> (scheme, host[:port], path?query of its presigned GET URL, when to sign again)
        self._urls: OrderedDict[str, tuple[str, str, str, float]] = OrderedDict()
        self._tails: DaemonExecutor | None = None  # GETs sent alongside an opening one
        self.counters = {
            "s3_gets": 0,
            "s3_get_bytes": 0,
            "s3_requests": 0,
            "s3_retries": 0,
            "s3_failures": 0,
            "s3_loop_gets": 0,  # small GETs sent from the mount's loop (s3async)
            "s3_loop_fallbacks": 0,  # ... that a worker took over (an error, no URL yet)
        }

    def _make_client(self, opts: StorageOptions) -> S3Client:
        import boto3  # imported here: only S3 vaults pay for it
        from botocore.config import Config

        config = Config(
            connect_timeout=self._connect_timeout,
            read_timeout=self._read_timeout,
            retries={"total_max_attempts": 1},
            max_pool_connections=CONNECTIONS,
            tcp_keepalive=True,
            user_agent_extra="pqfs",
            s3={"addressing_style": "path"} if opts.endpoint_url else None,
        )
        try:
            session = boto3.session.Session()
            return session.client("s3", endpoint_url=opts.endpoint_url or None, config=config)
        except ValueError as e:  # botocore: "Invalid endpoint: ..."
            raise VaultError(f"S3: {e}") from None
        except Exception as e:
            raise VaultError(f"S3: cannot set up a client: {type(e).__name__}: {e}") from None

    def _make_http(self) -> _Connections | None:
        """Connections for presigned range GETs; None (boto3 GETs) behind an HTTP proxy."""
        from botocore.httpsession import get_cert_path

        endpoint = urllib.parse.urlsplit(self._client.meta.endpoint_url)
        if urllib.request.getproxies() and not urllib.request.proxy_bypass(endpoint.hostname or ""):
            return None
        ca = os.environ.get("AWS_CA_BUNDLE") or get_cert_path(True)
        return _Connections(self._connect_timeout, self._read_timeout, ca)

    # ------------------------------------------------------------------ requests ----

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run one request with retries; `what` names it in errors (never data or secrets)."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        deadline = time.monotonic() + self.timeout
        attempt = 0
        while True:
            self._count("s3_requests")
            try:
                return fn()
            except (ClientError, _HTTPStatus) as e:
                status, code = _status(e)
                if code == "NoSuchBucket":
                    raise VaultError(f"S3 bucket {self.bucket} does not exist") from None
                if status == 404 or code in ("NoSuchKey", "NotFound"):
                    raise FileNotFoundError(what) from None
                if status == 412 or code == "PreconditionFailed":
                    raise FileExistsError(what) from None
                if status in (401, 403):
                    raise RemoteError(f"S3 refused {what}: {code or status}") from None
                if not (status >= 500 or status == 429 or code in _RETRY_CODES):
                    raise RemoteError(f"S3 {what}: {code or status}") from None
                reason = code or str(status)
            except (NoCredentialsError, PartialCredentialsError):
                raise VaultError(
                    "S3: no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                    "AWS_PROFILE)"
                ) from None
            except (BotoCoreError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
                reason = type(e).__name__
            except Exception as e:
                if not _is_transport_error(e):
                    raise
                reason = type(e).__name__
            attempt += 1
            pause = random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))
            if time.monotonic() + pause >= deadline:
                self._count("s3_failures")
                raise Unavailable(
                    f"S3 {what}: no answer within {self.timeout:g} s ({attempt} attempts, "
                    f"last: {reason})"
                )
            self._count("s3_retries")
            time.sleep(pause)

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise VaultError(f"invalid object key {key!r}")
        return self.prefix + key

    def get_range(self, key: str, start: int, buf: memoryview) -> tuple[int, int]:
        """Fill `buf` with bytes [start, start+len(buf)) of `key`, straight from the response
        body; returns (bytes read, fewer at the object's end; the object size)."""
        what = f"GET {key} [{start}, {start + len(buf)})"
        if self._http is not None:
            refused = [False]

            def get() -> tuple[int, int]:
                try:
                    return self._presigned_get(key, start, buf)
                except _HTTPStatus as e:
                    if (e.status == 403 or e.code in _RESIGN_CODES) and not refused[0]:
                        # A URL signed with credentials that have since expired (or a clock
                        # that jumped): sign again, once, with what botocore has now.
                        refused[0] = True
                        with self._lock:
                            self._urls.pop(key, None)
                        raise ConnectionError("presigned GET refused; signing again") from None
                    raise

            got, size = self._call(what, get)
        else:
            got, size = self._call(what, functools.partial(self._boto_get, key, start, buf))
        self._count("s3_gets")
        self._count("s3_get_bytes", got)
        return got, size

    def cached_url(self, key: str) -> tuple[str, str, str] | None:
        """The presigned GET URL of `key` if one is at hand (never signs: that may block)."""
        with self._lock:
            hit = self._urls.get(key)
            if hit is None or hit[3] <= time.monotonic():
                return None
            self._urls.move_to_end(key)
            return hit[0], hit[1], hit[2]

    async def aget_range(self, key: str, start: int, buf: memoryview) -> tuple[int, int]:
        """get_range's one attempt from the trio loop (s3async); Fallback: read on a worker."""
        url = self.cached_url(key)
        if url is None or self._loop_gets is None:
            raise Fallback("no presigned URL at hand")
        got, size = await self._loop_gets.get_range(*url, start, buf)
        self._count("s3_gets")
        self._count("s3_loop_gets")
        self._count("s3_get_bytes", got)
        return got, size

    def _url(self, key: str) -> tuple[str, str, str]:
        """The presigned GET URL of `key` (made by botocore, which also finds the credentials),
        as (scheme, host[:port], path?query)."""
        hit = self.cached_url(key)
        if hit is not None:
            return hit
        now = time.monotonic()
        url = urllib.parse.urlsplit(
            self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._key(key)},
                ExpiresIn=PRESIGN_TTL,
            )
        )
        target = url.path + ("?" + url.query if url.query else "")
        with self._lock:
            self._urls[key] = (url.scheme, url.netloc, target, now + PRESIGN_RENEW)
            self._urls.move_to_end(key)
            while len(self._urls) > PRESIGNED_KEYS:
                self._urls.popitem(last=False)
        return url.scheme, url.netloc, target

    def _presigned_get(self, key: str, start: int, buf: memoryview) -> tuple[int, int]:
        assert self._http is not None
        scheme, netloc, target = self._url(key)
        conn = self._http.get(scheme, netloc)
        done = False
        try:
            conn.request("GET", target, headers={"Range": f"bytes={start}-{start + len(buf) - 1}"})
            r = conn.getresponse()
            if r.status == 416:  # a range past the end: only of an empty object
                total = (r.getheader("Content-Range") or "").rpartition("/")[2]
                r.read()
                if total.isascii() and total.isdigit():
                    done = True
                    return 0, int(total)
            if r.status not in (200, 206):
                match = _ERROR_CODE.search(r.read(64 << 10))
                raise _HTTPStatus(r.status, match.group(1).decode() if match else "")
            answer = answered_range(
                start,
                len(buf),
                r.getheader("Content-Length") or "",
                r.getheader("Content-Range") if r.status == 206 else None,  # 200: the whole
            )
            if answer is None:
                raise ConnectionError("unexpected range in the response")  # retried
            length, size = answer
            got = _read_body(r.readinto, buf, length)
            if not r.isclosed() and r.read():  # an empty body: let http.client finish it
                raise ConnectionError("more body than announced")
            done = True
            return got, size
        finally:
            if done:  # the response was read to its end: the connection can serve another
                self._http.put(scheme, netloc, conn)
            else:  # part of a response may still be on the wire: never reuse it
                conn.close()

    def _boto_get(self, key: str, start: int, buf: memoryview) -> tuple[int, int]:
        r = self._client.get_object(
            Bucket=self.bucket,
            Key=self._key(key),
            Range=f"bytes={start}-{start + len(buf) - 1}",
        )
        answer = answered_range(
            start, len(buf), str(r.get("ContentLength", "")), r.get("ContentRange")
        )
        if answer is None:
            raise ConnectionError("unexpected range in the response")  # retried
        length, size = answer
        body = r["Body"]
        raw, readinto = _body_reader(body, r)
        try:
            got = _read_body(readinto, buf, length)
            if raw is not None:  # read past urllib3, which would have done this itself
                raw.release_conn()
        finally:
            body.close()  # after release_conn, this leaves the connection in the pool
        return got, size

    # ------------------------------------------------------------------ Storage ----

    def open_source(self, key: str) -> S3Source:
        return S3Source(self, key)

    def open_source_with_tail(self, key: str, tail: int) -> S3Source:
        return S3Source(self, key, tail)

    def get_soon(self, key: str, start: int, length: int) -> Future[tuple[memoryview, int]]:
        """get_range of [start, start+length) on a thread of its own, begun now: (the bytes,
        fewer at the object's end; the object size)."""
        with self._lock:
            if self._tails is None:
                self._tails = DaemonExecutor(CONNECTIONS, "pqfs-s3-tail")
            pool = self._tails

        def get() -> tuple[memoryview, int]:
            buf = memoryview(bytearray(length))
            got, size = self.get_range(key, start, buf)
            return buf[:got], size

        return pool.submit(get)

    def read_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            r = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            data = r["Body"].read()
            if len(data) != r["ContentLength"]:
                raise ConnectionError("short body")
            return data

        data = self._call(f"GET {key}", get)
        self._count("s3_gets")
        self._count("s3_get_bytes", len(data))
        return data

    @contextlib.contextmanager
    def writer(self, key: str, exclusive: bool = False) -> Iterator[BinaryIO]:
        up = Upload(self, key, exclusive)
        try:
            yield cast(BinaryIO, up)
            up.finish()
        except BaseException:
            up.abort()
            raise

    def list(self, prefix: str) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        token: str | None = None
        full = self._key(prefix) if prefix else self.prefix
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
            if token:
                kw["ContinuationToken"] = token
            page = self._call(
                f"LIST {prefix or '/'}", functools.partial(self._client.list_objects_v2, **kw)
            )
            for obj in page.get("Contents", []):
                name = obj["Key"][len(self.prefix) :]
                # Temp files of a local vault copied into the bucket are writes in progress.
                if (
                    name
                    and not name.endswith("/")
                    and not name.rpartition("/")[2].startswith(TMP_PREFIX)
                ):
                    out.append((name, int(obj["Size"])))
            if not page.get("IsTruncated"):
                return out
            token = page.get("NextContinuationToken")

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call(
                f"DELETE {key}",
                lambda: self._client.delete_object(Bucket=self.bucket, Key=self._key(key)),
            )

    def exists(self, key: str) -> bool:
        try:
            self._call(
                f"HEAD {key}",
                lambda: self._client.head_object(Bucket=self.bucket, Key=self._key(key)),
            )
        except FileNotFoundError:
            return False
        return True

    def empty(self) -> bool:
        page = self._call(
            "LIST /",
            lambda: self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1),
        )
        return not page.get("Contents")

    def describe(self) -> str:
        return self.url

    def stats(self) -> dict[str, object]:
        with self._lock:
            out: dict[str, object] = dict(self.counters)
        if self.disk_cache is not None:
            out.update(self.disk_cache.stats())
        return out

    def abort_stale_uploads(self, older_than: float = STALE_UPLOAD_AGE) -> int:
        """Abort multipart uploads left by interrupted adds (they are invisible, but billed)."""
        page = self._call(
            "LIST uploads",
            lambda: self._client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix),
        )
        n = 0
        for u in page.get("Uploads", []):
            started = u.get("Initiated")
            if started is not None and time.time() - started.timestamp() < older_than:
                continue
            with contextlib.suppress(FileNotFoundError):
                self._call(
                    f"ABORT {u['Key']}",
                    functools.partial(
                        self._client.abort_multipart_upload,
                        Bucket=self.bucket,
                        Key=u["Key"],
                        UploadId=u["UploadId"],
                    ),
                )
            n += 1
        return n

    def close(self) -> None:
        if self._tails is not None:
            self._tails.shutdown(wait=False)
        if self._loop_gets is not None:
            self._loop_gets.close()
        if self._http is not None:
            self._http.close()
        if self.disk_cache is not None:
            self.disk_cache.close()


def _read_body(readinto: Callable[[memoryview], int], buf: memoryview, length: int) -> int:
    """Read a body of `length` bytes into `buf`; a cut connection is a (retried) error."""
    got = 0
    while got < length:
        n = readinto(buf[got:length])
        if not n:
            raise ConnectionError("short body")
        got += n
    return got


def _is_transport_error(e: BaseException) -> bool:
    """A failure of the connection or of HTTP itself (OSError, or urllib3's errors beneath
    boto3): retried."""
    import urllib3.exceptions

    return isinstance(e, urllib3.exceptions.HTTPError | OSError)


def _body_reader(body: Any, response: Any) -> tuple[Any, Callable[[memoryview], int]]:
    """How to read a GET's body into our buffer: straight from the http.client response
    beneath botocore and urllib3 where it is there, else through the body's own readinto.

    Why: urllib3's readinto reads into a new bytes object and copies it; each such multi-MiB
    object is fresh mmap'd memory (mount.bound_malloc) whose pages fault in on first touch.
    Measured with 8 threads of 4 MiB range GETs from SeaweedFS: 0.82 GB/s and 1.28 client CPU
    s/GiB through urllib3, 1.18 GB/s and 0.75 s/GiB from the http.client response. With a
    Content-Encoding, or another stack beneath botocore, the body's own reader is used."""
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if (
        isinstance(fp, http.client.HTTPResponse)
        and hasattr(raw, "release_conn")
        and not response.get("ContentEncoding")
        and not getattr(raw, "_fp_bytes_read", 0)
    ):
        return raw, fp.readinto
    return None, body.readinto


class S3Source:
    """Random access to one object by Range GETs (a RangeSource). Thread-safe: the mount reads
    one object from several workers at once.

    Opening fetches the object's first OPEN_FETCH bytes (header, nonce, the first chunks) in one
    GET, which also tells the size. They stay in memory only until the reading starts in earnest
    (a read past them, or HEAD_READS reads from them), so memory does not grow with open files.

    With `tail` (the mount: where the final chunk starts, from the catalog), the bytes from
    there to the end are fetched by a second GET sent alongside the first, when the first does
    not reach them: the mount authenticates the final chunk at open, and two GETs in parallel
    cost one round trip. They are kept for one read.
    """

    def __init__(self, storage: S3Storage, key: str, tail: int | None = None) -> None:
        self.storage = storage
        self.key = key
        self._head_reads = 0
        # (start, length, its GET) of the tail, until it is read
        self._tail: tuple[int, int, Future[tuple[memoryview, int]]] | None = None
        dc = storage.disk_cache
        size = dc.size_of(key) if dc is not None else None
        if size is not None and dc is not None:
            head = bytearray(min(OPEN_FETCH, size))
            if dc.read(key, 0, memoryview(head)):
                self.size, self._head = size, head
                return  # no GET to overlap: a later read of the tail finds it as any other
        if tail is not None and tail + TAIL_FETCH > OPEN_FETCH:
            # Whole cache blocks with a disk cache (stored, so that the next open finds them).
            lo = tail // BLOCK * BLOCK if dc is not None else tail
            length = tail + TAIL_FETCH - lo
            self._tail = (lo, length, storage.get_soon(key, lo, length))
        head = bytearray(OPEN_FETCH)
        n, self.size = storage.get_range(key, 0, memoryview(head))
        del head[n:]
        self._head = head
        if dc is not None:
            dc.store(key, 0, memoryview(head), self.size)

    def preadinto(self, offset: int, buf: memoryview) -> int:
        n = max(0, min(len(buf), self.size - offset))
        if n == 0:
            return 0
        if self._tail is not None and self._from_tail(offset, buf[:n]):
            return n  # before the head: a read of the tail must not release the head
        end = offset + n
        head = self._head  # one read of the attribute: another thread may release it
        skip = 0
        if offset < len(head):
            skip = min(end, len(head)) - offset
            buf[:skip] = head[offset : offset + skip]
            self._head_reads += 1
        if end > len(head) or self._head_reads >= HEAD_READS:
            self._head = bytearray()  # reading goes on past the opening: memory back
        if skip < n:
            self._fetch(offset + skip, buf[skip:n])
        return n

    def _from_tail(self, offset: int, buf: memoryview) -> bool:
        """Fill `buf` from the tail fetched at open (waiting for its GET), if it holds all of
        it; then let it go. False otherwise: an error of that GET is met again, with its
        own retries, by the ordinary read that follows."""
        tail = self._tail  # one read of the attribute: another thread may release it
        if tail is None:
            return False
        lo, length, future = tail
        if not lo <= offset <= offset + len(buf) <= lo + length:
            return False  # the header's reads, before it: they do not wait for its GET
        try:
            data, size = future.result()
        except Exception:
            self._tail = None
            return False
        if not lo <= offset <= offset + len(buf) <= lo + len(data):
            return False
        self._tail = None
        dc = self.storage.disk_cache
        if dc is not None and size == self.size:
            dc.store(self.key, lo, data, size)
        buf[:] = data[offset - lo : offset - lo + len(buf)]
        return True

    def _fetch(self, offset: int, buf: memoryview) -> None:
        dc = self.storage.disk_cache
        if dc is None:
            self.storage.get_range(self.key, offset, buf)
            return
        if dc.read(self.key, offset, buf):
            return
        end = offset + len(buf)
        lo = offset // BLOCK * BLOCK  # whole blocks, so that the next reader finds them
        hi = min(self.size, -(-end // BLOCK) * BLOCK)
        span = scratch(hi - lo)
        self.storage.get_range(self.key, lo, span)
        dc.store(self.key, lo, span, self.size)
        buf[:] = span[offset - lo : end - lo]

    def will_need(self, offset: int, length: int) -> None:
        pass  # the mount's readahead jobs already keep several range requests in flight

    @property
    def fetches(self) -> bool:
        # With a disk cache the read goes through a file (it may wait): a worker's job.
        return self.storage.disk_cache is None and self.storage._loop_gets is not None

    async def fetch(self, offset: int, buf: memoryview) -> bool:
        if not self.fetches or offset + len(buf) > self.size:
            return False
        try:
            got, _ = await self.storage.aget_range(self.key, offset, buf)
        except Fallback:
            self.storage._count("s3_loop_fallbacks")
            return False
        return got == len(buf)

    def direct_fd(self) -> int | None:
        return None

    def read_cached(self, offset: int, buf: memoryview) -> bool:
        # Only the opening fetch is in memory (the disk cache is a file: it may wait on I/O).
        head = self._head  # one read of the attribute: another thread may release it
        if offset + len(buf) > len(head):
            return False
        buf[:] = head[offset : offset + len(buf)]
        self._head_reads += 1
        if self._head_reads >= HEAD_READS:
            self._head = bytearray()
        return True

    def close(self) -> None:
        self._head = bytearray()
        self._tail = None


class Upload:
    """A streamed object: one PUT if it is small, else a multipart upload whose parts go out on
    a few threads while the caller produces the next. Nothing is visible at `key` until
    finish(); abort() (any error, Ctrl-C) cancels the upload server-side."""

    def __init__(self, storage: S3Storage, key: str, exclusive: bool) -> None:
        self.storage = storage
        self.key = key
        self.full_key = storage._key(key)
        self.exclusive = exclusive
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._created: Future[str] | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._pool: DaemonExecutor | None = None

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buf += data
        while len(self._buf) >= PART_SIZE:
            part = bytes(self._buf[:PART_SIZE])
            del self._buf[:PART_SIZE]
            self._send(part)
        return len(data)

    def _send(self, part: bytes) -> None:
        s = self.storage
        if self._upload_id is None:
            # The create runs on the pool, not on this thread: a Ctrl-C landing as its answer
            # came back would lose the id here, and the upload would outlive the add (unseen,
            # billed; it happened in CI). abort() waits for the pool and takes the id from the
            # future instead.
            self._pool = DaemonExecutor(UPLOADS_IN_FLIGHT, "pqfs-upload")
            self._created = self._pool.submit(
                lambda: s._call(
                    f"CREATE UPLOAD {self.key}",
                    lambda: s._client.create_multipart_upload(Bucket=s.bucket, Key=self.full_key),
                )["UploadId"]
            )
            self._upload_id = self._created.result()
        # Bounded memory: wait for the oldest part before queueing more than UPLOADS_IN_FLIGHT.
        pending = [f for f in self._parts if not f.done()]
        if len(pending) >= UPLOADS_IN_FLIGHT:
            pending[0].result()
        number = len(self._parts) + 1
        upload_id = self._upload_id
        assert self._pool is not None

        def put() -> dict[str, Any]:
            r = s._call(
                f"PUT {self.key} part {number}",
                lambda: s._client.upload_part(
                    Bucket=s.bucket,
                    Key=self.full_key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=part,
                ),
            )
            return {"PartNumber": number, "ETag": r["ETag"]}

        self._parts.append(self._pool.submit(put))
        for f in self._parts:  # surface a failed part now, not after the whole file
            if f.done() and f.exception() is not None:
                f.result()

    def finish(self) -> None:
        s = self.storage
        cond: dict[str, Any] = {"IfNoneMatch": "*"} if self.exclusive else {}
        if self._upload_id is None:
            body = bytes(self._buf)
            s._call(
                f"PUT {self.key}",
                lambda: s._client.put_object(Bucket=s.bucket, Key=self.full_key, Body=body, **cond),
            )
            self._close_pool()
            return
        if self._buf:
            self._send(bytes(self._buf))
            self._buf.clear()
        parts = [f.result() for f in self._parts]
        upload_id = self._upload_id
        s._call(
            f"COMPLETE {self.key}",
            lambda: s._client.complete_multipart_upload(
                Bucket=s.bucket,
                Key=self.full_key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
                **cond,
            ),
        )
        self._upload_id = self._created = None
        self._close_pool()

    def abort(self) -> None:
        self._buf.clear()
        for f in self._parts:
            f.cancel()
        self._close_pool()  # waits for the create and the parts in flight
        upload_id, created = self._upload_id, self._created
        if created is not None and not created.cancelled() and created.exception() is None:
            upload_id = created.result()
        self._upload_id = self._created = None
        if upload_id is not None:
            s = self.storage
            with contextlib.suppress(Exception):  # gc aborts it later if this fails too
                s._call(
                    f"ABORT {self.key}",
                    lambda: s._client.abort_multipart_upload(
                        Bucket=s.bucket, Key=self.full_key, UploadId=upload_id
                    ),
                )

    def _close_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
