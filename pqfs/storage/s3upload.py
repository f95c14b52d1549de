"""Writing one object of an S3 vault (Upload), through the requests of s3requests.py."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from pqfs.runtime.pools import DaemonExecutor
from pqfs.storage.s3requests import S3Requests


class Upload:
    """A streamed object: one PUT if it is small, else a multipart upload whose parts go out on
    a few threads while the caller produces the next. Nothing is visible at `key` until
    finish(); abort() (any error, Ctrl-C) cancels the upload server-side."""

    def __init__(self, storage: S3Requests, key: str, exclusive: bool) -> None:
        self.storage = storage
        self._part_size = self.part_size = storage.bounds.part_size
        self._in_flight = storage.bounds.uploads_in_flight
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
        while len(self._buf) >= self._part_size:
            part = bytes(self._buf[: self._part_size])
            del self._buf[: self._part_size]
            self._send(part)
        return len(data)

    def copy_part(self, full_src_key: str, start: int, end: int) -> None:
        """The next part: bytes [start, end) of another object of the bucket, copied by the
        server (UploadPartCopy). Everything written so far must fill whole parts."""
        assert not self._buf, "a copied part follows whole parts only"
        s = self.storage
        self._submit(
            f"COPY {full_src_key} [{start}, {end}) to {self.key}",
            lambda upload_id, number: s._client.upload_part_copy(
                Bucket=s.bucket,
                Key=self.full_key,
                UploadId=upload_id,
                PartNumber=number,
                CopySource={"Bucket": s.bucket, "Key": full_src_key},
                CopySourceRange=f"bytes={start}-{end - 1}",
            )["CopyPartResult"],
        )
        s._count("s3_copy_bytes", end - start)

    def _send(self, part: bytes, number: int | None = None) -> None:
        s = self.storage
        s._count("s3_put_bytes", len(part))
        n = len(self._parts) + 1 if number is None else number
        self._submit(
            f"PUT {self.key} part {n}",
            lambda upload_id, number: s._client.upload_part(
                Bucket=s.bucket, Key=self.full_key, UploadId=upload_id, PartNumber=number, Body=part
            ),
            number,
        )

    def put_part(self, number: int, data: bytes) -> None:
        """Part `number` explicitly (storage.base.PartWriter): parts in any order, the first
        one last, as the mount's stream tier sends a file whose head is patched at its end."""
        assert not self._buf, "numbered parts and write() do not mix"
        self._send(data, number)

    def _submit(
        self, what: str, request: Callable[[str, int], Any], number: int | None = None
    ) -> None:
        """Send part `number` (default: the next; `request(upload id, part number)` answers
        with its ETag) on the pool, creating the upload first if need be."""
        s = self.storage
        if self._upload_id is None:
            # The create runs on the pool, not on this thread: a Ctrl-C landing as its answer
            # came back would lose the id here, and the upload would outlive the add (unseen,
            # billed). abort() waits for the pool and takes the id from the future instead.
            self._pool = DaemonExecutor(self._in_flight, "pqfs-upload")
            self._created = self._pool.submit(
                lambda: s._call(
                    f"CREATE UPLOAD {self.key}",
                    lambda: s._client.create_multipart_upload(Bucket=s.bucket, Key=self.full_key),
                )["UploadId"]
            )
            self._upload_id = self._created.result()
        # Bounded memory: wait for the oldest part before queueing more than `_in_flight`.
        pending = [f for f in self._parts if not f.done()]
        if len(pending) >= self._in_flight:
            pending[0].result()
        if number is None:
            number = len(self._parts) + 1
        upload_id = self._upload_id
        assert self._pool is not None

        def put() -> dict[str, Any]:
            r = s._call(what, lambda: request(upload_id, number))
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
            s._count("s3_put_bytes", len(body))
            s._call(
                f"PUT {self.key}",
                lambda: s._client.put_object(Bucket=s.bucket, Key=self.full_key, Body=body, **cond),
            )
            self._close_pool()
            return
        if self._buf:
            self._send(bytes(self._buf))
            self._buf.clear()
        parts = sorted((f.result() for f in self._parts), key=lambda p: p["PartNumber"])
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
