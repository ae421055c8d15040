"""Replicate: https://api.replicate.com (see shared/PROVIDERS.md, "Replicate").

Bearer auth; one model, ``kwaivgi/kling-avatar-v2`` (v2 only), whose tier travels as the
input ``mode`` (``std`` | ``pro``). ``POST /v1/models/{owner}/{name}/predictions`` with
``{"input": {...}}``, ``GET /v1/predictions/{id}``, ``POST /v1/predictions/{id}/cancel``.
Local files go up through ``POST /v1/files`` (multipart field ``content``) and are
passed as the file's ``urls.get``; data URIs work too. Errors are RFC 7807 problem
bodies (``title``, ``detail``, ``status``). Inputs and outputs are deleted one hour
after the prediction was created.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import httpx

from ..config import Settings
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
    data_uri,
    error_text,
    model_id,
    read_inline,
    require,
)

MODES = {"standard": "std", "pro": "pro"}

# How many trailing log lines a Processing status carries: enough to show what the model
# is doing, little enough to fit a status line.
LOG_TAIL_LINES = 3

# With file_encoding="data_uri" the file rides inside the JSON: keep it to the strictest
# published input size (PROVIDERS.md "Input limits": images 10 MB).
MAX_INLINE_BYTES = 10 * 1024 * 1024

FileEncoding = Literal["url", "data_uri"]


class ReplicateProvider(HttpProvider):
    """``file_encoding``: ``"url"`` uploads local files to ``/v1/files`` (the default, as
    replicate-python does); ``"data_uri"`` sends them inline instead."""

    name = "replicate"
    label = "Replicate"
    supports_cancel = True  # POST /v1/predictions/{id}/cancel
    dashboard = "the Predictions list of your Replicate dashboard (replicate.com/predictions)"

    def __init__(
        self, api_token: str, base_url: str = "https://api.replicate.com", *, file_encoding: FileEncoding = "url", **kw
    ) -> None:
        super().__init__(base_url, {"Authorization": f"Bearer {api_token}"}, **kw)
        self.file_encoding = file_encoding

    def error_detail(self, response: httpx.Response) -> str:
        """An RFC 7807 problem body as ``title: detail`` (the title alone when both say the same)."""
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            title, detail = body.get("title"), body.get("detail")
            if isinstance(title, str) and isinstance(detail, str) and title.strip() and detail.strip():
                title, detail = title.strip(), detail.strip()
                return (title if title == detail else f"{title}: {detail}")[:300]
        return error_text(response)

    # -- files ----------------------------------------------------------------------

    async def upload(self, path: Path, content_type: str, progress: ProgressFn | None = None) -> str:
        path = Path(path)
        size = path.stat().st_size
        if self.file_encoding == "data_uri":
            raw = read_inline(path, MAX_INLINE_BYTES, what=content_type.split("/")[0], provider=self,
                              hint="Use a public URL for it, or a smaller file.")
            if progress:
                progress(size, size)
            return data_uri(content_type, raw)
        if progress:
            progress(0, size)
        with path.open("rb") as fh:
            response = await self.request("POST", "/v1/files", files={"content": (path.name, fh, content_type)})
        body = self.json(response)
        url = require(require(body, "urls", self), "get", self)
        if progress:
            progress(size, size)
        return str(url)

    # -- jobs -----------------------------------------------------------------------

    async def submit(self, request: SubmitRequest) -> JobHandle:
        model = model_id(self.name, request.tier, request.version)
        inputs: dict[str, Any] = {"image": request.image_url, "audio": request.audio_url, "mode": MODES[request.tier]}
        if request.prompt:
            inputs["prompt"] = request.prompt
        response = await self.submit_request("POST", f"/v1/models/{model}/predictions", json={"input": inputs})
        return self.submit_reply(
            response, lambda r: JobHandle(self.name, str(require(self.json(r), "id", self)), model)
        )

    def parse_status(self, body: Any, request_id: str) -> JobStatus:
        """The one place Replicate's prediction statuses are read."""
        if not isinstance(body, dict):
            raise self.protocol_error("a prediction that is not a JSON object", request_id)
        status = body.get("status")
        if status == "starting":
            return Queued()
        if status == "processing":
            lines = [line for line in str(body.get("logs") or "").splitlines() if line.strip()]
            return Processing(logs=tuple(lines[-LOG_TAIL_LINES:]))
        if status == "succeeded":
            output = body.get("output")
            if isinstance(output, list) and output:
                output = output[0]
            if not isinstance(output, str) or not output:
                raise self.protocol_error("a finished prediction without an output video", request_id)
            meta = {
                "metrics": body.get("metrics") or {},
                "created_at": body.get("created_at"),
                "completed_at": body.get("completed_at"),
            }
            return Completed(output, meta)
        if status == "failed":
            return Failed(str(body.get("error") or "Replicate reported the prediction failed without a reason."))
        if status == "canceled":
            return Failed("The prediction was cancelled at Replicate.", cancelled=True)
        raise self.protocol_error(f"an unknown prediction status {status!r}", request_id)

    async def status(self, handle: JobHandle) -> JobStatus:
        response = await self.request("GET", f"/v1/predictions/{handle.request_id}", request_id=handle.request_id)
        return self.parse_status(self.json(response, handle.request_id), handle.request_id)

    async def cancel(self, handle: JobHandle) -> bool:
        response = await self.request(
            "POST", f"/v1/predictions/{handle.request_id}/cancel", request_id=handle.request_id
        )
        body = self.json(response, handle.request_id)
        return isinstance(body, dict) and body.get("status") == "canceled"


def from_settings(settings: Settings, **kw) -> ReplicateProvider:
    """The client ``make_provider("replicate", ...)`` builds (REPLICATE_API_TOKEN, REPLICATE_BASE_URL)."""
    return ReplicateProvider(settings.replicate_api_token.get(), settings.replicate_base_url, **kw)
