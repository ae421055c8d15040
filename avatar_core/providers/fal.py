"""fal.ai: https://queue.fal.run (see shared/PROVIDERS.md, "fal.ai").

``Authorization: Key <FAL_KEY>``; the queue API: ``POST /{endpoint}`` answers
``{"request_id", "status_url", "response_url", "cancel_url"}``, and those URLs **drop
the endpoint's sub-path**: ``/{owner}/{app}/requests/{id}`` (``/fal-ai/kling-video/...``).
Files travel inside the JSON as data URIs. Errors carry ``{"detail", "error_type"?}``
and/or the ``x-fal-error-type`` header.

``GET .../status/stream`` (server-sent events) is offered as :meth:`FalProvider.stream_status`
for callers that want pushes; the job loop polls :meth:`FalProvider.status`, which is
what every provider shares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
from httpx_sse import aconnect_sse

from ..config import Settings
from ..errors import JobFailed, ProtocolError, TransientError
from .base import (
    MODEL_IDS,
    Completed,
    Failed,
    HttpProvider,
    JobHandle,
    JobStatus,
    ProgressFn,
    Processing,
    Queued,
    SubmitRequest,
    data_uri,
    error_text,
    model_id,
    raise_for_status,
    read_inline,
    require,
)

# fal.ai's models reject an empty prompt; "." is what its own playground sends by default.
DEFAULT_PROMPT = "."

# A data URI rides inside the JSON body, a third larger than the file. 10 MB is the
# strictest published image limit (PROVIDERS.md "Input limits"), and a prepared voice track
# (MP3, 128 kbit/s, at most 300 s) is under 5 MB, so anything bigger is not an input we made.
MAX_INLINE_BYTES = 10 * 1024 * 1024

# Every fal.ai Kling avatar endpoint lives in one app; used when a resumed job's handle has
# no model id to derive ``/{owner}/{app}`` from.
_FAL_ENDPOINTS = [m for (p, _t, _v), m in MODEL_IDS.items() if p == "fal"]


def app_path(endpoint: str) -> str:
    """``fal-ai/kling-video/v1/standard/ai-avatar`` -> ``fal-ai/kling-video``: the owner and
    app, where the queue keeps the request (status, result and cancel URLs drop the rest)."""
    parts = [p for p in endpoint.split("/") if p]
    if len(parts) < 2:
        raise ValueError(f"not a fal.ai endpoint: {endpoint!r}")
    return "/".join(parts[:2])


class FalProvider(HttpProvider):
    name = "fal"
    label = "fal.ai"
    supports_cancel = True  # PUT .../requests/{id}/cancel
    dashboard = "the Requests list of your fal.ai dashboard (fal.ai/dashboard)"

    def __init__(self, api_key: str, base_url: str = "https://queue.fal.run", **kw) -> None:
        super().__init__(base_url, {"Authorization": f"Key {api_key}"}, **kw)
        # request id -> the URLs its submit returned (the handle alone can rebuild them).
        self._urls: dict[str, dict[str, str]] = {}

    def error_detail(self, response: httpx.Response) -> str:
        text = error_text(response)
        kind = response.headers.get("x-fal-error-type")
        return f"{text} [{kind}]" if kind and kind not in text else text

    # -- files ----------------------------------------------------------------------

    async def upload(self, path: Path, content_type: str, progress: ProgressFn | None = None) -> str:
        """No upload call: the file goes inside the submit as a data URI (size-checked)."""
        raw = read_inline(
            path, MAX_INLINE_BYTES, what=content_type.split("/")[0] or "input", provider=self,
            hint="Use a public URL for it, or a smaller file (a shorter clip).",
        )
        if progress:
            progress(len(raw), len(raw))
        return data_uri(content_type, raw)

    # -- URLs -----------------------------------------------------------------------

    def _same_origin(self, url: str) -> bool:
        ours, theirs = urlsplit(self.base_url), urlsplit(url)
        return (ours.scheme, ours.netloc) == (theirs.scheme, theirs.netloc)

    def request_url(self, handle: JobHandle, which: str) -> str:
        """``status``, ``response`` or ``cancel`` URL: the one the submit returned, else
        ``/{owner}/{app}/requests/{id}`` rebuilt from the handle's model id."""
        given = self._urls.get(handle.request_id, {}).get(which)
        if given:
            return given
        endpoint = handle.model if handle.model in _FAL_ENDPOINTS else _FAL_ENDPOINTS[0]
        base = f"{self.base_url}/{app_path(endpoint)}/requests/{handle.request_id}"
        return {"response": base, "status": f"{base}/status", "cancel": f"{base}/cancel"}[which]

    # -- jobs -----------------------------------------------------------------------

    async def submit(self, request: SubmitRequest) -> JobHandle:
        endpoint = model_id(self.name, request.tier, request.version)
        body = {
            "image_url": request.image_url,
            "audio_url": request.audio_url,
            "prompt": request.prompt or DEFAULT_PROMPT,
        }
        response = await self.submit_request("POST", f"/{endpoint}", json=body)
        data = self.submit_reply(response, self.json)
        request_id = str(self.submit_reply(response, lambda r: require(data, "request_id", self)))
        urls = {}
        for which in ("status", "response", "cancel"):
            url = data.get(f"{which}_url") if isinstance(data, dict) else None
            # Only URLs on our own host get our key; anything else is rebuilt from the id.
            if isinstance(url, str) and self._same_origin(url):
                urls[which] = url
        self._urls[request_id] = urls
        return JobHandle(self.name, request_id, endpoint)

    def parse_status(self, body: Any, request_id: str) -> JobStatus:
        """The one place fal.ai's queue status values are read."""
        if not isinstance(body, dict):
            raise self.protocol_error("a status reply that is not a JSON object", request_id)
        status = body.get("status")
        if status == "IN_QUEUE":
            position = body.get("queue_position")
            return Queued(position if isinstance(position, int) else None)
        if status == "IN_PROGRESS":
            return Processing(logs=_log_messages(body.get("logs")))
        if status == "COMPLETED":
            error, kind = body.get("error"), body.get("error_type")
            if error or kind:
                text = str(error or "fal.ai reported the request failed without a reason.")
                return Failed(f"{text} [{kind}]" if kind else text)
            # The video URL needs one more read (the response URL): the loop calls result().
            return Completed("", {"metrics": body.get("metrics") or {}})
        raise self.protocol_error(f"an unknown job status {status!r}", request_id)

    async def status(self, handle: JobHandle) -> JobStatus:
        response = await self.request(
            "GET", self.request_url(handle, "status"), params={"logs": "1"}, request_id=handle.request_id
        )
        return self.parse_status(self.json(response, handle.request_id), handle.request_id)

    async def stream_status(self, handle: JobHandle) -> AsyncIterator[JobStatus]:
        """Statuses pushed by ``GET .../status/stream`` (server-sent events) until the stream
        ends. An optional fast path: the job loop polls :meth:`status` instead."""
        url = self.request_url(handle, "status") + "/stream"
        try:
            async with aconnect_sse(
                self._client, "GET", url, params={"logs": "1"},
                timeout=httpx.Timeout(30.0, connect=10.0, read=None),
            ) as source:
                response = source.response
                if response.status_code >= 400:
                    await response.aread()
                    raise_for_status(response, provider=self.name, label=self.label,
                                     request_id=handle.request_id, detail=self.error_detail(response))
                async for event in source.aiter_sse():
                    if not event.data:
                        continue  # a keep-alive or an event with no data
                    try:
                        body = event.json()
                    except ValueError as exc:
                        raise ProtocolError(
                            f"{self.label} sent a status event that is not JSON.",
                            provider=self.name, request_id=handle.request_id,
                        ) from exc
                    yield self.parse_status(body, handle.request_id)
        except httpx.TransportError as exc:
            raise TransientError(
                f"The {self.label} status stream broke off ({type(exc).__name__}).",
                provider=self.name, request_id=handle.request_id,
            ) from exc

    async def result(self, handle: JobHandle) -> Completed:
        response = await self.request("GET", self.request_url(handle, "response"), request_id=handle.request_id)
        body = self.json(response, handle.request_id)
        video = body.get("video") if isinstance(body, dict) else None
        url = video.get("url") if isinstance(video, dict) else None
        if not isinstance(url, str) or not url:
            if isinstance(body, dict) and body.get("detail"):
                raise JobFailed(str(body["detail"]), provider=self.name, request_id=handle.request_id)
            raise self.protocol_error("a result without video.url", handle.request_id)
        meta = {
            "duration": body.get("duration"),
            "file_size": video.get("file_size"),
            "content_type": video.get("content_type"),
        }
        return Completed(url, {k: v for k, v in meta.items() if v is not None})

    async def cancel(self, handle: JobHandle) -> bool:
        """``PUT .../cancel``: 202 CANCELLATION_REQUESTED; 400 ALREADY_COMPLETED is a no."""
        response = await self.request(
            "PUT", self.request_url(handle, "cancel"), request_id=handle.request_id, passthrough=(400,)
        )
        if response.status_code == 400:
            return False
        body = self.json(response, handle.request_id)
        return isinstance(body, dict) and body.get("status") == "CANCELLATION_REQUESTED"


def _log_messages(logs: Any) -> tuple[str, ...]:
    if not isinstance(logs, list):
        return ()
    return tuple(str(item["message"]) for item in logs if isinstance(item, dict) and item.get("message"))


def from_settings(settings: Settings, **kw) -> FalProvider:
    """The client ``make_provider("fal", ...)`` builds (FAL_KEY, FAL_BASE_URL)."""
    return FalProvider(settings.fal_key.get(), settings.fal_base_url, **kw)
