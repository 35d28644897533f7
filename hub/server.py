"""Serving the hub: uvicorn over TLS only, on a socket we bind first so port 0 works and the base URL is
known before the first request. Once listening, the URL goes to `DIR/url` (the scripting contract);
a clean shutdown removes it again, so a script never finds the URL of a hub that has stopped."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import ssl
import tempfile
import time
from pathlib import Path

import uvicorn
from cryptography import x509

from .app import create_app
from .errors import HubSetupError
from .home import HubHome
from .releases import check_hard_links, sweep_upload_leftovers
from .state import HubState, load_state
from .tokens import Clock

log = logging.getLogger("mers.hub")


class HubServer(uvicorn.Server):
    """A uvicorn server that publishes its URL when it is ready to accept connections."""

    def __init__(self, config: uvicorn.Config, state: HubState, url: str) -> None:
        super().__init__(config)
        self.hub = state
        self.url = url

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            _publish_url(self.hub.home.url_file, self.url)
            log.info("serving %s at %s", self.hub.home.root, self.url)
            if self.hub.base_url != self.url:
                log.info("devices are given %s", self.hub.base_url)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        try:
            if self.hub.home.url_file.read_text(encoding="utf-8").strip() == self.url:
                self.hub.home.url_file.unlink()
        except OSError:
            pass
        self.hub.close()


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise HubSetupError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(2048)
    return sock


def url_for(sock: socket.socket) -> str:
    """The URL this machine reaches the hub at (`DIR/url`, for the local admin CLI): the bound address,
    or loopback when the hub listens on every address (`0.0.0.0`, `::`), which no client can connect to
    by that name. The certificate always covers 127.0.0.1 and localhost (not ::1, so an IPv6 wildcard
    is named localhost, which resolves to both)."""
    host, port = sock.getsockname()[:2]
    if ipaddress.ip_address(host).is_unspecified:
        host = "localhost" if ":" in host else "127.0.0.1"
    return _https(host, port)


def device_url(home: HubHome, sock: socket.socket) -> str:
    """The base URL devices are given when `hub.toml` names no `public_url`: the bound address, or, when
    the hub listens on every address, the first name `init --hostname` put in the certificate (what the
    devices reach it by: it is in their boarding data and signed URLs, and the certificate matches it).
    Without such a name, loopback, as `url_for`."""
    host, port = sock.getsockname()[:2]
    if not ipaddress.ip_address(host).is_unspecified:
        return _https(host, port)
    for name in _certificate_names(home):
        if name.lower() not in _ALWAYS_CERTIFIED and "*" not in name:  # a wildcard names no one host
            return _https(name, port)
    return url_for(sock)


#: the names `init` puts in every certificate, whatever --hostname says
_ALWAYS_CERTIFIED = frozenset({"127.0.0.1", "localhost"})


def _certificate_names(home: HubHome) -> list[str]:
    """The DNS names and IP addresses of the hub's certificate, in its order (`init`'s)."""
    try:
        certificate = x509.load_pem_x509_certificate(home.server_certificate.read_bytes())
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []  # `_check_tls_files` has said what is wrong with it, or a certificate of no names
    return [str(name.value) for name in names if isinstance(name, x509.DNSName | x509.IPAddress)]


def _https(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"https://{shown}:{port}"


def build_server(
    home: HubHome, sock: socket.socket, *, clock: Clock = time.time, log_level: str = "warning"
) -> HubServer:
    """The server for `home` on the bound socket `sock`; `run(sockets=[sock])` serves it."""
    for path in (home.server_certificate, home.server_key):
        if not path.is_file():
            raise HubSetupError(f"{path} is missing; is {home.root} a hub directory made by mers-hub init?")
    _check_tls_files(home)
    url = url_for(sock)
    state = load_state(home, device_url(home, sock), clock)
    check_hard_links(home.blobs)
    swept = sweep_upload_leftovers(home.blobs, clock())
    if swept:
        log.info("removed %d temporary file(s) of uploads cut short", swept)
    config = uvicorn.Config(
        create_app(state),
        ssl_certfile=str(home.server_certificate),
        ssl_keyfile=str(home.server_key),
        ssl_version=ssl.PROTOCOL_TLS_SERVER,
        access_log=False,  # ours is redacted; uvicorn's would log signed URLs' signatures
        log_level=log_level,
        timeout_graceful_shutdown=5,
        server_header=False,
        lifespan="off",  # the hub has no startup or shutdown hooks
    )
    return HubServer(config, state, url)


def _check_tls_files(home: HubHome) -> None:
    """Load the certificate and key as uvicorn will: a damaged or mismatched file is then a one-line
    setup error before anything starts, rather than an `ssl.SSLError` traceback from inside uvicorn."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(home.server_certificate, home.server_key)
    except (ssl.SSLError, OSError) as exc:
        raise HubSetupError(
            f"cannot use {home.server_certificate} with {home.server_key} for TLS (is one of them damaged "
            f"or replaced?): {exc.strerror or exc}"
        ) from exc


def serve(home: HubHome, host: str, port: int, *, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    sock = bind(host, port)
    server = build_server(home, sock, log_level=log_level)
    server.run(sockets=[sock])


def _publish_url(path: Path, url: str) -> None:
    fd, temporary = tempfile.mkstemp(prefix=".url.", dir=path.parent)
    try:
        os.write(fd, url.encode("ascii") + b"\n")
        os.fchmod(fd, 0o644)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
