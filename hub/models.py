"""The hub's tables (SQLAlchemy 2, typed). Times are epoch seconds (floats), the same on SQLite and
PostgreSQL. State changes that must not race (using an IAT once, claiming a registration, an `If-Match`
update, a task transition) are single conditional UPDATEs, atomic on both databases."""

from __future__ import annotations

import enum

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class SecurityProfile(enum.StrEnum):
    SHARED_SECRET = "SHARED_SECRET"  # noqa: S105 - a profile name, not a password
    RSA_3072 = "RSA_3072"


class BoardingStatus(enum.StrEnum):
    NOT_ONBOARDED = "NOT_ONBOARDED"
    ONBOARDING = "ONBOARDING"
    ONBOARDED = "ONBOARDED"


class Agent(Base):
    """An agent (a gateway) with its boarding configuration and its current credentials.

    The previous credential set and RAT are kept until the new ones are first used: a client whose
    renewal answer was lost renews again with what it still holds."""

    __tablename__ = "agents"

    #: also the OAuth client id and the IAT's `sub`
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    security_profile: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(Text, default="")
    etag: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)

    boarding_status: Mapped[str] = mapped_column(String(16), default=BoardingStatus.NOT_ONBOARDED)
    status_updated_at: Mapped[float] = mapped_column(Float)
    #: the current IAT (a secret the admin may read again until it is used) and its identity
    iat: Mapped[str | None] = mapped_column(Text, default=None)
    iat_jti: Mapped[str | None] = mapped_column(String(64), default=None)
    iat_expires_at: Mapped[float | None] = mapped_column(Float, default=None)
    iat_used: Mapped[bool] = mapped_column(Boolean, default=False)
    registering_since: Mapped[float | None] = mapped_column(Float, default=None)

    #: bumped when credentials are revoked (offboarding): access tokens carry it as `cgen`, so the ones
    #: issued before die with it; a renewal does not bump it (tokens live out their 30 minutes)
    credential_generation: Mapped[int] = mapped_column(Integer, default=0)
    client_secret: Mapped[str | None] = mapped_column(String(128), default=None)
    public_jwk: Mapped[str | None] = mapped_column(Text, default=None)
    credentials_expire_at: Mapped[float | None] = mapped_column(Float, default=None)
    rat_jti: Mapped[str | None] = mapped_column(String(64), default=None)
    previous_client_secret: Mapped[str | None] = mapped_column(String(128), default=None)
    previous_public_jwk: Mapped[str | None] = mapped_column(Text, default=None)
    previous_rat_jti: Mapped[str | None] = mapped_column(String(64), default=None)
    previous_expire_at: Mapped[float | None] = mapped_column(Float, default=None)


class SpentAssertion(Base):
    """A client assertion the token endpoint accepted, by its `jti`, kept until the assertion would be
    refused as expired anyway: one assertion buys one access token, so a captured one cannot buy more."""

    __tablename__ = "spent_assertions"

    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    jti: Mapped[str] = mapped_column(String(255), primary_key=True)
    #: the assertion's `exp` plus the hub's leeway: after this, its row can go
    acceptable_until: Mapped[float] = mapped_column(Float, index=True)


class DataSourceConfiguration(Base):
    __tablename__ = "data_source_configurations"

    agent_id: Mapped[str] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True)
    etag: Mapped[int] = mapped_column(Integer, default=1)
    #: the validated document, as JSON text
    document: Mapped[str] = mapped_column(Text)


class TrustedKey(Base):
    """A public key uploaded releases must be signed with."""

    __tablename__ = "trusted_keys"

    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    pem: Mapped[str] = mapped_column(Text)
    algorithm: Mapped[str] = mapped_column(String(32))
    added_at: Mapped[float] = mapped_column(Float)


class Release(Base):
    """A verified firmware image; its bytes live once in the blob directory under their SHA-256."""

    __tablename__ = "releases"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(256))
    version: Mapped[str] = mapped_column(String(64))
    #: u32 in the image, beyond PostgreSQL's INTEGER
    security_counter: Mapped[int] = mapped_column(BigInteger)
    vendor_uuid: Mapped[str | None] = mapped_column(String(36))
    class_uuid: Mapped[str | None] = mapped_column(String(36))
    #: up to `max_release_size` (8 GiB by default), beyond PostgreSQL's INTEGER
    size: Mapped[int] = mapped_column(BigInteger)
    image_digest: Mapped[str] = mapped_column(String(64))
    #: JSON list of the key hashes whose signatures verified
    signed_by: Mapped[str] = mapped_column(Text)
    uploaded_at: Mapped[float] = mapped_column(Float)


class InstallationTask(Base):
    __tablename__ = "installation_tasks"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"), index=True)
    software_type: Mapped[str] = mapped_column(String(16))
    release_id: Mapped[str] = mapped_column(ForeignKey("releases.id"))
    state: Mapped[str] = mapped_column(String(16), index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str] = mapped_column(Text, default="")
    etag: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[float] = mapped_column(Float)


class TaskTransition(Base):
    """One entry of a task's history: every accepted PATCH, in order."""

    __tablename__ = "task_transitions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    task_id: Mapped[str] = mapped_column(ForeignKey("installation_tasks.id", ondelete="CASCADE"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    progress: Mapped[float] = mapped_column(Float)
    message: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(64))
    at: Mapped[float] = mapped_column(Float)
