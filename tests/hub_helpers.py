"""A real hub for tests: a directory made by `create_hub`, served by uvicorn over TLS on 127.0.0.1 in a
background thread, with a clock tests can move forward (so tokens age without sleeping)."""

from __future__ import annotations

import base64
import functools
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import jwt
import requests
import sqlalchemy
from cryptography.hazmat.primitives.asymmetric import rsa

from hub.home import HubSettings
from hub.models import Agent
from hub.server import bind, build_server
from hub.setup import HubKeys, create_hub, new_hub_keys
from hub.state import HubState

AGENTS = "/api/agentmanagement/v3"
FIRMWARE = "/api/firmwaredeployment/v3"


class HubAPI(Protocol):
    """What the onboarding helpers need of a hub: its HTTP API, and the time it keeps. Both the in-process
    `RunningHub` and a `mers-hub serve` subprocess provide it."""

    @property
    def url(self) -> str: ...

    def clock(self) -> float: ...

    def request(
        self, method: str, path: str, *, token: str | None = None, **kwargs: Any
    ) -> requests.Response: ...

    def admin(self, method: str, path: str, **kwargs: Any) -> requests.Response: ...


@dataclass
class MovableClock:
    """Real time plus an offset tests advance."""

    offset: float = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclass
class RunningHub:
    """A hub being served: its URL, its CA, its admin token, and a requests session that trusts the CA."""

    root: Path
    url: str
    admin_token: str
    clock: MovableClock
    state: HubState
    http: requests.Session = field(default_factory=requests.Session)

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    def request(
        self, method: str, path: str, *, token: str | None = None, **kwargs: Any
    ) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        # verify per request: requests prefers REQUESTS_CA_BUNDLE from the environment over Session.verify
        kwargs.setdefault("verify", str(self.ca))
        return self.http.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def admin(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.request(method, path, token=self.admin_token, **kwargs)


@contextmanager
def fresh_postgres_database(server_url: str) -> Iterator[str]:
    """Create a database with a random name on the server `server_url`, yield its URL, drop it after."""
    name = f"mers_test_{secrets.token_hex(6)}"
    server = sqlalchemy.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with server.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        yield sqlalchemy.make_url(server_url).set(database=name).render_as_string(hide_password=False)
        with server.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        server.dispose()


@functools.cache
def shared_hub_keys() -> HubKeys:
    """The key material of every test hub in this process, made once: generating an RSA-3072 key costs
    0.1 to 1 s, a few minutes over the suite. Each hub still has its own admin token, URL secret and
    database, and its tokens name its own URL as issuer, so what one hub issues is refused by another."""
    return new_hub_keys()


#: servers told to stop whose threads are not yet joined (see `running_hub`'s `wait_for_stop`)
_stopping: list[threading.Thread] = []


def join_stopping_hubs() -> None:
    """Wait for every hub told to stop without waiting (at the end of the test session)."""
    while _stopping:
        _stopping.pop().join(timeout=30)


@contextmanager
def running_hub(
    root: Path,
    settings: HubSettings | None = None,
    *,
    wait_for_stop: bool = True,
    keys: HubKeys | None = None,
) -> Iterator[RunningHub]:
    """Create a hub in `root` and serve it until the block ends. uvicorn takes 0.1 to 0.2 s to stop
    (its tick and its shutdown each sleep 0.1 s); with `wait_for_stop` False the block ends once the
    server is told to stop and it stops in the background, for a caller that never looks at the hub
    or its directory again (the `hub` fixture's teardown). `keys`: key material of its own (for other
    host names in its certificate), instead of the test session's."""
    created = create_hub(root, settings=settings, keys=keys or shared_hub_keys())
    clock = MovableClock()
    sock = bind("127.0.0.1", 0)
    server = build_server(created.home, sock, clock=clock)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "the hub stopped while starting"
        assert time.monotonic() < deadline, "the hub did not start within 30 s"
        time.sleep(0.01)
    hub = RunningHub(root, server.url, created.admin_token, clock, server.hub)
    try:
        yield hub
    finally:
        hub.http.close()
        server.should_exit = True
        server.force_exit = True  # idle keep-alive TLS connections would hold a graceful exit for 5 s
        if wait_for_stop:
            thread.join(timeout=30)
            sock.close()
        else:  # uvicorn closes the listening socket itself as it shuts down
            _stopping.append(thread)


# --- agents and onboarding, through the hub's real HTTP API -------------------------------------------

SOUTHGATE = "southgate"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def rsa_jwk(
    public_key: rsa.RSAPublicKey, *, kid: str = "key-1", leading_zero: bool = False
) -> dict[str, str]:
    """The public JWK an RSA_3072 agent registers; `leading_zero` prefixes `n` with a zero byte, as one
    real client does (a two's-complement big integer)."""
    numbers = public_key.public_numbers()
    modulus = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
    if leading_zero:
        modulus = b"\x00" + modulus
    exponent = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
    return {"kty": "RSA", "kid": kid, "n": b64url(modulus), "e": b64url(exponent)}


def client_assertion(
    client_id: str,
    key: str | rsa.RSAPrivateKey,
    now: float,
    *,
    algorithm: str = "",
    lifetime: float = 300,
    **claims: Any,
) -> str:
    """A client assertion as real agents sign it: HS256 with the raw client secret, or RS256 with the
    agent's private key (`algorithm` overrides); `claims` add to or replace the standard ones."""
    payload: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "aud": [SOUTHGATE],
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now + lifetime),
        "jti": uuid.uuid4().hex,
        "schemas": ["urn:siemens:mindsphere:v1"],
        "ten": "mers",
    }
    payload.update(claims)
    algorithm = algorithm or ("HS256" if isinstance(key, str) else "RS256")
    signing_key: Any = key.encode("utf-8") if isinstance(key, str) else key
    return jwt.encode(payload, signing_key, algorithm=algorithm)


