"""Kling's own API: https://api-singapore.klingai.com (see shared/PROVIDERS.md, "Kling").

Auth is a JWT (HS256) made here from the access key and secret key:
``{"iss": ACCESS_KEY, "exp": now + 1800, "nbf": now - 5}``, sent as ``Bearer <jwt>``,
reused until it is close to lapsing. ``POST /v1/videos/avatar/image2video`` submits
(``image`` and ``sound_file`` as URLs or raw base64, no ``data:`` prefix; ``mode``
``std`` | ``pro``), ``GET /v1/videos/avatar/image2video/{task_id}`` reads. Every answer
is the envelope ``{"code", "message", "request_id", "data"}``; ``code`` 0 is success.

Errors that matter: HTTP 401 with codes 1000-1004 (1004: the token expired, so we make a
fresh one and repeat once), HTTP 429 with 1100-1102 (1100 an account problem, 1101 arrears,
1102 resource pack used up: credits, not a rate limit to wait out). No cancel endpoint.
"""

from __future__ import annotations

import base64
import time
import warnings
from pathlib import Path
from typing import Any
from collections.abc import Callable

import httpx
import jwt
from jwt.warnings import InsecureKeyLengthWarning

from ..config import Settings
from ..errors import AuthError, AvatarError, CreditsError, ProtocolError, SubmitUncertain, TransientError
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
    error_text,
    model_id,
    parse_retry_after,
    read_inline,
    require,
)

PATH = "/v1/videos/avatar/image2video"
MODES = {"standard": "std", "pro": "pro"}

# Kling's documented token recipe: valid 30 minutes, and valid from 5 s ago so a server
# clock slightly behind ours still accepts it.
TOKEN_LIFETIME_S = 1800
TOKEN_NBF_SKEW_S = 5
# Make a new token when less than this remains, so none lapses between signing and a
# slow request arriving (reads are retried with up to 30 s of backoff).
TOKEN_REFRESH_MARGIN_S = 300

# Kling's inline limits: a base64 sound file up to 5 MB, an image up to 10 MB.
MAX_INLINE_AUDIO_BYTES = 5 * 1024 * 1024
MAX_INLINE_IMAGE_BYTES = 10 * 1024 * 1024

TOKEN_EXPIRED = 1004
AUTH_CODES = range(1000, 1005)
ACCOUNT_PROBLEM = 1100
CREDITS_CODES = (1101, 1102)


# The secret's length is Kling's choice, not the user's: PyJWT's advice to use 32 bytes or
# more would only fill the log of every job.
warnings.filterwarnings("ignore", category=InsecureKeyLengthWarning)


def make_jwt(access_key: str, secret_key: str, now: float) -> str:
    """Kling's API token: HS256 over ``{"iss", "exp", "nbf"}`` (PyJWT signs it)."""
    payload = {"iss": access_key, "exp": int(now) + TOKEN_LIFETIME_S, "nbf": int(now) - TOKEN_NBF_SKEW_S}
    return jwt.encode(payload, secret_key, algorithm="HS256", headers={"typ": "JWT"})


