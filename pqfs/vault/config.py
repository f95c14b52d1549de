"""`pqfs.json`, the vault's public config (docs/FORMAT.md §3.1): version 1 (unsigned) and
version 2 (signed by the vault owner).

A version-2 config names the owner's public signing key, the recipients every object is
wrapped to, and the writers (ingest hosts) whose catalog segments readers accept. It is signed
by the owner over its canonical form (sorted keys, no spaces, ASCII only), so whoever can write
to the store cannot change a recipient or a writer: a reader refuses any config whose signature
does not verify. Which owner key is the right one is not the config's to say (it names its own):
that is checked against the identity when the vault is unlocked, and against the pin of
trust.py (`--vault-id`, or the key seen first) when it is not.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pqfs.errors import FormatError, PqfsError, VaultError
from pqfs.format.encoding import b64decode, b64encode
from pqfs.format.keys import Recipient, parse_recipient
from pqfs.vault.signing import SigningKey, VerifyKey

FORMAT_NAME = "pqfs-vault"
VERSIONS = (1, 2)
CURRENT = 2
CONFIG_PURPOSE = b"pqfs.v2 vault config"
ROTATION_PURPOSE = b"pqfs.v2 owner rotation"
WRITER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_WRITERS = (
    256  # each is ~2.6 KiB of config that every command reads: a bound, not a limit users meet
)


class ConfigError(VaultError):
    """A pqfs.json that is not a valid config (damaged, or signed by no one it names)."""


@dataclass
class Writer:
    """A host allowed to append catalog segments, by the name the owner gave it."""

    name: str
    key: VerifyKey


@dataclass
class Rotation:
    """A former owner key, and its signature over the id of the key that came after it
    (`pqfs rekey`): a host that pinned it follows the chain to the current owner."""

    key: VerifyKey
    signature: bytes
    generation: int  # the config generation that took over from it


@dataclass
class VaultConfig:
    version: int
    recipients: list[str]
    owner: VerifyKey | None = None  # version 2
    generation: int = 0  # version 2: 1 at init, one more at each change the owner signs
    writers: list[Writer] = field(default_factory=list)
    kem_backend: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of a newer pqfs, kept and signed
    rotations: list[Rotation] = field(default_factory=list)  # former owners, oldest first

    @property
    def signed(self) -> bool:
        return self.version >= 2

    @property
    def vault_id(self) -> str:
        """The owner key's id: what `--vault-id` pins, and what binds segments to this vault."""
        if self.owner is None:
            raise VaultError("a version 1 vault has no vault id (run: pqfs upgrade VAULT)")
        return self.owner.id

    def succeeds(self, pinned_id: str) -> bool:
        """Whether the owner key pinned as `pinned_id` handed the vault on, rotation by
        rotation, to this config's owner (each former key signed the id of the next)."""
        chain = [r.key for r in self.rotations]
        ids = [k.id for k in chain]
        if pinned_id not in ids or self.owner is None:
            return False
        following = [*ids[1:], self.owner.id]
        for r, nxt in list(zip(self.rotations, following, strict=True))[ids.index(pinned_id) :]:
            if not r.key.verify(ROTATION_PURPOSE, nxt.encode(), r.signature):
                return False
        return True

    def recipient_objects(self) -> list[Recipient]:
        return [parse_recipient(r) for r in self.recipients]

    def binding_ids(self) -> list[tuple[str, int]]:
        """(vault id, generation before which it bound segments): the current one, then each
        former owner's (a writer's segment signed before a rekey stays valid)."""
        return [(self.vault_id, 1 << 62)] + [(r.key.id, r.generation) for r in self.rotations]

    def signer(self, key_id: str) -> tuple[str, VerifyKey] | None:
        """("owner" or the writer's name, its key) for a key id this config authorizes."""
        if self.owner is not None and key_id == self.owner.id:
            return "owner", self.owner
        for w in self.writers:
            if w.key.id == key_id:
                return w.name, w.key
        return None

    # ------------------------------------------------------------------ encoding ----

    def body(self) -> dict[str, Any]:
        """What the owner signs: everything but the signature and the machine-local choice of
        ML-KEM backend (which changes where the code comes from, not what anything means)."""
        doc: dict[str, Any] = dict(self.extra)
        doc.update({"format": FORMAT_NAME, "version": self.version, "recipients": self.recipients})
        if self.signed:
            assert self.owner is not None
            doc.update(
                {
                    "vault_id": self.owner.id,
                    "owner": self.owner.encode(),
                    "generation": self.generation,
                    "writers": [{"name": w.name, "key": w.key.encode()} for w in self.writers],
                }
            )
            if self.rotations:
                doc["rotations"] = [
                    {
                        "key": r.key.encode(),
                        "signature": b64encode(r.signature),
                        "generation": r.generation,
                    }
                    for r in self.rotations
                ]
        return doc

    def to_bytes(self, owner: SigningKey | None = None) -> bytes:
        """The file's bytes; a version-2 config is signed by `owner`, which must be its owner."""
        doc = self.body()
        if self.kem_backend is not None:
            doc["kem_backend"] = self.kem_backend
        if self.signed:
            if owner is None or self.owner is None or owner.id != self.owner.id:
                raise VaultError("only the vault owner can sign its config")
            doc["signature"] = b64encode(owner.sign(CONFIG_PURPOSE, canonical(self.body())))
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def canonical(doc: dict[str, Any]) -> bytes:
    """The bytes a config signature covers: sorted keys, no whitespace, ASCII (FORMAT.md §3.1)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _plain(value: object, depth: int = 0) -> bool:
    """Only strings, whole numbers, lists and objects: values with one canonical form."""
    if depth > 8:
        return False
    if isinstance(value, str) or type(value) is int:
        return True
    if isinstance(value, list):
        return all(_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(_plain(v, depth + 1) for v in value.values())
    return False


MAX_CONFIG_BYTES = 4 << 20  # 256 writers and as many rotations are ~1.4 MiB: a bound on input


def parse(raw: bytes, where: str) -> VaultConfig:
    """The config in `raw`; a version-2 one only if its owner's signature verifies."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: pqfs.json is larger than any config ({len(raw)} bytes)")
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicates)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise ValueError
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ConfigError(f"{where}: pqfs.json is not a pqfs vault config") from None
    version = doc.get("version")
    if type(version) is not int or version not in VERSIONS:
        raise ConfigError(f"{where}: unsupported vault format version {version}")
    recipients = doc.get("recipients")
    if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
        raise ConfigError(f"{where}: pqfs.json has no list of recipients")
    backend = doc.get("kem_backend")
    cfg = VaultConfig(
        version, recipients, kem_backend=backend if isinstance(backend, str) else None
    )
    if version == 1:
        return cfg
    try:
        return _parse_signed(cfg, doc)
    except (FormatError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{where}: pqfs.json is damaged or forged ({e})") from None


UNSIGNED = ("signature", "kem_backend")
_KNOWN = {"format", "version", "recipients", "kem_backend", "vault_id", "owner", "generation",
          "writers", "rotations", "signature"}  # fmt: skip


def _text(d: object, key: str) -> str:
    v = d.get(key) if isinstance(d, dict) else None
    if not isinstance(v, str):
        raise ValueError(f"{key} is not a string")
    return v


def _whole(d: object, key: str) -> int:
    v = d.get(key) if isinstance(d, dict) else None
    if type(v) is not int or v < 1:
        raise ValueError(f"{key} is not a positive whole number")
    return v


def _list(d: dict[str, Any], key: str) -> list[Any]:
    v = d.get(key, [])
    if not isinstance(v, list):
        raise ValueError(f"{key} is not a list")
    return v


def _parse_signed(cfg: VaultConfig, doc: dict[str, Any]) -> VaultConfig:
    """Every value is type-checked before it is decoded: this runs before the signature is
    known to be good, on whatever the store holds."""
    if "signature" not in doc:
        raise ValueError("it is not signed")
    signature = b64decode(_text(doc, "signature"), "signature")
    body = {k: v for k, v in doc.items() if k not in UNSIGNED}
    if not _plain(body):
        raise ValueError("a value that has no canonical form")
    owner = VerifyKey.decode(_text(doc, "owner"))
    if not owner.verify(CONFIG_PURPOSE, canonical(body), signature):
        raise ValueError("its signature does not verify")
    # Signed by the key it names: from here on, whatever it holds is the owner's word.
    if doc.get("vault_id") != owner.id:
        raise ValueError("its vault id is not its owner key's")
    generation = _whole(doc, "generation")
    writers = []
    for w in _list(doc, "writers"):
        name, key = _text(w, "name"), VerifyKey.decode(_text(w, "key"))
        if not WRITER_NAME.fullmatch(name):
            raise ValueError(f"a writer name is malformed: {name!r}")
        writers.append(Writer(name, key))
    rotations = [
        Rotation(
            VerifyKey.decode(_text(r, "key")),
            b64decode(_text(r, "signature"), "rotation signature"),
            _whole(r, "generation"),
        )
        for r in _list(doc, "rotations")
    ]
    cfg.owner, cfg.generation, cfg.writers, cfg.rotations = owner, generation, writers, rotations
    cfg.extra = {k: v for k, v in body.items() if k not in _KNOWN}
    return cfg


def check_writer_name(name: str) -> str:
    if not WRITER_NAME.fullmatch(name):
        raise PqfsError(
            f"a writer name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
            f"or digit: {name!r}"
        )
    return name