def token_form(assertion: str) -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": assertion,
    }


def create_agent(hub: HubAPI, name: str, profile: str = "SHARED_SECRET") -> dict[str, Any]:
    response = hub.admin("POST", f"{AGENTS}/agents", json={"name": name, "securityProfile": profile})
    assert response.status_code == 201, response.text
    agent: dict[str, Any] = response.json()
    return agent


def boarding_configuration(hub: HubAPI, agent_id: str) -> dict[str, Any]:
    response = hub.admin("GET", f"{AGENTS}/agents/{agent_id}/boarding/configuration")
    assert response.status_code == 200, response.text
    configuration: dict[str, Any] = response.json()
    return configuration


@dataclass
class OnboardedAgent:
    """An agent that registered with the hub: what a gateway holds after `mers onboard`."""

    hub: HubAPI
    id: str
    profile: str
    rat: str
    registration_client_uri: str
    client_secret: str | None = None
    private_key: rsa.RSAPrivateKey | None = None

    @property
    def key(self) -> str | rsa.RSAPrivateKey:
        key = self.client_secret if self.profile == "SHARED_SECRET" else self.private_key
        assert key is not None
        return key

    def assertion(self, **claims: Any) -> str:
        """A fresh client assertion dated by the hub's clock."""
        return client_assertion(self.id, self.key, self.hub.clock(), **claims)

    def request_token(self, **claims: Any) -> requests.Response:
        return self.hub.request("POST", f"{AGENTS}/oauth/token", data=token_form(self.assertion(**claims)))

    def access_token(self) -> str:
        """An access token from the token endpoint, obtained with a client assertion."""
        response = self.request_token()
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token

    def adopt(self, registration: dict[str, Any], private_key: rsa.RSAPrivateKey | None = None) -> None:
        """Take the credentials of a registration or renewal answer."""
        self.rat = registration["registration_access_token"]
        self.registration_client_uri = registration["registration_client_uri"]
        self.client_secret = registration.get("client_secret")
        if private_key is not None:
            self.private_key = private_key

    def renew(self, private_key: rsa.RSAPrivateKey | None = None) -> requests.Response:
        """Renew the credentials with the RAT (a new key for RSA_3072 if given) and adopt the answer."""
        body: dict[str, Any] = {"client_id": self.id}
        if self.profile == "RSA_3072":
            key = private_key or self.private_key
            assert key is not None
            body["jwks"] = {"keys": [rsa_jwk(key.public_key())]}
        response = self.hub.request(
            "PUT", self.registration_client_uri.removeprefix(self.hub.url), token=self.rat, json=body
        )
        if response.status_code == 200:
            self.adopt(response.json(), private_key)
        return response


