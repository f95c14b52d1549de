"""Where vault objects live: a local directory (local.py) or an S3 bucket (s3.py), behind the
`Storage` interface (base.py). `open_storage` picks one from a location; the S3 backend (and
boto3) is imported only for an s3:// location."""

from __future__ import annotations

from pqfs.errors import VaultError
from pqfs.storage.base import TMP_PREFIX, Storage, StorageOptions
from pqfs.storage.local import LocalStorage

__all__ = ["TMP_PREFIX", "LocalStorage", "Storage", "StorageOptions", "open_storage"]


def open_storage(location: str, options: StorageOptions | None = None) -> Storage:
    opts = options or StorageOptions()
    if location.startswith("s3://"):
        from pqfs.storage.s3 import S3Storage

        return S3Storage(location, opts)
    if "://" in location:
        raise VaultError(
            f"unsupported vault location {location!r} (a directory or s3://bucket/prefix)"
        )
    if opts.disk_cache:
        raise VaultError(
            "--disk-cache is for s3:// vaults (a local vault is read from disk already)"
        )
    return LocalStorage(location, opts)
