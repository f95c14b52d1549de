"""A vault: public config, passphrase-encrypted identity, content objects, encrypted catalog.

`Vault` opens or creates one, unlocks and locks it, and reads and appends its catalog; it makes
the entries that files and age files become. Content objects themselves: objects.py; adding
trees: ingest.py; removing, sharing, verifying, gc: maintenance.py.

Layout and rules: docs/FORMAT.md. This module knows nothing about the CLI or FUSE; it raises
PqfsError subclasses with secret-free one-line messages.
"""

from __future__ import annotations

import io
import logging
import math
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from pqfs.errors import (
    BadPassphrase,
    FormatError,
    IsADirectory,
    Locked,
    NoIdentityMatch,
    NotFound,
    PqfsError,
    VaultError,
)
from pqfs.format import armor, kem
from pqfs.format.agefile import AgeReader, BytesSource, encrypt_stream, read_header
from pqfs.format.encoding import b64encode
from pqfs.format.header import Header
from pqfs.format.keys import (
    MAX_SCRYPT_LOG_N,
    HybridIdentity,
    Identity,
    Recipient,
    ScryptIdentity,
    ScryptRecipient,
    X25519Identity,
    identity_file_text,
    parse_identity_file,
    unwrap,
)
from pqfs.format.stream import CHUNK
from pqfs.runtime.files import open_regular
from pqfs.runtime.memory import wipe
from pqfs.storage import open_storage
from pqfs.storage.base import Storage, StorageOptions
from pqfs.storage.local import FileSource, LocalStorage
from pqfs.vault import catalog as cat_mod
from pqfs.vault import config as config_mod
from pqfs.vault import trust
from pqfs.vault.catalog import IS_A_DIRECTORY, Catalog, normpath, shown
from pqfs.vault.config import CURRENT, FORMAT_NAME, VaultConfig
from pqfs.vault.filekeys import DerivedKeys
from pqfs.vault.keycache import KeyCache
from pqfs.vault.objects import OBJECTS, copy_rewrapped, write_object
from pqfs.vault.schema import Entry, MalformedOp, check_op, path_problem
from pqfs.vault.signing import SigningKey

log = logging.getLogger("pqfs.vault")

CONFIG = "pqfs.json"
IDENTITY = "identity.age"

SCRYPT_MIN_LOG_N = 18  # age's own default work factor: never weaker than plain `age -p`
SCRYPT_SAMPLES = 3


def tune_scrypt(target_seconds: float = 1.0) -> int:
    """log2(N) so that one scrypt derivation takes about `target_seconds` on this machine,
    between SCRYPT_MIN_LOG_N and MAX_SCRYPT_LOG_N (what readers accept); PQFS_SCRYPT_LOG_N
    overrides it (the tests' fast vaults)."""
    env = os.environ.get("PQFS_SCRYPT_LOG_N")
    if env:
        return int(env)
    # Calibrate at 2^16 (~0.2 s here): smaller N fits in cache and would overestimate speed.
    # The fastest of several runs: a busy machine only ever measures slow (one sample on a
    # loaded box gave 2^16), and the passphrase must resist attackers with idle machines.
    dt = min(_scrypt_seconds(16) for _ in range(SCRYPT_SAMPLES))
    log_n = 16 + round(math.log2(target_seconds / max(dt, 1e-4)))
    return max(SCRYPT_MIN_LOG_N, min(MAX_SCRYPT_LOG_N, log_n))


def _scrypt_seconds(log_n: int) -> float:
    t0 = time.perf_counter()
    Scrypt(b"pqfs-calibration", 32, 1 << log_n, 8, 1).derive(b"x")
    return time.perf_counter() - t0


