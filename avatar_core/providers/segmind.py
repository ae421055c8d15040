"""Segmind: https://api.segmind.com (see shared/PROVIDERS.md, "Segmind").

``x-api-key`` auth, the v2 async queue, and one quirk that matters: a FAILED job is
served as HTTP 422 on both GETs, which is an answer about the job, not a transport error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from ..errors import JobFailed
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
    data_uri_json_body,
    model_id,
    require,
)

FAILED_HTTP_STATUS = 422


class SegmindProvider(HttpProvider):
    name = "segmind"
    label = "Segmind"
    supports_cancel = False  # the v2 queue API documents no cancel
    dashboard = "the request logs of your Segmind console (segmind.com)"

    def __init__(
        self,
        api_key: str,
        base_url: str = "https://api.segmind.com",
        upload_url: str = "https://workflows-api.segmind.com/upload-asset",
        **kw,
    ) -> None:
        super().__init__(base_url, {"x-api-key": api_key}, **kw)
        self.upload_url = upload_url

    async def upload(self, path: Path, content_type: str, progress: ProgressFn | None = None) -> str:
        path = Path(path)
        if progress:
            progress(0, path.stat().st_size)
        # {"data_urls": ["data:<mime>;base64,..."]}, base64-encoded piece by piece as it is sent.
        body = data_uri_json_body(path, content_type, lambda uri: {"data_urls": [uri]}, progress)
        response = await self.request("POST", self.upload_url, content=body, headers=body.headers)
        reply = self.json(response)
        urls = require(reply, "file_urls", self)
        if not isinstance(urls, list) or not urls or not isinstance(urls[0], str):
            raise self.protocol_error("an upload reply without a file URL")
        return urls[0]

    async def submit(self, request: SubmitRequest) -> JobHandle:
        slug = model_id(self.name, request.tier, request.version)
        body: dict[str, Any] = {"image_url": request.image_url, "audio_url": request.audio_url}
        if request.prompt:
            body["prompt"] = request.prompt
        response = await self.submit_request("POST", f"/v2/{slug}", json=body)
        return self.submit_reply(
            response, lambda r: JobHandle(self.name, str(require(self.json(r), "request_id", self)), slug)
        )

    def parse_status(self, response: httpx.Response, request_id: str) -> JobStatus:
        """The one place Segmind's status values are read (422 means FAILED)."""
        body = self.json(response, request_id)
        if not isinstance(body, dict):
            raise self.protocol_error("a status reply that is not a JSON object", request_id)
        status = body.get("status")
        if response.status_code == FAILED_HTTP_STATUS or status == "FAILED":
            message = body.get("error") or "Segmind reported the job failed without a reason."
            return Failed(str(message))
        if status == "QUEUED":
            return Queued()
        if status == "PROCESSING":
            return Processing()
        if status == "COMPLETED":
            output = body.get("output")
            meta = {"metrics": body.get("metrics") or {}}
            return Completed(output if isinstance(output, str) else "", meta)
        raise self.protocol_error(f"an unknown job status {status!r}", request_id)

    async def status(self, handle: JobHandle) -> JobStatus:
        response = await self.request(
            "GET",
            f"/v2/requests/{handle.request_id}/status",
            request_id=handle.request_id,
            passthrough=(FAILED_HTTP_STATUS,),
        )
        return self.parse_status(response, handle.request_id)

    async def result(self, handle: JobHandle) -> Completed:
        response = await self.request(
            "GET", f"/v2/requests/{handle.request_id}", request_id=handle.request_id, passthrough=(FAILED_HTTP_STATUS,)
        )
        status = self.parse_status(response, handle.request_id)
        if isinstance(status, Failed):
            raise JobFailed(status.message, provider=self.name, request_id=handle.request_id)
        if not isinstance(status, Completed) or not status.video_url:
            raise self.protocol_error("a result without an output video", handle.request_id)
        return status
