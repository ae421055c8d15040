"""WaveSpeed AI: https://api.wavespeed.ai (see shared/PROVIDERS.md, "WaveSpeed AI").

Bearer auth, JSON bodies, and one envelope ``{"code", "message", "data"}`` on every
answer, where an application error can arrive as HTTP 200 with ``code`` != 200.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from ..errors import SubmitUncertain, TransientError
from .base import (
    Completed,
    Failed,
    HttpProvider,
    JobHandle,
    JobStatus,
    ProgressFn,
    Processing,
    Queued,
    SubmitRequest,
    error_for_status,
    file_body,
    model_id,
    require,
)


class WaveSpeedProvider(HttpProvider):
    name = "wavespeed"
    label = "WaveSpeed"
    supports_cancel = False  # the public API documents no cancel endpoint
    dashboard = "the recent predictions of your WaveSpeed dashboard (wavespeed.ai)"

    def __init__(self, api_key: str, base_url: str = "https://api.wavespeed.ai", **kw) -> None:
        super().__init__(base_url, {"Authorization": f"Bearer {api_key}"}, **kw)

    # -- the envelope ---------------------------------------------------------------

    def _data(self, response: httpx.Response, request_id: str | None = None) -> dict[str, Any]:
        body = self.json(response, request_id)
        if not isinstance(body, dict):
            raise self.protocol_error("a reply that is not a JSON object", request_id)
        code = body.get("code")
        if code != 200:
            # HTTP 200 can still carry an application error: the envelope's code decides.
            message = str(body.get("message") or "no message")
            if isinstance(code, int):
                error = error_for_status(code, message, provider=self.name, label=self.label, request_id=request_id)
                if error is not None:
                    raise error
            raise self.protocol_error(f"an unexpected envelope code {code!r} ({message})", request_id)
        data = body.get("data")
        if not isinstance(data, dict):
            raise self.protocol_error("a reply without 'data'", request_id)
        return data

    # -- uploads --------------------------------------------------------------------

    async def upload(self, path: Path, content_type: str, progress: ProgressFn | None = None) -> str:
        path = Path(path)
        size = path.stat().st_size
        # The current SDK's two-step upload: ask for a presigned PUT, then send the bytes.
        response = await self.request(
            "POST",
            "/api/v3/media/uploads",
            json={"filename": path.name, "size": size, "content_type": content_type},
            passthrough=(404, 405),
        )
        if response.status_code in (404, 405):
            return await self._upload_binary(path, content_type, progress)
        data = self._data(response)
        upload = require(data, "upload", self)
        download_url = require(data, "download_url", self)
        method = str(upload.get("method") or "PUT").upper()
        url = require(upload, "url", self)
        body = file_body(path, content_type, progress)  # streamed: a 50 MB file never sits in memory
        headers = httpx.Headers(body.headers)
        headers.update({str(k): str(v) for k, v in (upload.get("headers") or {}).items()})  # theirs win
        headers["Content-Length"] = str(body.length)  # a presigned PUT refuses chunked bodies
        if progress:
            progress(0, size)
        await self.request(method, url, content=body, headers=headers, without_auth=True)
        return str(download_url)

    async def _upload_binary(self, path: Path, content_type: str, progress: ProgressFn | None) -> str:
        size = path.stat().st_size
        if progress:
            progress(0, size)
        with path.open("rb") as fh:
            response = await self.request(
                "POST", "/api/v3/media/upload/binary", files={"file": (path.name, fh, content_type)}
            )
        if progress:
            progress(size, size)
        return str(require(self._data(response), "download_url", self))

    # -- jobs -----------------------------------------------------------------------

    async def submit(self, request: SubmitRequest) -> JobHandle:
        model = model_id(self.name, request.tier, request.version)
        body: dict[str, Any] = {"image": request.image_url, "audio": request.audio_url}
        if request.prompt:
            body["prompt"] = request.prompt
        response = await self.submit_request("POST", f"/api/v3/{model}", json=body)
        try:
            data = self.submit_reply(response, self._data)
            return JobHandle(self.name, str(self.submit_reply(response, lambda _r: require(data, "id", self))), model)
        except TransientError as exc:
            # An HTTP 200 whose envelope says 5xx: the server answered, so this is not a
            # network fault we may retry; the job's existence is unknown.
            raise SubmitUncertain(
                f"WaveSpeed answered the submit with an error ({exc.message}). A job was probably not "
                "created, but check your WaveSpeed dashboard before submitting again.",
                provider=self.name,
            ) from exc

    async def _read(self, handle: JobHandle) -> dict[str, Any]:
        response = await self.request(
            "GET", f"/api/v3/predictions/{handle.request_id}/result", request_id=handle.request_id
        )
        return self._data(response, handle.request_id)

    def parse_status(self, data: dict[str, Any], request_id: str) -> JobStatus:
        """The one place WaveSpeed's status values are read."""
        status = data.get("status")
        if status == "created":
            return Queued()
        if status == "processing":
            return Processing()
        if status == "completed":
            outputs = data.get("outputs")
            if not isinstance(outputs, list) or not outputs or not isinstance(outputs[0], str) or not outputs[0]:
                raise self.protocol_error("a completed job without an output video", request_id)
            meta = {
                "model": data.get("model"),
                "timings": data.get("timings") or {},
                "has_nsfw_contents": data.get("has_nsfw_contents") or [],
                "created_at": data.get("created_at"),
            }
            return Completed(outputs[0], meta)
        if status == "failed":
            return Failed(str(data.get("error") or "WaveSpeed reported the job failed without a reason."))
        if status == "cancelled":
            return Failed("The job was cancelled at WaveSpeed.", cancelled=True)
        if status == "timeout":
            return Failed("WaveSpeed stopped the job because it ran too long on their side.")
        raise self.protocol_error(f"an unknown job status {status!r}", request_id)

    async def status(self, handle: JobHandle) -> JobStatus:
        return self.parse_status(await self._read(handle), handle.request_id)