class KlingProvider(HttpProvider):
    """``clock`` is wall time in seconds (the JWT's ``exp``/``nbf``); injectable for tests."""

    name = "kling"
    label = "Kling API"
    supports_cancel = False  # the API documents no cancel

    def __init__(
        self,
        access_key: str,
        secret_key: str,
        base_url: str = "https://api-singapore.klingai.com",
        *,
        clock: Callable[[], float] = time.time,
        **kw,
    ) -> None:
        super().__init__(base_url, {}, **kw)
        self._access_key = access_key
        self._secret_key = secret_key
        self._clock = clock
        self._token: str | None = None
        self._token_exp = 0.0

    # -- auth -----------------------------------------------------------------------

    def token(self, *, fresh: bool = False) -> str:
        """The cached JWT, remade when ``fresh`` or when less than the margin remains."""
        now = self._clock()
        if fresh or self._token is None or self._token_exp - now < TOKEN_REFRESH_MARGIN_S:
            self._token = make_jwt(self._access_key, self._secret_key, now)
            self._token_exp = int(now) + TOKEN_LIFETIME_S
        return self._token

    def _auth(self, fresh: bool = False) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(fresh=fresh)}"}

    # -- the envelope and its codes ---------------------------------------------------

    def _code(self, body: Any) -> int | None:
        code = body.get("code") if isinstance(body, dict) else None
        return code if isinstance(code, int) else None

    def _error(self, response: httpx.Response, body: Any, request_id: str | None) -> AvatarError:
        """The error for a Kling answer whose envelope code is not 0."""
        code = self._code(body)
        message = error_text(response) if response.content else f"HTTP {response.status_code}"
        kw = dict(provider=self.name, request_id=request_id, status_code=response.status_code)
        if code in AUTH_CODES:
            return AuthError(
                f"Kling refused the access key / secret key (code {code}: {message}). Check that both keys "
                "are right and active.", **kw,
            )
        if code in CREDITS_CODES:
            what = "is in arrears" if code == 1101 else "has used up its resource pack"
            return CreditsError(f"The Kling account {what} (code {code}: {message}). Top up, then try again.", **kw)
        if code == ACCOUNT_PROBLEM:
            return AuthError(
                f"Kling reports a problem with the account (code {code}: {message}). Check it in the Kling "
                "console.", **kw,
            )
        detail = f"code {code}: {message}" if code is not None else message
        if response.status_code < 400:
            # HTTP 200 carrying an error code: not in Kling's table, so treated as a passing fault
            # (reads are retried; a submit turns this into SubmitUncertain).
            return TransientError(f"{self.label} reported a problem ({detail}).", **kw)
        error = error_for_status(
            response.status_code, detail, provider=self.name, label=self.label, request_id=request_id,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )
        assert error is not None
        return error

    def _data(self, response: httpx.Response, request_id: str | None = None) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:  # a proxy's error page: the HTTP status decides
                body = {}
        else:
            body = self.json(response, request_id)
        code = self._code(body)
        if response.status_code >= 400 or code != 0:
            if response.status_code < 400 and code is None:
                raise self.protocol_error("a reply without an envelope code", request_id)
            raise self._error(response, body, request_id)
        data = body.get("data")
        if not isinstance(data, dict):
            raise self.protocol_error("a reply without 'data'", request_id)
        return data

    @staticmethod
    def _token_expired(response: httpx.Response) -> bool:
        if response.status_code != 401:
            return False
        try:
            return response.json().get("code") == TOKEN_EXPIRED
        except (ValueError, AttributeError):
            return False

    # -- files ----------------------------------------------------------------------

    async def upload(self, path: Path, content_type: str, progress: ProgressFn | None = None) -> str:
        """No upload call: Kling takes the file inline as raw base64 (within its limits)."""
        if content_type.startswith("image/"):
            limit, what, hint = MAX_INLINE_IMAGE_BYTES, "image", "Use a URL for the image, or a smaller picture."
        else:
            limit, what, hint = MAX_INLINE_AUDIO_BYTES, "audio", "Use a URL for the audio, or a shorter clip."
        raw = read_inline(path, limit, what=what, provider=self, hint=hint)
        if progress:
            progress(len(raw), len(raw))
        return base64.b64encode(raw).decode("ascii")

    # -- jobs -----------------------------------------------------------------------

    async def submit(self, request: SubmitRequest) -> JobHandle:
        model = model_id(self.name, request.tier, request.version)
        body: dict[str, Any] = {
            "image": request.image_url,
            "sound_file": request.audio_url,
            "mode": MODES[request.tier],
        }
        if request.prompt:
            body["prompt"] = request.prompt
        passthrough = (400, 401, 403, 404, 429)
        response = await self.submit_request("POST", PATH, json=body, headers=self._auth(), passthrough=passthrough)
        if self._token_expired(response):
            # A 401 is a refusal before any work: no task exists, so one resend is safe.
            response = await self.submit_request(
                "POST", PATH, json=body, headers=self._auth(fresh=True), passthrough=passthrough
            )
        try:
            task_id = require(self._data(response), "task_id", self)
        except (TransientError, ProtocolError) as exc:
            if response.status_code >= 400:
                raise
            # HTTP 2xx without a task id (an envelope error code, a garbled body): the task may
            # exist, so this is no refusal and must not be sent again.
            raise SubmitUncertain(
                f"{self.label} answered the submit without a task id ({exc.message}). A job may or may not "
                f"have been created: check your {self.label} console before submitting again.",
                provider=self.name, status_code=response.status_code,
            ) from exc
        return JobHandle(self.name, str(task_id), model)

    async def _read(self, handle: JobHandle) -> dict[str, Any]:
        url = f"{PATH}/{handle.request_id}"
        rid = handle.request_id
        passthrough = (400, 401, 403, 429)
        response = await self.request("GET", url, headers=self._auth(), request_id=rid, passthrough=passthrough)
        if self._token_expired(response):
            response = await self.request(
                "GET", url, headers=self._auth(fresh=True), request_id=rid, passthrough=passthrough
            )
        return self._data(response, rid)

    def parse_status(self, data: dict[str, Any], request_id: str) -> JobStatus:
        """The one place Kling's task statuses are read."""
        status = data.get("task_status")
        if status == "submitted":
            return Queued()
        if status == "processing":
            msg = data.get("task_status_msg")
            return Processing(logs=(str(msg),) if msg else ())
        if status == "succeed":
            videos = (data.get("task_result") or {}).get("videos") or []
            video = videos[0] if videos and isinstance(videos[0], dict) else {}
            url = video.get("url")
            if not isinstance(url, str) or not url:
                raise self.protocol_error("a finished task without a video URL", request_id)
            meta = {
                "video_id": video.get("id"),
                "duration": video.get("duration"),
                "created_at": data.get("created_at"),
                "updated_at": data.get("updated_at"),
            }
            return Completed(url, {k: v for k, v in meta.items() if v is not None})
        if status == "failed":
            return Failed(str(data.get("task_status_msg") or "Kling reported the task failed without a reason."))
        raise self.protocol_error(f"an unknown task status {status!r}", request_id)

    async def status(self, handle: JobHandle) -> JobStatus:
        return self.parse_status(await self._read(handle), handle.request_id)


def from_settings(settings: Settings, **kw) -> KlingProvider:
    """The client ``make_provider("kling", ...)`` builds (KLING_ACCESS_KEY, KLING_SECRET_KEY, KLING_BASE_URL)."""
    return KlingProvider(
        settings.kling_access_key.get(), settings.kling_secret_key.get(), settings.kling_base_url, **kw
    )
