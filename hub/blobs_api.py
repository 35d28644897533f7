"""`GET|HEAD /blobs/<sha256>?expires=&sig=`: release images for devices, by signed URL only.

Outside the API prefix (docs/design.md §7) and without any other credential: the signed URL is the
credential (`signed_urls`). Every refusal is the same 403 whether or not the blob exists, so the endpoint
tells a prober nothing about which images the hub holds. Downloads resume: a single `Range` gets a 206,
guarded by `If-Range` on the blob's strong ETag (its SHA-256, which never changes for a given URL path).
`If-Match` and `If-None-Match` are judged on that ETag before the range, as RFC 9110 section 13.2.2
orders them (412, 304); the blob has no modification date, so the date conditions are ignored.

The file is streamed from an open descriptor in large chunks read in a worker thread, so memory stays at
one chunk whatever the image size, and reading stops as soon as the client goes away.

(Starlette's `FileResponse` does ranges, but answers a malformed `Range` with a plain-text 400 where
RFC 9110 says to ignore it, its 416 is plain text rather than the hub's JSON error, it answers several
ranges with multipart bodies a firmware downloader has no use for, and it reads 64 KiB at a time.)
"""

from __future__ import annotations

import os
import stat

import anyio
import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from .auth import State
from .byte_ranges import ByteRange, Unsatisfiable, requested_range
from .errors import ForbiddenError, PreconditionFailedError
from .etags import condition_names
from .releases import blob_file
from .signed_urls import BLOB_PATH_PREFIX, INVALID, BlobUrlSigner

router = APIRouter(tags=["blobs"])

#: bytes read and sent at a time. A stalled client holds two to four times this in the server (the chunk
#: and its encrypted copy wait in the transport): 4 MiB held about 15 MiB per slow gateway, 1 MiB holds
#: about 4. Smaller is slower: in one run of bench/install.py curl took 0.27 s for 256 MiB at 1 MiB (0.30 s
#: at 4 MiB) but 0.43 s at 256 KiB, the hub's sender paying its per-chunk thread hop and ASGI send more
#: often; Starlette's own FileResponse, 64 KiB at a time, ran at 0.3x openssl s_server
CHUNK_SIZE = 1 << 20


@router.get(BLOB_PATH_PREFIX + "{sha256}", operation_id="download_blob")
@router.head(BLOB_PATH_PREFIX + "{sha256}", operation_id="blob_headers")
def get_blob(sha256: str, request: Request, state: State) -> Response:
    signer = BlobUrlSigner(state.url_secret, state.base_url, state.settings.signed_url_lifetime)
    signer.check(sha256, _single(request, "expires"), _single(request, "sig"), state.clock())
    fd = _open_blob(blob_file(state.blobs, sha256))
    try:
        size = os.fstat(fd).st_size
        etag = f'"{sha256}"'
        not_modified = _not_modified(request, etag)
        part = requested_range(request.headers.get("range"), request.headers.get("if-range"), etag, size)
    except BaseException:
        os.close(fd)
        raise
    headers = {"accept-ranges": "bytes", "etag": etag, "cache-control": "no-store"}
    if not_modified:
        os.close(fd)
        return Response(status_code=304, headers=headers)
    if isinstance(part, Unsatisfiable):
        os.close(fd)
        return JSONResponse(
            {"error": "range_not_satisfiable", "error_description": f"the blob has {size} bytes"},
            status_code=416,
            headers={**headers, "content-range": part.content_range},
        )
    return BlobResponse(fd, part or ByteRange(0, size, size), partial=part is not None, headers=headers)


def _not_modified(request: Request, etag: str) -> bool:
    """`If-Match` (412 unless it names the blob strongly), then whether `If-None-Match` names it (304).
    Repeated fields are one list, as RFC 9110 section 5.3 reads them."""
    if_match = request.headers.getlist("if-match")
    if if_match and not condition_names(", ".join(if_match), etag, weak=False):
        raise PreconditionFailedError(f"If-Match does not name the blob's ETag {etag}")
    if_none_match = request.headers.getlist("if-none-match")
    return bool(if_none_match) and condition_names(", ".join(if_none_match), etag, weak=True)


def _single(request: Request, name: str) -> str | None:
    """A query parameter given at most once: a repeated one is ambiguous (which one did we check?)."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise ForbiddenError(INVALID)
    return values[0] if values else None


def _open_blob(path: os.PathLike[str]) -> int:
    """An open descriptor of the blob: held from here on, the response reads exactly the file it sized.
    A missing blob is refused like a tampered URL."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise ForbiddenError(INVALID) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ForbiddenError(INVALID)
    return fd


class BlobResponse(Response):
    """Bytes `part.start` to `part.stop` of the open file `fd` (which it closes), as a 200 or a 206."""

    def __init__(self, fd: int, part: ByteRange, *, partial: bool, headers: dict[str, str]) -> None:
        self.fd = fd
        self.part = part
        headers = {**headers, "content-length": str(part.length)}
        if partial:
            headers["content-range"] = part.content_range
        super().__init__(
            status_code=206 if partial else 200, headers=headers, media_type="application/octet-stream"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            async with anyio.create_task_group() as group:
                group.start_soon(_cancel_on_disconnect, receive, group.cancel_scope)
                await self._stream(send)
                group.cancel_scope.cancel()
        finally:
            os.close(self.fd)

    async def _stream(self, send: Send) -> None:
        offset, stop = self.part.start, self.part.stop
        while offset < stop:
            chunk = await anyio.to_thread.run_sync(os.pread, self.fd, min(CHUNK_SIZE, stop - offset), offset)
            if not chunk:
                raise OSError(f"the blob shrank while being sent (at byte {offset})")
            offset += len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": offset < stop})
        if self.part.length == 0:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    """Stop reading the file once the client has gone (the server would drop what we send anyway)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
