"""Release trust keys: the public keys an uploaded image must be signed with before the hub offers it to
any device.

A key is parsed by the signing library, the same code that verifies images, so the hub never trusts a
key the verifier would read differently; a private key pasted by mistake is refused rather than stored
(it would sit in the database in clear), and only the algorithms images carry are accepted. A key is
identified by its KEYHASH, so trusting the same key twice under two names is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from signing import PublicKey, SigningError, public_key_from_bytes

from .database import Database
from .errors import ConflictError, InvalidRequestError
from .models import TrustedKey
from .timefmt import iso


@dataclass(frozen=True)
class TrustedKeyView:
    key_hash: str
    name: str
    algorithm: str
    pem: str
    added_at: float

    @classmethod
    def of(cls, row: TrustedKey) -> TrustedKeyView:
        return cls(row.key_hash, row.name, row.algorithm, row.pem, row.added_at)

    def to_json(self) -> dict[str, Any]:
        return {
            "keyHash": self.key_hash,
            "name": self.name,
            "algorithm": self.algorithm,
            "pem": self.pem,
            "addedAt": iso(self.added_at),
        }


def parse_public_key(pem: str) -> PublicKey:
    """The release key in `pem`, or `InvalidRequestError` saying why it is not one (not a key, a private
    key, an algorithm or size images do not carry)."""
    try:
        return public_key_from_bytes(pem.encode("utf-8"), source="the uploaded key")
    except SigningError as exc:
        raise InvalidRequestError(str(exc)) from exc


def add_trusted_key(database: Database, name: str, pem: str, now: float) -> TrustedKeyView:
    """Trust the key in `pem` from now on; `ConflictError` if it is already trusted."""
    key = parse_public_key(pem)
    row = TrustedKey(
        key_hash=key.key_hash.hex(),
        name=name,
        pem=key.pem().decode("ascii"),
        algorithm=key.algorithm.value,
        added_at=now,
    )
    try:
        with database.transaction() as session:
            if session.get(TrustedKey, row.key_hash) is not None:
                raise ConflictError(f"key {row.key_hash} is already trusted")
            session.add(row)
    except IntegrityError as exc:  # trusted by a concurrent request between the check and the insert
        raise ConflictError(f"key {row.key_hash} is already trusted") from exc
    return TrustedKeyView.of(row)


def trusted_keys(database: Database) -> list[TrustedKeyView]:
    with database.transaction() as session:
        rows = session.scalars(select(TrustedKey).order_by(TrustedKey.added_at, TrustedKey.key_hash))
        return [TrustedKeyView.of(row) for row in rows]


def trust_anchors(database: Database) -> tuple[PublicKey, ...]:
    """The trusted keys as the verifier takes them."""
    return tuple(parse_public_key(view.pem) for view in trusted_keys(database))
