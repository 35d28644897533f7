"""The device's cloud client: onboarding, credentials kept fresh, cached access tokens, authorised calls.

`DeviceClient` is what the CLI and the installer use. Its rules (docs/design.md §6):

- every decision against a time the hub set is made in hub time (`mers.clock`); before the first one,
  the client asks the hub for its time;
- credentials are renewed through the RAT when less than `renew_margin` (25 h) remain, or when the token
  endpoint refuses them; the margin (and the access token's) is at most half the lifetime the hub
  granted, so a hub set to grant 25 h or less does not make every call renew (`ClientSettings`); the
  new set is written (atomically, with the previous set kept) **before** it is used, and the previous
  set is dropped only once the new one has worked. A crash at any step therefore leaves a stored set
  the hub still accepts and a RAT it still honours (`RenewalStep` names the steps; tests kill the
  process at each one);
- onboarding, renewal and token refresh hold an exclusive lock on the state directory, so the daemon and
  a CLI command never renew with the same RAT at once.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from board.errors import BoardError
from board.interface import Board
from board.opening import open_board
from board.storage import ensure_directory

from . import onboarding
from .boarding import BoardingSource, CredentialProfile, NetworkConfig, current_boarding, parse_network
from .clock import HubClock
from .credentials import CredentialSet, StoredCredentials, load_credentials, save_credentials
from .errors import (
    CorruptStateError,
    HubProtocolError,
    HubRefusedError,
    HubUnreachableError,
    IatUsedError,
    MersError,
    NoBoardingDataError,
    NotOnboardedError,
    ReonboardingRequiredError,
    StorageError,
)
from .http import HttpSettings, HubAnswer, HubSession
from .tokens import (
    TOKEN_FILE,
    TOKEN_KEY_PATH,
    TOKEN_PATH,
    AccessToken,
    client_assertion,
    load_token,
    parse_token_answer,
    save_token,
    token_form,
)

AGENT_KEY_FILE = "agent-key.pem"
LAST_ERROR_FILE = "last-error.json"
#: a registration went out and no answer to it was stored yet: explains a later "IAT used" refusal
REGISTRATION_SENT_FILE = "registration-sent.json"
LOCK_FILE = "client.lock"
HOUR = 3600.0


class RenewalStep(enum.StrEnum):
    """The steps of a renewal, in order; a hook sees each one (tests crash the process there)."""

    REQUESTING = "requesting"  # about to send the RAT
    ANSWERED = "answered"  # the new set is in memory only
    PERSISTED = "persisted"  # the new set is written, the previous kept; not used yet
    CONFIRMED = "confirmed"  # the new set got a token (the hub retired the previous one)
    DONE = "done"  # the previous set is dropped from the file


StepHook = Callable[[RenewalStep], None]


@dataclass(frozen=True)
class ClientSettings:
    renew_margin: float = 25 * HOUR  # renew the credentials when less than this remains
    token_margin: float = 120.0  # replace an access token this long before it expires
    http: HttpSettings = field(default_factory=HttpSettings)

    def renewal_margin(self, held: CredentialSet) -> float:
        """`renew_margin`, but at most half the lifetime the hub granted: a hub may grant 25 h or less
        (a setting it accepts), and a fixed margin would then renew, and rotate the RAT, on every call.
        The full margin when the lifetime is unknown (a set stored before it was kept)."""
        return _clamped(self.renew_margin, held.lifetime)

    def token_refresh_margin(self, token: AccessToken) -> float:
        """`token_margin`, but at most half the token's lifetime: a hub granting tokens for 120 s or less
        would otherwise have every call fetch a new one."""
        return _clamped(self.token_margin, token.lifetime)


def _clamped(margin: float, lifetime: float | None) -> float:
    return margin if lifetime is None else min(margin, max(lifetime, 0.0) / 2)


class OnboardOutcome(enum.StrEnum):
    REGISTERED = "registered"
    ALREADY_ONBOARDED = "already-onboarded"


@dataclass(frozen=True)
class OnboardResult:
    outcome: OnboardOutcome
    client_id: str
    profile: CredentialProfile
    credentials_expire_at: float
    boarding_source: BoardingSource


class DeviceClient:
    """The agent on one board. Use as a context manager (it holds HTTP sessions)."""

    def __init__(
        self,
        board: Board,
        *,
        settings: ClientSettings | None = None,
        clock: HubClock | None = None,
        step_hook: StepHook | None = None,
    ) -> None:
        self.board = board
        self.settings = settings or ClientSettings()
        self.clock = clock or HubClock()
        self._step_hook = step_hook
        self._sessions: dict[tuple[str, str, str], HubSession] = {}
        self._lock_depth = 0
        self._lock_fd = -1

    @classmethod
    def open(cls, board_path: Path, **options: Any) -> DeviceClient:
        """The client of the board at `board_path` (a simulated board directory or a gateway TOML)."""
        try:
            board = open_board(board_path)
        except BoardError as exc:
            raise StorageError(f"cannot open the board {board_path}: {exc}") from exc
        return cls(board, **options)

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()

    # --- onboarding -----------------------------------------------------------------------------------

    def onboard(self) -> OnboardResult:
        """Register with the boarding data's IAT, unless the stored credentials came from that very IAT
        (then nothing happens). A failed registration leaves the stored credentials as they were."""
        with self._operation():
            boarding = current_boarding(self.board)
            if boarding is None:
                raise NoBoardingDataError(
                    "the board holds no boarding data: provision it at the factory, or import it with "
                    "`mers boarding import FILE`"
                )
            stored = load_credentials(self.board.state)
            if stored is not None and stored.iat_id == boarding.iat_id:
                return self._result(OnboardOutcome.ALREADY_ONBOARDED, stored, boarding.source)
            key = self._agent_key(create=True) if boarding.profile is CredentialProfile.RSA_3072 else None
            session = self._session(boarding.base_url, boarding.data.ca_bundle, boarding.network)
            # before the IAT is spent: the answer's expiry is checked in hub time, and a hub that never
            # tells its time would have its answer refused after the IAT was used
            self._synchronise(session)
            sent_before = self._unanswered_registration(boarding.iat_id)
            if sent_before is None:
                record = {"iat_id": boarding.iat_id, "sent_at": self.clock.now()}
                self.board.state.write(REGISTRATION_SENT_FILE, json.dumps(record).encode())
            try:
                first = replace(
                    onboarding.register(session, boarding, key, now=self.clock.now, sent_before=sent_before),
                    issued_at=self.clock.now(),
                )
            except HubRefusedError as refused:
                # the hub settled this registration, unless it says one is still in progress (perhaps our
                # own earlier one) or that ours most likely used the IAT
                pending = refused.status == 429 or (
                    isinstance(refused, IatUsedError) and refused.own_registration
                )
                if not pending:
                    self.board.state.delete(REGISTRATION_SENT_FILE)
                raise
            except HubUnreachableError as unreachable:
                if not unreachable.reached_the_hub and sent_before is None:
                    self.board.state.delete(REGISTRATION_SENT_FILE)  # no try of it left the device
                raise
            stored = StoredCredentials(
                client_id=boarding.client_id,
                tenant=boarding.tenant,
                profile=boarding.profile,
                base_url=boarding.base_url,
                iat_id=boarding.iat_id,
                boarding=boarding.data,
                current=first,
            )
            save_credentials(self.board.state, stored)
            self.board.state.delete(REGISTRATION_SENT_FILE)
            self.board.state.delete(TOKEN_FILE)  # a token of earlier credentials is not ours any more
            return self._result(OnboardOutcome.REGISTERED, stored, boarding.source)

    def _unanswered_registration(self, iat_id: str) -> float | None:
        """When a registration with this IAT went out earlier and no answer to it was ever stored (the
        process died, or the hub could not be reached to the end); None when there was none."""
        raw = self.board.state.read(REGISTRATION_SENT_FILE)
        if raw is None:
            return None
        try:
            record = json.loads(raw)
            sent_at = record["sent_at"] if record["iat_id"] == iat_id else None
        except (ValueError, TypeError, KeyError):
            return None  # unreadable: it only ever improves an error message
        return float(sent_at) if isinstance(sent_at, int | float) else None

    def credentials(self) -> StoredCredentials:
        stored = load_credentials(self.board.state)
        if stored is None:
            raise NotOnboardedError("the device is not onboarded: run `mers onboard`")
        return stored

    # --- tokens and renewal ---------------------------------------------------------------------------

    def access_token(self) -> str:
        """A valid access token: the cached one while it has `token_margin` left, else a new one; the
        credentials are renewed first when they have less than `renew_margin` left."""
        with self._operation():
            stored = self.credentials()
            session = self._session_for(stored)
            self._synchronise(session)
            if self._renewal_due(stored):
                return self._renew(stored, session).token
            cached = load_token(self.board.state)
            if (
                cached is not None
                and cached.set_id == stored.current.id
                and cached.expires_at - self.clock.now() > self.settings.token_refresh_margin(cached)
            ):
                return cached.token
            return self._fetch_token(stored, session).token

    def renew(self, *, force: bool = False) -> bool:
        """Renew now if due (or if `force`); True when a renewal happened."""
        with self._operation():
            stored = self.credentials()
            session = self._session_for(stored)
            self._synchronise(session)
            if force or self._renewal_due(stored):
                self._renew(stored, session)
                return True
            return False

    def _renewal_due(self, stored: StoredCredentials) -> bool:
        """Within the margin of the expiry, or holding an expiry that is no time the hub could have
        granted (NaN, milliseconds: stored before answers were checked), which renewing replaces."""
        remaining = stored.current.expires_at - self.clock.now()
        margin = self.settings.renewal_margin(stored.current)
        return not margin <= remaining <= onboarding.MAX_CREDENTIAL_LIFETIME

    def forget_token(self) -> None:
        """Drop the cached access token (the hub said it is no longer valid)."""
        self.board.state.delete(TOKEN_FILE)

    def _fetch_token(self, stored: StoredCredentials, session: HubSession) -> AccessToken:
        answer = self._request_token(stored, stored.current, session)
        if answer.status == 401:
            # expired (a long time offline) or superseded: the RAT brings new credentials
            return self._renew(stored, session)
        return self._adopt_token(stored, answer)

    def _renew(self, stored: StoredCredentials, session: HubSession) -> AccessToken:
        key = self._agent_key() if stored.profile is CredentialProfile.RSA_3072 else None
        self._step(RenewalStep.REQUESTING)
        try:
            new = onboarding.renew(
                session, stored.client_id, stored.profile, stored.current, key, now=self.clock.now
            )
            used_previous = False
        except ReonboardingRequiredError:
            if stored.previous is None:
                raise
            # the current set never reached the hub's books as ours (replaced unseen): the previous RAT
            # is the one the hub still honours
            new = onboarding.renew(
                session, stored.client_id, stored.profile, stored.previous, key, now=self.clock.now
            )
            used_previous = True
        self._step(RenewalStep.ANSWERED)
        stored = stored.renewed(replace(new, issued_at=self.clock.now()), used_previous=used_previous)
        save_credentials(self.board.state, stored)
        self._step(RenewalStep.PERSISTED)
        answer = self._request_token(stored, stored.current, session)
        if answer.status == 401:
            _, description = answer.error()
            raise ReonboardingRequiredError(
                f"the hub refused freshly renewed credentials ({description}); {onboarding.REONBOARD_HINT}",
                status=401,
            )
        return self._adopt_token(stored, answer)

    def _request_token(
        self, stored: StoredCredentials, held: CredentialSet, session: HubSession
    ) -> HubAnswer:
        signing_key: str | rsa.RSAPrivateKey
        if stored.profile is CredentialProfile.RSA_3072:
            signing_key = self._agent_key()
        else:
            if held.client_secret is None:
                raise CorruptStateError("the stored SHARED_SECRET credentials have no client secret")
            signing_key = held.client_secret
        # A 400 invalid_grant gets one more try with a new assertion. The hub spends each assertion's jti,
        # and the transport's retry after an answer lost on the way back (the hub had granted the token)
        # sends the spent one again; a refusal for the device's clock is cured too, since the 400 brought
        # the hub's time and the new assertion is dated by it.
        for _ in range(2):
            assertion = client_assertion(stored.client_id, stored.tenant, signing_key, self.clock.now())
            answer = session.request("POST", TOKEN_PATH, data=token_form(assertion))
            if answer.status != 400 or answer.error()[0] != "invalid_grant":
                break
        if answer.status not in (200, 401):
            raise onboarding.refusal(answer, "token request")
        return answer

    def _adopt_token(self, stored: StoredCredentials, answer: HubAnswer) -> AccessToken:
        token = parse_token_answer(answer.json(), self.clock.now(), stored.current.id)
        save_token(self.board.state, token)
        if stored.previous is not None:
            self._step(RenewalStep.CONFIRMED)
            save_credentials(self.board.state, stored.confirmed())
            self._step(RenewalStep.DONE)
        return token

    def _synchronise(self, session: HubSession) -> None:
        """Learn the hub's time before deciding anything on it (the local clock may be hours off)."""
        if self.clock.synchronised:
            return
        session.request("GET", TOKEN_KEY_PATH)
        if not self.clock.synchronised:
            raise HubProtocolError("the hub did not tell its time (no Server-Time header)")

    # --- authorised calls -----------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> HubAnswer:
        """An API call with the access token; a 401 (token revoked or expired early) gets one fresh
        token and one more try."""
        token = self.access_token()
        with self._operation():
            session = self._session_for(self.credentials())
            answer = session.request(method, path, bearer=token, **kwargs)
            if answer.status != 401:
                return answer
            self.forget_token()
        token = self.access_token()
        with self._operation():
            return session.request(method, path, bearer=token, **kwargs)

    def data_source_configuration(self) -> dict[str, Any]:
        """The agent's data source configuration, as the hub holds it."""
        client_id = self.credentials().client_id
        answer = self.request("GET", f"/api/agentmanagement/v3/agents/{client_id}/dataSourceConfiguration")
        if answer.status != 200:
            raise onboarding.refusal(answer, "data source configuration request")
        return answer.json()

    # --- plumbing -------------------------------------------------------------------------------------

    def _result(
        self, outcome: OnboardOutcome, stored: StoredCredentials, source: BoardingSource
    ) -> OnboardResult:
        return OnboardResult(outcome, stored.client_id, stored.profile, stored.current.expires_at, source)

    def _step(self, step: RenewalStep) -> None:
        if self._step_hook is not None:
            self._step_hook(step)

    def _session_for(self, stored: StoredCredentials) -> HubSession:
        network = None if stored.boarding.network is None else parse_network(stored.boarding.network)
        return self._session(stored.base_url, stored.boarding.ca_bundle, network)

    def _session(self, base_url: str, ca_bundle: bytes, network: NetworkConfig | None) -> HubSession:
        digest = hashlib.sha256(ca_bundle).hexdigest()[:16]
        key = (base_url, digest, network.proxy_url if network else "")
        if key not in self._sessions:
            name = f"ca-{digest}.pem"
            if self.board.state.read(name) != ca_bundle:
                self.board.state.write(name, ca_bundle)
            ca_file = self.board.state.directory / name
            self._sessions[key] = HubSession(
                base_url, ca_file, self.clock, network=network, settings=self.settings.http
            )
        return self._sessions[key]

    def _agent_key(self, *, create: bool = False) -> rsa.RSAPrivateKey:
        """The device's RSA-3072 key: made here, kept 0600 in the state directory, never sent anywhere
        but as its public JWK. One key for the device's life: renewals register it again."""
        pem = self.board.state.read(AGENT_KEY_FILE)
        if pem is None:
            if not create:
                raise CorruptStateError(f"the RSA_3072 credentials need {AGENT_KEY_FILE}, which is missing")
            key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            self.board.state.write(AGENT_KEY_FILE, pem)
        try:
            loaded = serialization.load_pem_private_key(pem, password=None)
        except ValueError as exc:
            raise CorruptStateError(f"{AGENT_KEY_FILE} is not a PEM private key") from exc
        if not isinstance(loaded, rsa.RSAPrivateKey) or loaded.key_size != 3072:
            raise CorruptStateError(f"{AGENT_KEY_FILE} is not an RSA-3072 key")
        return loaded

    @contextlib.contextmanager
    def _operation(self) -> Iterator[None]:
        """Hold the state directory's lock, turn board failures into `StorageError`, and record the last
        error for `mers status`: the outcome of the last operation with the hub, so one that succeeds
        clears it (an error already overcome is not the device's state)."""
        outermost = self._lock_depth == 0
        with self._locked():
            try:
                yield
            except BoardError as exc:
                error = StorageError(f"board storage: {exc}")
                self._record_error(error)
                raise error from exc
            except MersError as exc:
                self._record_error(exc)
                raise
            if outermost:
                with contextlib.suppress(BoardError):
                    self.board.state.delete(LAST_ERROR_FILE)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._lock_depth == 0:
            directory = self.board.state.directory
            ensure_directory(directory)
            try:
                self._lock_fd = os.open(directory / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o600)
            except OSError as exc:
                raise StorageError(f"cannot lock {directory}: {exc.strerror}") from exc
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0:
                os.close(self._lock_fd)  # closing releases the flock
                self._lock_fd = -1

    def _record_error(self, error: MersError) -> None:
        record = {"at": time.time(), "kind": type(error).__name__, "message": str(error)}
        with contextlib.suppress(BoardError):
            self.board.state.write(LAST_ERROR_FILE, json.dumps(record).encode())
