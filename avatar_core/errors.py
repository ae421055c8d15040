"""One error tree for everything avatar_core raises.

Callers branch on the subclass; the message is written for the person using the app
(what happened, what to do). Every error carries the provider and the request id when
there is one, never an API key.
"""

from __future__ import annotations


class AvatarError(Exception):
    """Root of all avatar_core errors.

    ``message`` is shown to users as is, so it must say what to do next.
    ``retryable`` tells the job loop whether repeating the same *read* may succeed.
    """

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        request_id: str | None = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.request_id = request_id
        self.status_code = status_code

    def __str__(self) -> str:
        if self.request_id and self.request_id not in self.message:
            return f"{self.message} (request id: {self.request_id})"
        return self.message


class InputError(AvatarError):
    """The image, audio, prompt or URL the user gave cannot be used as it is."""


class ConfigError(AvatarError):
    """A setting is missing or wrong (no key for the chosen provider, bad URL)."""


class AuthError(AvatarError):
    """The provider refused the key (HTTP 401/403)."""


class CreditsError(AvatarError):
    """The account has no credits left (Segmind 406, Kling 1101/1102)."""


class RateLimited(AvatarError):
    """HTTP 429; ``retry_after`` is the provider's advice in seconds, when given."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kw) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class TransientError(AvatarError):
    """A 5xx, a timeout or a dropped connection on a read: trying again may work."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kw) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class NotSubmitted(TransientError):
    """The submit never reached the provider (connection refused): safe to try again."""


class ProtocolError(AvatarError):
    """The provider answered with something we do not understand (bad JSON, unknown status)."""


class SubmitUncertain(AvatarError):
    """The submit request was sent but no answer came back: a paid job may exist.

    Never retried automatically; the message tells the user where to look.
    """


class JobFailed(AvatarError):
    """The provider ran the job and reports it failed (including content blocks)."""


class JobCancelled(AvatarError):
    """The job was cancelled by the user or at the provider."""


class JobTimedOut(AvatarError):
    """Our overall deadline passed; the remote job is left running and can be resumed."""


class ResultExpired(AvatarError):
    """The provider no longer has the job or its video (results are kept for a limited time)."""


class ResultInvalid(AvatarError):
    """The result URL served something that is not a usable MP4 (HTML page, too large)."""
