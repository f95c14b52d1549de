"""Vaults on S3-compatible object storage (AWS S3, MinIO, Ceph, B2, R2, SeaweedFS).

`s3://bucket/prefix` holds exactly the keys a local vault holds under its directory, so a vault
copied object by object between the two opens unchanged. Endpoint, region and credentials come
from the standard AWS environment variables and config files (AWS_ENDPOINT_URL, AWS_PROFILE, ...),
plus `--endpoint-url`. Every bound is a field of StorageOptions.s3 (S3Bounds).

Reads are HTTP Range GETs. The mount asks for runs of whole chunks (adjacent chunks merged into
one request, several requests in flight during playback); opening an object is one GET of its
first bytes (`open_fetch`), which also gives the object size (Content-Range), the header and the
first chunk, and for the mount a second GET, sent alongside, of the final chunk (S3Source). With
a disk cache, requests are widened to whole cache blocks and served from disk once fetched.
Writes stream through Upload (one PUT, or a multipart upload).

The parts: S3Storage here (the Storage interface), on the requests of s3requests.py (the client,
retries within the time budget, presigned range GETs over pooled connections, GETs from the
mount's loop through s3async.py), S3Source (s3source.py) and Upload (s3upload.py).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO, cast

from pqfs.storage.base import TMP_PREFIX, ObjectSource, Storage, StorageProfile, bounds_of
from pqfs.storage.s3requests import RemoteError, S3Requests
from pqfs.storage.s3source import S3Source
from pqfs.storage.s3upload import Upload


class S3Storage(S3Requests, Storage):
    """The vault at `url` (s3://bucket/prefix), within `options`' bounds."""

    def profile(self) -> StorageProfile:
        b = self.bounds
        return StorageProfile(
            workers=b.connections,  # one per connection: the threads mostly wait on the network
            jobs_per_file=b.connections // 2,  # a slow object never holds every worker
            job_chunks=b.job_chunks,
            reuse_read_buffers=False,  # allocated per request: the threads are many, mostly idle
            # a scan of 200 small files, 1 thread: 1.24-1.44x the files/s of no open-ahead
            open_ahead_threads=4,
            open_ahead_batch=1,
        )

    def open_source(self, key: str) -> S3Source:
        return S3Source(self, key)

    def open_source_with_tail(self, key: str, tail: int) -> S3Source:
        return S3Source(self, key, tail)

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

    def part_writer(self, key: str, exclusive: bool = False) -> Upload:
        return Upload(self, key, exclusive)

    @contextlib.contextmanager
    def writer(
        self, key: str, exclusive: bool = False, durable: bool = True, fresh: bool = False
    ) -> Iterator[BinaryIO]:
        """(An S3 object is durable once its PUT or its upload's COMPLETE is answered, and is
        never seen partly written: `fresh` changes nothing here.)"""
        up = Upload(self, key, exclusive or fresh)
        try:
            yield cast(BinaryIO, up)
            up.finish()
        except BaseException:
            up.abort()
            raise

    def copy_with_header(
        self,
        key: str,
        header: bytes,
        src_key: str,
        payload_from: int,
        src_size: int,
        opened: ObjectSource | None = None,
        durable: bool = True,
    ) -> None:
        """The new header and the payload's first bytes travel (the first part of a multipart
        upload: S3 wants every part but the last of `part_size`); the rest of the payload is
        copied by the server (UploadPartCopy of byte ranges). A small object is one GET and
        one PUT."""
        part = self.bounds.part_size
        if len(header) + src_size - payload_from <= part:
            super().copy_with_header(key, header, src_key, payload_from, src_size, opened, durable)
            return
        head = bytearray(part)
        head[: len(header)] = header
        first_end = payload_from + part - len(header)
        n, _size = self.get_range(src_key, payload_from, memoryview(head)[len(header) :])
        if n != part - len(header):
            raise FileNotFoundError(f"{src_key} shrank while it was copied")
        up = Upload(self, key, exclusive=True)
        try:
            up.write(head)
            pos = first_end
            while pos < src_size:
                end = min(src_size, pos + part)
                up.copy_part(self._key(src_key), pos, end)
                pos = end
            up.finish()
        except BaseException:
            up.abort()
            raise

    def list_dated(self, prefix: str) -> list[tuple[str, int, float]]:
        out: list[tuple[str, int, float]] = []
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
                    out.append((name, int(obj["Size"]), obj["LastModified"].timestamp()))
            if not page.get("IsTruncated"):
                return out
            token = page.get("NextContinuationToken")

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call(
                f"DELETE {key}",
                lambda: self._client.delete_object(Bucket=self.bucket, Key=self._key(key)),
            )

    def delete_many(self, keys: Sequence[str]) -> None:
        """DeleteObjects, `delete_batch` keys a request (a rekey or gc deletes thousands)."""
        step = self.bounds.delete_batch
        for i in range(0, len(keys), step):
            batch = [{"Key": self._key(k)} for k in keys[i : i + step]]
            r = self._call(
                f"DELETE {len(batch)} objects",
                lambda batch=batch: self._client.delete_objects(  # type: ignore[misc]
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                ),
            )
            failed = [e for e in r.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if failed:
                raise RemoteError(
                    f"S3 refused to delete {len(failed)} object(s): {failed[0].get('Code')}"
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
        out.update(super().stats())
        out["s3_bounds"] = bounds_of(self.bounds)
        return out

    def abort_stale_uploads(self, older_than: float | None = None) -> int:
        """Abort multipart uploads left by interrupted adds and commits (they are invisible,
        but billed), begun more than `older_than` seconds ago (default `stale_upload_age`: an
        add may be running now)."""
        if older_than is None:
            older_than = self.options.stale_upload_age
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