class Vault:
    def __init__(self, storage: Storage, config: VaultConfig) -> None:
        self.storage = storage
        self.config = config
        if config.kem_backend is not None:
            kem.set_default_backend(config.kem_backend)
        self.recipients: list[Recipient] = config.recipient_objects()
        self._identities: list[HybridIdentity | X25519Identity] = []
        self._owner_key: SigningKey | None = None  # derived from the identity (version 2)
        self._writer_key: SigningKey | None = None  # an ingest host's (use_writer_key)
        self._catalog: Catalog | None = None
        self._config_raw = b""  # pqfs.json as read: refresh_config reads it again only if changed
        self._expected_id: str | None = None  # --vault-id (or a writer key's): what it must be
        # Where the catalog's warnings go (ops ignored on load), each once: the CLI prints them.
        self.on_warning: Callable[[str], None] = log.warning
        self._warned: set[str] = set()
        self.key_cache = KeyCache()
        # The held identity's derived file keys (filekeys.py), made on first use: by the
        # opens' threads too, hence the lock.
        self._derived: DerivedKeys | None = None
        self._derived_lock = threading.Lock()
        self.keys_derived = 0  # file keys derived rather than unwrapped (stats; not exact)

    @property
    def location(self) -> str:
        """Where the vault is, as this host's trust state names it (trust.py)."""
        return self.storage.describe()

    # ------------------------------------------------------------------ lifecycle ----

    @classmethod
    def create(
        cls,
        location: str,
        passphrase: bytes | bytearray,
        extra_recipients: Sequence[Recipient] = (),
        classic: bool = False,
        log_n: int | None = None,
        options: StorageOptions | None = None,
    ) -> Vault:
        storage = open_storage(location, options)
        if storage.exists(CONFIG):
            raise VaultError(f"{location} is already a pqfs vault")
        if not storage.empty():
            raise VaultError(f"{location} exists and is not empty")
        hybrid = HybridIdentity.generate()
        idents: list[HybridIdentity | X25519Identity] = [hybrid]
        if classic:
            idents.append(X25519Identity.generate())
        recipients = [i.recipient() for i in idents] + list(extra_recipients)
        owner = SigningKey.owner_of(hybrid)
        config = VaultConfig(
            CURRENT, [r.encode() for r in recipients], owner=owner.verify_key, generation=1
        )
        v = cls(storage, config)
        v._identities, v._owner_key = idents, owner
        try:
            v._write_new(passphrase, log_n)
        except BaseException:
            # Nothing half-made is left behind: remove whatever this init wrote.
            for key, _size in storage.list(""):
                storage.delete(key)
            raise
        trust.reset(v.location)  # a new vault here: whatever this host knew of the old one goes
        trust.check_config(v.location, config.vault_id, config.generation, None, first_use=True)
        return v

    def _write_new(self, passphrase: bytes | bytearray, log_n: int | None) -> None:
        storage = self.storage
        if isinstance(storage, LocalStorage):
            storage.make_private()  # before the identity lands in it
        text = identity_file_text(self._identities).encode()
        storage.put_bytes(
            IDENTITY, _encrypt_bytes(text, [ScryptRecipient(passphrase, log_n or tune_scrypt())])
        )
        cat_mod.append(storage, self.recipients, [], snapshot=True, signer=self.signer())
        # The config is written last: a vault without it is an interrupted init, not a vault.
        self._config_raw = self.config.to_bytes(self._owner_key)
        storage.put_bytes(CONFIG, self._config_raw, exclusive=True)

    @classmethod
    def open(
        cls, location: str, options: StorageOptions | None = None, vault_id: str | None = None
    ) -> Vault:
        """Open the vault at `location`. A version-2 config must verify, be signed by the key
        pinned on this host (or `vault_id`), and be no older than one seen here (trust.py)."""
        storage = open_storage(location, options)
        try:
            raw = storage.read_bytes(CONFIG)
        except (FileNotFoundError, NotADirectoryError):
            raise VaultError(f"no pqfs vault at {location}") from None
        except IsADirectoryError:
            raise VaultError(f"{location} is damaged: {CONFIG} is a directory") from None
        config = config_mod.parse(raw, location)
        v = cls(storage, config)
        v._config_raw = raw
        v._expected_id = vault_id
        if config.signed:
            trust.check_config(
                v.location, config.vault_id, config.generation, vault_id, config.succeeds
            )
        elif vault_id or trust.load(v.location).vault_id:
            raise trust.KeyChanged(
                f"{location} is a version 1 vault now, but it was a version 2 vault with a "
                "signing key: its config was replaced by an unsigned one (downgraded)"
            )
        return v

    def write_config(self, config: VaultConfig) -> None:
        """Replace pqfs.json by `config`, the next generation, signed by the owner."""
        if self._owner_key is None:
            raise Locked("changing the vault config needs the vault identity")
        config.generation = self.config.generation + 1
        self.adopt_config(config, self._owner_key)

    def adopt_config(self, config: VaultConfig, owner: SigningKey) -> None:
        """Write `config` signed by `owner` (its owner), and sign with that key from now on."""
        raw = config.to_bytes(owner)
        self.storage.put_bytes(CONFIG, raw)
        self.config, self._config_raw = config, raw
        self.recipients = config.recipient_objects()
        if owner is not self._owner_key and self._owner_key is not None:
            self._owner_key.wipe()
        self._owner_key = owner
        self._pin(first_use=True)

    def _pin(self, first_use: bool) -> None:
        """Check the config against this host's pin (trust.check_config) and move it forward;
        with `first_use`, pin a vault this host never saw (its key was checked another way, or
        this is the use that trusts it: see Vault.open)."""
        c = self.config
        if c.signed:
            trust.check_config(
                self.location, c.vault_id, c.generation, self._expected_id, c.succeeds, first_use
            )

    def sign_rotation(self, next_owner_id: str) -> bytes:
        """The owner's signature handing the vault on to the owner key `next_owner_id`."""
        if self._owner_key is None:
            raise Locked("handing the vault on needs the vault identity")
        return self._owner_key.sign(config_mod.ROTATION_PURPOSE, next_owner_id.encode())

    def held_identities(self) -> list[HybridIdentity | X25519Identity]:
        return list(self.identities)  # type: ignore[arg-type]

    def write_identities(
        self, idents: Sequence[HybridIdentity | X25519Identity], passphrase: bytes | bytearray
    ) -> None:
        """identity.age := `idents`, encrypted with `passphrase` (rekey); they are held."""
        text = bytearray(identity_file_text(idents).encode())
        try:
            blob = _encrypt_bytes(bytes(text), [ScryptRecipient(passphrase, self._work_factor())])
        finally:
            wipe(text)
        self.storage.put_bytes(IDENTITY, blob)
        self._identities = list(idents)

    def _work_factor(self) -> int:
        """The scrypt work factor identity.age has now (what its owner chose or pqfs tuned):
        kept when it is written again, rather than measured again."""
        try:
            header = read_header(BytesSource(self.storage.read_bytes(IDENTITY)))
            args = header.stanzas[0].args
            if args[0] == "scrypt" and len(args) == 3 and args[2].isdigit():
                return int(args[2])
        except (FileNotFoundError, PqfsError, IndexError):
            pass
        return tune_scrypt()

    def forget_identities(self, gone: Sequence[HybridIdentity | X25519Identity]) -> None:
        """Wipe identities no longer of this vault (the old ones, after a rekey)."""
        self._identities = [i for i in self._identities if all(i is not g for g in gone)]
        self._wipe_derived()
        for i in gone:
            i.wipe()
        self.key_cache.clear()

    # ------------------------------------------------------------------ identities ----

    def unlock(self, passphrase: bytes | bytearray) -> None:
        """Unlock with the passphrase (the caller's buffer, which the caller wipes). The
        identity file is decrypted into one buffer of its final size and parsed in place: no
        other copy of its text is ever made (a growing buffer would leave its old copies)."""
        try:
            raw = self.storage.read_bytes(IDENTITY)
        except FileNotFoundError:
            raise VaultError("the vault has no identity file") from None
        src = BytesSource(raw)
        try:
            reader = AgeReader(src, identities=[ScryptIdentity(passphrase)])
        except NoIdentityMatch:
            raise BadPassphrase("wrong passphrase") from None
        except PqfsError as e:
            raise VaultError(f"the vault identity file is damaged ({e})") from None
        plain = bytearray(reader.chunks * CHUNK)
        try:
            try:
                n = reader.read_chunks_into(0, reader.chunks, memoryview(plain))
            except PqfsError as e:
                raise VaultError(f"the vault identity file is damaged ({e})") from None
            idents = parse_identity_file(memoryview(plain)[:n])
        finally:
            wipe(plain)
        self._take(idents, must_own=True)

    def unlock_with(self, identities: Sequence[HybridIdentity | X25519Identity]) -> None:
        mine = {r.encode() for r in self.recipients}
        if not any(i.recipient().encode() in mine for i in identities):
            raise NoIdentityMatch("the identity file holds no identity of this vault")
        self._take(list(identities), must_own=False)

    def _take(self, idents: list[HybridIdentity | X25519Identity], must_own: bool) -> None:
        """Hold `idents`. In a version-2 vault, the one that derives the config's owner key
        makes this host the owner (it signs); the vault's own identity (`must_own`, from
        identity.age) must be it, or the config was replaced. Any other identity of a
        recipient only reads, trusting the config by the pin (trust.py)."""
        if self.config.signed:
            assert self.config.owner is not None
            for i in idents:
                if isinstance(i, HybridIdentity):
                    key = SigningKey.owner_of(i)
                    if key.id == self.config.owner.id:
                        self._owner_key = key
                        break
                    key.wipe()
            if self._owner_key is None and must_own:
                raise trust.KeyChanged(
                    "pqfs.json is not signed by this vault's identity (the config was replaced, "
                    "or this identity is of another vault)"
                )
        self._identities = idents
        if self._owner_key is not None:
            self._pin(first_use=True)  # the identity vouched for the config's key

    def use_writer_key(self, key: SigningKey) -> None:
        """Sign what this host appends with a writer key (an ingest host without the identity);
        refused unless the vault's signed config authorizes it."""
        if not self.config.signed:
            raise VaultError("a version 1 vault has no writers (run: pqfs upgrade VAULT)")
        found = self.config.signer(key.id)
        if found is None or found[0] == "owner":
            raise VaultError(
                f"writer key {key.id} is not authorized in this vault (the owner runs: pqfs "
                "writer add VAULT NAME KEY); it was never added, or was revoked"
            )
        self._writer_key = key

    def signer(self) -> cat_mod.Signer | None:
        """Who signs this host's segments: the owner (unlocked), else a writer key; None in a
        version-1 vault."""
        if not self.config.signed:
            return None
        key = self._owner_key or self._writer_key
        if key is None:
            raise VaultError(
                "appending to a version 2 vault needs a signature: unlock it (passphrase or "
                "--identity) or give this host's writer key (--writer-key FILE)"
            )
        return cat_mod.Signer(key, self.config.vault_id, self.config.generation)

    @property
    def identities(self) -> Sequence[Identity]:
        if not self._identities:
            raise Locked("the vault is locked")
        return self._identities

    @property
    def unlocked(self) -> bool:
        return bool(self._identities)

    def lock(self) -> None:
        # No thread may derive keys from an identity being wiped: out of the list first, the
        # derived secret wiped (under its lock) next, the identities last.
        idents, self._identities = self._identities, []
        self._wipe_derived()
        for i in idents:
            i.wipe()
        for k in (self._owner_key, self._writer_key):
            if k is not None:
                k.wipe()
        self._owner_key = self._writer_key = None
        self.key_cache.clear()
        self._catalog = None

    def identity_text(self, classic_only: bool = False) -> str:
        idents = [i for i in self._identities if not classic_only or isinstance(i, X25519Identity)]
        if not self.identities or not idents:
            raise VaultError("the vault has no X25519 identity (create it with init --classic)")
        return identity_file_text(idents)

    def passwd(self, new_passphrase: bytes | bytearray, log_n: int | None = None) -> None:
        text = identity_file_text(self._identities if self.identities else []).encode()
        blob = _encrypt_bytes(text, [ScryptRecipient(new_passphrase, log_n or tune_scrypt())])
        self.storage.put_bytes(IDENTITY, blob)

    # ------------------------------------------------------------------ catalog ----

    def catalog(self, reload: bool = False) -> Catalog:
        if self._catalog is None or reload:
            self._catalog = self.read_catalog()
            for w in self._catalog.warnings:
                if w not in self._warned:
                    self._warned.add(w)
                    self.on_warning(w)
        return self._catalog

    def refresh_config(self) -> None:
        """Take up a pqfs.json the owner changed since it was read (a writer added or revoked),
        checked as at open. A rekey (another owner) is a VaultError: the identity this host
        holds opens nothing new, so it must unlock again."""
        raw = self.storage.read_bytes(CONFIG)
        if raw == self._config_raw:
            return
        config = config_mod.parse(raw, self.location)
        if config.signed != self.config.signed:
            raise VaultError(
                f"the vault's format changed to version {config.version} (pqfs upgrade): "
                "unmount and mount it again"
            )
        if not config.signed:
            return
        trust.check_config(
            self.location, config.vault_id, config.generation, self._expected_id, config.succeeds
        )
        old, new = self.config.owner, config.owner
        if old is not None and new is not None and old.id != new.id:
            raise VaultError(
                f"the vault was rekeyed (its vault id is now {config.vault_id}) since this "
                "process opened it: run the command again (files it wrote since were "
                "encrypted to the old keys); a mount: unmount and mount it again with the new "
                "identity"
            )
        self.config, self._config_raw = config, raw
        self.recipients = config.recipient_objects()

    def read_catalog(self) -> Catalog:
        """The catalog as the store has it now, its signatures checked (version 2) and refused
        if older than what this host has seen (trust.Rollback); the newest is then pinned."""
        self._pin(first_use=True)  # a vault first used here: trusted from now on (FORMAT §5.3)
        cat = cat_mod.load(self.storage, self.identities, self.config)
        trust.check_catalog(self.location, cat.head_seq, cat.digests)
        return cat

    def commit(
        self, ops: Sequence[dict[str, object]], rebase: cat_mod.Rebase | None = None
    ) -> cat_mod.Written | None:
        """Append `ops` as one segment (returned; None if there were no ops, or `rebase` left
        none). Each is checked first: never write an op that readers would ignore (conflicts
        are the caller's to check, with check_put, before the work; `rebase`, see
        catalog.append, only moves or drops them)."""
        for op in ops:
            try:
                check_op(op)
            except MalformedOp as e:
                raise VaultError(f"refusing to record a malformed catalog op: {e}") from None
        if not ops:
            return None
        written = self.append(ops, rebase=rebase)
        self._catalog = None
        return written

    def segment_ops(self, seg: cat_mod.Segment) -> tuple[object, bool] | None:
        """One segment's ops alone (catalog.segment_ops), checked as a load checks them."""
        return cat_mod.segment_ops(self.storage, self.identities, seg, self.config)

    def append(
        self,
        ops: Sequence[dict[str, object]],
        snapshot: bool = False,
        expect_prev: str | None = None,
        rebase: cat_mod.Rebase | None = None,
    ) -> cat_mod.Written | None:
        """Append one segment, signed as this host may (signer), never after a tail older
        than what this host has seen; the segment written is pinned as seen."""
        location = self.location
        if snapshot and self.config.signed and self._owner_key is None:
            raise Locked("writing a catalog snapshot needs the vault identity")
        if self._owner_key is None and self._writer_key is not None:
            self.refresh_config()  # a writer appends under the config as it is now (rekey)
        self._pin(first_use=True)

        def check_tail(seq: int, digest: str) -> None:
            trust.check_tail(location, seq, digest)

        written = cat_mod.append(
            self.storage,
            self.recipients,
            ops,
            snapshot=snapshot,
            expect_prev=expect_prev,
            signer=self.signer(),
            check_tail=check_tail,
            rebase=rebase,
        )
        if written is not None:
            trust.pin_written(location, written.seq, written.digest)
        return written

    def forget_catalog(self) -> None:
        """The next catalog() loads the catalog again (after a compaction rewrote its chain)."""
        self._catalog = None

    def check_put(self, path: str, kind: str) -> None:
        """VaultError unless a `kind` ("file" or "dir") may be put at `path`: a path the catalog
        can hold and, when the catalog is known (unlocked), one that leaves a valid tree (no
        file below a file, no file in place of a directory). Without the identity the same
        rule is applied when the catalog is loaded (the first entry wins)."""
        problem = path_problem(path)
        if problem:
            raise VaultError(f"cannot add {shown(path)}: {problem}")
        why = self.catalog().conflict(path, kind) if self.unlocked else None
        if why:
            error = IsADirectory if why == IS_A_DIRECTORY else VaultError
            raise error(f"cannot add {shown(path)}: {why}")

    def entry(self, path: str) -> Entry:
        e = self.catalog().get(path)
        if e is None:
            raise NotFound(f"no such file in the vault: {normpath(path) or '/'}")
        return e

    # ------------------------------------------------------------------ writing ----

    def add_file(
        self,
        src_path: str,
        dest: str,
        recipients: Sequence[Recipient] = (),
        progress: Callable[[int], None] | None = None,
        durable: bool = True,
    ) -> Entry:
        """The entry of `src_path` encrypted into a new object (not yet committed); without
        `durable`, see objects.write_object."""
        dest = normpath(dest)
        if not dest:
            raise VaultError("destination path is empty")
        # Never open() blocking: a FIFO would wait for a writer forever (open_regular).
        with os.fdopen(open_regular(src_path), "rb") as f:
            st = os.fstat(f.fileno())
            object_id, header, size = write_object(self, f, recipients, progress, durable)
        return Entry(
            dest,
            "file",
            stat.S_IMODE(st.st_mode),
            st.st_mtime_ns,
            size,
            object_id,
            header.length,
            b64encode(header.mac),
            tuple(dict.fromkeys(r.encode() for r in recipients)),  # shared with (add -r)
        )

    def dir_entry(self, src_path: str, dest: str) -> Entry:
        st = os.stat(src_path)
        return Entry(normpath(dest), "dir", stat.S_IMODE(st.st_mode), st.st_mtime_ns)

    def import_age(self, src_path: str, dest: str) -> Entry:
        """Import an existing age file without re-encrypting it: it must open with the vault
        identity and authenticate completely; the vault recipients are then added to its header."""
        dest = normpath(dest)
        if not dest:
            raise VaultError("destination path is empty")
        self.check_put(dest, "file")  # before the object is written: nothing to clean up
        with armor.binary_path(src_path) as binary:
            return self._import_binary(src_path, binary, dest)

    def _import_binary(self, src_path: str, binary: str, dest: str) -> Entry:
        src = FileSource(binary)
        try:
            try:
                header = read_header(src)
            except FormatError as e:
                raise FormatError(f"{src_path}: {e}") from None
            if any(s.args[:1] == ["scrypt"] for s in header.stanzas):
                raise VaultError(
                    f"{src_path} is passphrase-encrypted (age -p); import takes files encrypted "
                    "to a vault recipient (age -e -r)"
                )
            try:
                fk = unwrap(header, self.identities)
            except NoIdentityMatch:
                raise NoIdentityMatch(
                    f"{src_path} is not encrypted to this vault (no vault identity opens it)"
                ) from None
            try:
                reader = AgeReader(src, file_key=fk, header=header)
                for _ in reader.iter_range(0, reader.size):
                    pass  # authenticate every chunk before anything lands in the vault
                object_id, new = copy_rewrapped(self.storage, src, header, fk, self.recipients)
            finally:
                wipe(fk)
            st = os.stat(src_path)
            return Entry(
                dest,
                "file",
                stat.S_IMODE(st.st_mode),
                st.st_mtime_ns,
                reader.size,
                object_id,
                new.length,
                b64encode(new.mac),
            )
        finally:
            src.close()

    # ------------------------------------------------------------------ keys ----

    def _derived_keys(self) -> DerivedKeys | None:
        """The derived file keys of the first hybrid identity held, None if none is held."""
        with self._derived_lock:  # (lock() empties the list before it takes this lock)
            first = next((i for i in self._identities if isinstance(i, HybridIdentity)), None)
            d = self._derived
            if d is not None and d.identity is not first:  # identities changed (rekey)
                d.wipe()
                d = self._derived = None
            if d is None and first is not None:
                d = self._derived = DerivedKeys(first)
            return d

    def _wipe_derived(self) -> None:
        with self._derived_lock:
            if self._derived is not None:
                self._derived.wipe()
                self._derived = None

    def new_file_key(self, object_id: str) -> bytearray | None:
        """The file key for a new object (FORMAT.md §2.2): derived when this host holds the
        identity, else None (the format's random key: an ingest host with a writer key)."""
        d = self._derived_keys()
        return None if d is None else d.for_object(object_id)

    def unwrap_key(self, object_id: str, header: Header) -> bytearray:
        """An object's file key, MAC verified: the derived one if it opens the header, else
        unwrapped from a stanza (FormatError / NoIdentityMatch / HeaderMacError, Locked)."""
        d = self._derived_keys()
        scrypt = any(s.args[:1] == ["scrypt"] for s in header.stanzas)  # unwrap's rules apply
        fk = None if d is None or scrypt else d.opening(object_id, header)
        if fk is not None:
            self.keys_derived += 1
            return fk
        return unwrap(header, self.identities)

    def file_key(self, e: Entry, header: Header) -> bytearray:
        """The file key of an entry's object, from the key cache, derived or unwrapped."""
        hit = self.key_cache.get((e.object, e.mac))
        if hit is not None:
            return hit.file_key
        fk = self.unwrap_key(e.object, header)
        try:
            return self.key_cache.put((e.object, e.mac), fk).file_key
        finally:
            wipe(fk)

    # ------------------------------------------------------------------ info ----

    def stats(self) -> dict[str, object]:
        objs = self.storage.list(OBJECTS)
        segs = cat_mod.list_segments(self.storage)
        info: dict[str, object] = {
            "location": self.storage.describe(),
            "format": f"{FORMAT_NAME} v{self.config.version}",
            "signed": self.config.signed,  # config and catalog (version 2); else not authenticated
            "recipients": [r.encode() for r in self.recipients],
            "post_quantum": all(r.post_quantum for r in self.recipients),
            "objects": len(objs),
            "stored_bytes": sum(s for _, s in objs),
            "catalog_segments": len(segs),
        }
        if self.config.signed:
            info["vault_id"] = self.config.vault_id
            info["config_generation"] = self.config.generation
            info["writers"] = [f"{w.name} {w.key.id}" for w in self.config.writers]
        if self.unlocked:
            cat = self.catalog()
            files = cat.files()
            info["files"] = len(files)
            info["plaintext_bytes"] = sum(e.size for e in files)
            info["unreferenced_objects"] = len(objs) - len({e.object for e in files})
        return info


def _encrypt_bytes(data: bytes, recipients: Sequence[Recipient]) -> bytes:
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(data), out.write, recipients)
    return out.getvalue()