def register(
    hub: HubAPI, iat: str, profile: str, private_key: rsa.RSAPrivateKey | None = None
) -> requests.Response:
    """The agent's registration call with its IAT (`{}`, or its public JWK for RSA_3072)."""
    body: dict[str, Any] = {}
    if profile == "RSA_3072":
        assert private_key is not None
        body = {"jwks": {"keys": [rsa_jwk(private_key.public_key())]}}
    return hub.request("POST", f"{AGENTS}/register", token=iat, json=body)


def onboard_agent(
    hub: HubAPI,
    name: str,
    profile: str = "SHARED_SECRET",
    *,
    private_key: rsa.RSAPrivateKey | None = None,
) -> OnboardedAgent:
    """Create agent `name`, fetch its boarding configuration and register it, all over HTTP."""
    agent = create_agent(hub, name, profile)
    configuration = boarding_configuration(hub, agent["id"])
    if profile == "RSA_3072" and private_key is None:
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    response = register(hub, configuration["content"]["iat"], profile, private_key)
    assert response.status_code == 201, response.text
    registration = response.json()
    onboarded = OnboardedAgent(
        hub,
        agent["id"],
        profile,
        registration["registration_access_token"],
        registration["registration_client_uri"],
    )
    onboarded.adopt(registration, private_key)
    return onboarded


def agent_record(hub: RunningHub, agent_id: str) -> dict[str, Any]:
    """Every stored column of an agent, read from the hub's database: to prove a refusal changed nothing."""
    with hub.state.database.transaction() as session:
        agent = session.get(Agent, agent_id)
        assert agent is not None, f"no agent {agent_id}"
        return {column.key: getattr(agent, column.key) for column in Agent.__table__.columns}


def assert_hub_error(response: requests.Response, status: int, code: str | None = None) -> dict[str, str]:
    """The response is the hub's uniform JSON error with `status` (and `code`, if given)."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, str] = response.json()
    assert set(body) == {"error", "error_description"}, body
    if code is not None:
        assert body["error"] == code, body
    return body


@contextmanager
def writes_held(hub: RunningHub, agent_id: str) -> Iterator[Callable[[str, int], None]]:
    """Hold a write of agent `agent_id`'s row open in a transaction of our own, as a slow writer would
    (SQLite: the database's write lock; PostgreSQL: the row's lock), until the block ends. Reads go on;
    the hub's writes wait. Yields `wait_for(fragment, count)`: returns once `count` statements of the
    hub containing `fragment` were sent to the database (and are now waiting), or fails after 30 s. For
    races whose every request must read before any writes."""
    engine = hub.state.database.engine
    started: list[str] = []
    seen = threading.Condition()

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        with seen:
            started.append(statement)
            seen.notify_all()

    def wait_for(fragment: str, count: int) -> None:
        with seen:
            done = seen.wait_for(lambda: sum(fragment in text for text in started) >= count, timeout=30)
        assert done, f"{count} statements with {fragment!r} were not sent within 30 s: {started}"

    with engine.connect() as holder:
        transaction = holder.begin()
        holder.execute(sqlalchemy.update(Agent).where(Agent.id == agent_id).values(etag=Agent.etag))
        sqlalchemy.event.listen(engine, "before_cursor_execute", record)
        try:
            yield wait_for
        finally:
            sqlalchemy.event.remove(engine, "before_cursor_execute", record)
            transaction.rollback()


def at_once(calls: Sequence[Callable[[], requests.Response]]) -> list[int]:
    """Each of `calls` from a thread of its own, all released together: the statuses, in `calls`' order.
    For the rules that must hold under concurrent requests (one winner, no lost update)."""
    start = threading.Barrier(len(calls))
    statuses: list[int | None] = [None] * len(calls)

    def send(index: int) -> None:
        start.wait(30)
        statuses[index] = calls[index]().status_code

    threads = [threading.Thread(target=send, args=(index,)) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    assert None not in statuses, f"a request did not finish: {statuses}"
    return [status for status in statuses if status is not None]
