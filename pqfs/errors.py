"""Exception hierarchy.

Every error a user can cause derives from PqfsError and carries a one-line message that is safe
to print: it never contains key material, passphrases or plaintext. The CLI (`main()` in
cli/main.py) and the FUSE adapter (mount/fuseops.py, `errno_of`) are the only places that turn
these into exit codes and errno values.
"""

from __future__ import annotations


class PqfsError(Exception):
    """A user-facing error with a one-line, secret-free message."""

    logged = False  # already logged with its context (the mount's adapter logs it no more)
    hint = ""  # a known fix, printed by the CLI as `pqfs: hint: ...` after the error line


class FormatError(PqfsError):
    """Input is not a well-formed age file / vault object (header failure)."""


class NoIdentityMatch(PqfsError):
    """The header parsed, but none of the identities can unwrap any stanza."""


class HeaderMacError(PqfsError):
    """The header MAC does not verify: the header was modified or the wrong key was used."""


class PayloadError(PqfsError):
    """A payload chunk failed authentication, or the payload is truncated or extended.

    `chunk` names the first chunk index at fault when known.
    """

    def __init__(self, message: str, chunk: int | None = None) -> None:
        super().__init__(message)
        self.chunk = chunk


class BadPassphrase(PqfsError):
    """The passphrase does not decrypt the vault identity."""


class VaultError(PqfsError):
    """Vault-level problem: missing vault, unknown path, conflicting path, corrupt catalog."""


class CatalogDamaged(VaultError):
    """A catalog segment that cannot be used (undecryptable, malformed, out of the chain):
    reading it again gives the same answer, unlike a storage error."""


class NotFound(VaultError):
    """A path that is not in the vault."""


class Unavailable(VaultError):
    """The storage did not answer within the time budget (a dead or unreachable server)."""


class Locked(PqfsError):
    """The operation needs the identity, and the vault is locked."""


class NotADirectory(VaultError):
    """A directory operation on a file."""


class IsADirectory(VaultError):
    """A file operation on a directory."""


class ReadOnly(PqfsError):
    """A write to the read-only mount."""


class Exists(VaultError):
    """A name that must not exist does (EEXIST: mkdir, create with O_EXCL, RENAME_NOREPLACE)."""


class NotEmpty(VaultError):
    """rmdir, or a rename over a directory, that is not empty (ENOTEMPTY)."""


class NotPermitted(PqfsError):
    """An operation the vault format cannot hold (EPERM: hard links, symlinks, device nodes,
    an owner change)."""


class NoSpace(PqfsError):
    """Staging stayed full for the whole time budget (ENOSPC), or the store is full."""


class Invalid(PqfsError):
    """A request the mount does not support in this form (EINVAL: RENAME_EXCHANGE, a rename
    into its own subtree)."""


class Unreadable(VaultError):
    """A file the mount cannot open: its object is missing, damaged, not the one the catalog
    names, or its storage did not answer (EIO). Raised only after its one log line, which names
    the file, has been written."""

    logged = True
