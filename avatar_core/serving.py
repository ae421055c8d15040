"""What Gradio's file routes may show in the browser: only the media the app writes itself.

Gradio serves every file under ``allowed_paths`` (the output folder) inline with the
type its extension suggests, HTML and SVG included, which would run a script on the
app's own address. :class:`InlineMediaOnly` (an ASGI middleware, installed by
``app.launch`` through Gradio's ``app_kwargs``) rewrites the answer of every file route
whose type is not one the app itself writes (JPEG, PNG, MP3, WAV, MP4) into a download:
``application/octet-stream`` with ``Content-Disposition: attachment``. Every file
answer also gets ``X-Content-Type-Options: nosniff`` and a sandboxing
``Content-Security-Policy``, so not even a browser's guess can turn one into a page.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

# What the checks, the renderer and the job downloads write into the served folders.
INLINE_TYPES = frozenset({"image/jpeg", "image/png", "audio/mpeg", "audio/wav", "audio/x-wav", "video/mp4"})
# Gradio 6: /gradio_api/file=..., the deprecated /gradio_api/file/...; the others in case
# an older or newer Gradio brings back its old names.
FILE_ROUTES = ("/gradio_api/file=", "/gradio_api/file/", "/file=", "/file/")
FILE_CSP = b"default-src 'none'; media-src 'self'; img-src 'self'; sandbox"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]


def is_file_route(path: str) -> bool:
    return any(route in path for route in FILE_ROUTES)


def safe_file_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers of a file answer, with anything not in :data:`INLINE_TYPES` made a download."""
    ctype = b""
    for name, value in headers:
        if name.lower() == b"content-type":
            ctype = value.split(b";", 1)[0].strip().lower()
    inline = ctype.decode("latin-1") in INLINE_TYPES
    drop = {b"x-content-type-options", b"content-security-policy"}
    if not inline:
        drop |= {b"content-type", b"content-disposition"}
    out = [(n, v) for n, v in headers if n.lower() not in drop]
    if not inline:
        out += [(b"content-type", b"application/octet-stream"), (b"content-disposition", b"attachment")]
    out += [(b"x-content-type-options", b"nosniff"), (b"content-security-policy", FILE_CSP)]
    return out


class InlineMediaOnly:
    """ASGI middleware: Gradio's file routes show only JPEG/PNG/MP3/WAV/MP4 inline."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope.get("type") != "http" or not is_file_route(scope.get("path", "")):
            await self.app(scope, receive, send)
            return

        async def guarded_send(message: Message) -> None:
            if message.get("type") == "http.response.start":
                message = {**message, "headers": safe_file_headers(list(message.get("headers") or []))}
            await send(message)

        await self.app(scope, receive, guarded_send)


# Gradio 6's upload route (and its older name): where a visitor's files enter the cache.
UPLOAD_ROUTES = ("/gradio_api/upload", "/upload")


class SweepAfterUpload:
    """ASGI middleware: after every upload, run ``sweep`` (the size cap of Gradio's upload cache).

    An upload needs no event of the app's: without this, a script could fill the cache
    through the upload route alone. The sweep runs in a worker thread once Gradio has
    stored the files, just before the last byte of its answer goes out (so the uploader
    cannot outrun it), at most one at a time (an upload meanwhile is covered by the next).
    """

    def __init__(self, app: Callable[..., Awaitable[None]], sweep: Callable[[], Any]) -> None:
        self.app = app
        self.sweep = sweep
        self._busy = False

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        path = scope.get("path", "")
        if scope.get("type") != "http" or scope.get("method") != "POST" or not path.rstrip("/").endswith(
                UPLOAD_ROUTES):
            await self.app(scope, receive, send)
            return

        async def sweeping_send(message: Message) -> None:
            if message.get("type") == "http.response.body" and not message.get("more_body") and not self._busy:
                import anyio

                self._busy = True
                try:
                    await anyio.to_thread.run_sync(self.sweep)
                finally:
                    self._busy = False
            await send(message)

        await self.app(scope, receive, sweeping_send)
