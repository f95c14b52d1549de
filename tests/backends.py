"""The storage backends the conformance suite runs against, behind one small interface: a local
directory and a bucket of a real SeaweedFS (tests/s3server.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pqfs.storage import open_storage
from pqfs.storage.base import Storage, StorageOptions


@dataclass
class Backend:
    name: str
    root: str  # a directory, or s3://bucket
    env: dict[str, str]  # for pqfs subprocesses (credentials, endpoint)
    s3: Any = None  # a boto3 client when the backend is S3
    bucket: str = ""
    options: StorageOptions = field(default_factory=StorageOptions)

    def location(self, sub: str) -> str:
        return f"{self.root.rstrip('/')}/{sub}"

    def storage(self, sub: str) -> Storage:
        return open_storage(self.location(sub), self.options)

    def partial_writes(self, sub: str) -> int:
        """Writes begun and not finished: hidden temp files, or open multipart uploads."""
        if self.s3 is None:
            base = Path(self.location(sub))
            return sum(1 for p in base.rglob(".tmp-*")) if base.exists() else 0
        page = self.s3.list_multipart_uploads(Bucket=self.bucket, Prefix=f"{sub}/")
        return len(page.get("Uploads", []))

    def put_raw(self, sub: str, key: str, data: bytes) -> None:
        """Store an object behind pqfs's back (to copy or to tamper with a vault)."""
        if self.s3 is None:
            p = Path(self.location(sub)) / key
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        else:
            self.s3.put_object(Bucket=self.bucket, Key=f"{sub}/{key}", Body=data)
