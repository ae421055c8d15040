"""Settings from the environment and an optional ``.env`` file, in one place.

Keys are wrapped in :class:`Secret` so that printing a ``Settings`` (or an exception
that holds one) never shows them. A key passed in explicitly, as the app does for a
user's own key, always wins over the environment and is never stored anywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from dotenv import dotenv_values

# A pro job averages about 12 minutes (Segmind's published figure) and queues can add
# more; one hour leaves room for a slow day without waiting forever on a lost job.
DEFAULT_DEADLINE_S = 3600.0
# Standard output is about 720p, pro about 1080p; five minutes of 1080p H.264 stays well
# under this. Anything larger is not a video we asked for.
DEFAULT_MAX_VIDEO_BYTES = 500 * 1024 * 1024


class Secret:
    """A string that does not show itself in ``repr``/``str``/logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __repr__(self) -> str:
        return "Secret('****')" if self._value else "Secret('')"

    __str__ = __repr__

    def __reduce__(self):  # never pickled (Gradio state, multiprocessing)
        raise TypeError("Secret values cannot be pickled")


# env name -> (Settings field, default). Keys have no default.
_KEYS = {
    "WAVESPEED_API_KEY": "wavespeed_api_key",
    "SEGMIND_API_KEY": "segmind_api_key",
    "FAL_KEY": "fal_key",
    "REPLICATE_API_TOKEN": "replicate_api_token",
    "KLING_ACCESS_KEY": "kling_access_key",
    "KLING_SECRET_KEY": "kling_secret_key",
}
_URLS = {
    "WAVESPEED_BASE_URL": ("wavespeed_base_url", "https://api.wavespeed.ai"),
    "SEGMIND_BASE_URL": ("segmind_base_url", "https://api.segmind.com"),
    "SEGMIND_UPLOAD_URL": ("segmind_upload_url", "https://workflows-api.segmind.com/upload-asset"),
    "FAL_BASE_URL": ("fal_base_url", "https://queue.fal.run"),
    "REPLICATE_BASE_URL": ("replicate_base_url", "https://api.replicate.com"),
    "KLING_BASE_URL": ("kling_base_url", "https://api-singapore.klingai.com"),
}

# Which key settings each provider needs (all of them must be set).
PROVIDER_KEYS: Mapping[str, tuple[str, ...]] = {
    "wavespeed": ("wavespeed_api_key",),
    "segmind": ("segmind_api_key",),
    "fal": ("fal_key",),
    "replicate": ("replicate_api_token",),
    "kling": ("kling_access_key", "kling_secret_key"),
    "local": (),
}


@dataclass(frozen=True)
class Settings:
    """Everything configurable. Build with :func:`load_settings`."""

    wavespeed_api_key: Secret = field(default_factory=lambda: Secret(""))
    segmind_api_key: Secret = field(default_factory=lambda: Secret(""))
    fal_key: Secret = field(default_factory=lambda: Secret(""))
    replicate_api_token: Secret = field(default_factory=lambda: Secret(""))
    kling_access_key: Secret = field(default_factory=lambda: Secret(""))
    kling_secret_key: Secret = field(default_factory=lambda: Secret(""))
    wavespeed_base_url: str = _URLS["WAVESPEED_BASE_URL"][1]
    segmind_base_url: str = _URLS["SEGMIND_BASE_URL"][1]
    segmind_upload_url: str = _URLS["SEGMIND_UPLOAD_URL"][1]
    fal_base_url: str = _URLS["FAL_BASE_URL"][1]
    replicate_base_url: str = _URLS["REPLICATE_BASE_URL"][1]
    kling_base_url: str = _URLS["KLING_BASE_URL"][1]
    output_dir: Path = Path("outputs")
    deadline_s: float = DEFAULT_DEADLINE_S
    max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES
    # Fetching user-given URLs from private/loopback addresses is an SSRF hole on a
    # public deployment; only a trusted local setup should switch this on.
    allow_private_urls: bool = False
    db_path: Path | None = None
    # How long a job usually takes, in seconds, for the polling plan. Empty means the
    # published averages (then what our own store has seen). Emulator runs set it low.
    poll_typical_s: float | None = None

    def has_key(self, provider: str) -> bool:
        """True when every key the provider needs is configured."""
        names = PROVIDER_KEYS.get(provider)
        if names is None:
            return False
        return all(bool(getattr(self, n)) for n in names)

    def with_key(self, provider: str, api_key: str | None) -> "Settings":
        """A copy where the user's own key replaces the configured one.

        For Kling, ``api_key`` is ``"ACCESS_KEY:SECRET_KEY"``.
        """
        if not api_key:
            return self
        names = PROVIDER_KEYS.get(provider, ())
        if not names:
            return self
        if len(names) == 2:
            access, sep, secret = api_key.partition(":")
            if not sep:
                from .errors import ConfigError

                raise ConfigError(
                    "Kling needs both keys: enter them as ACCESS_KEY:SECRET_KEY.", provider=provider
                )
            return replace(self, **{names[0]: Secret(access.strip()), names[1]: Secret(secret.strip())})
        return replace(self, **{names[0]: Secret(api_key.strip())})

    @property
    def store_path(self) -> Path:
        return self.db_path or (self.output_dir / "jobs.sqlite3")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def load_settings(env: Mapping[str, str] | None = None, dotenv_path: str | os.PathLike | None = ".env") -> Settings:
    """Read settings: ``env`` (default ``os.environ``) wins over the ``.env`` file."""
    merged: dict[str, str] = {}
    if dotenv_path and Path(dotenv_path).is_file():
        merged.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    merged.update(os.environ if env is None else env)

    kwargs: dict = {}
    for env_name, attr in _KEYS.items():
        kwargs[attr] = Secret((merged.get(env_name) or "").strip())
    for env_name, (attr, default) in _URLS.items():
        kwargs[attr] = (merged.get(env_name) or default).strip().rstrip("/")
    if merged.get("AVATAR_OUTPUT_DIR"):
        kwargs["output_dir"] = Path(merged["AVATAR_OUTPUT_DIR"]).expanduser()
    if merged.get("AVATAR_DB_PATH"):
        kwargs["db_path"] = Path(merged["AVATAR_DB_PATH"]).expanduser()
    if merged.get("AVATAR_DEADLINE_S"):
        kwargs["deadline_s"] = float(merged["AVATAR_DEADLINE_S"])
    if merged.get("AVATAR_MAX_VIDEO_MB"):
        kwargs["max_video_bytes"] = int(float(merged["AVATAR_MAX_VIDEO_MB"]) * 1024 * 1024)
    if merged.get("AVATAR_POLL_TYPICAL_S"):
        kwargs["poll_typical_s"] = float(merged["AVATAR_POLL_TYPICAL_S"])
    kwargs["allow_private_urls"] = _truthy(merged.get("AVATAR_ALLOW_PRIVATE_URLS"))
    return Settings(**kwargs)
