"""Settings from the environment and an optional ``.env`` file, in one place.

Keys are wrapped in :class:`Secret` so that printing a ``Settings`` (or an exception
that holds one) never shows them. A key passed in explicitly, as the app does for a
user's own key, always wins over the environment and is never stored anywhere.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Mapping, Sequence

from dotenv import dotenv_values

# A pro job averages about 12 minutes (Segmind's published figure) and queues can add
# more; one hour leaves room for a slow day without waiting forever on a lost job.
DEFAULT_DEADLINE_S = 3600.0
# Standard output is about 720p, pro about 1080p; five minutes of 1080p H.264 stays well
# under this. Anything larger is not a video we asked for.
DEFAULT_MAX_VIDEO_BYTES = 500 * 1024 * 1024
# A month of videos, and at most about 5 GB of them: room for a few hundred pro videos
# on a laptop or a Space's persistent disk, without filling either.
DEFAULT_RETENTION_DAYS = 30
DEFAULT_RETENTION_MAX_MB = 5000
# Checked inputs, link downloads and unfinished renders (outputs/inputs + outputs/work),
# and separately Gradio's upload cache: each at most this many MB, oldest first. A 300 s
# stereo WAV is about 58 MB, so this is a few dozen checks' worth, well past what the
# jobs of the last minutes need.
DEFAULT_INPUTS_MAX_MB = 2000
# Per-visitor limits on a shared deployment (see guard.py). Two at once lets someone
# compare providers side by side; twenty a day is a long working session, while a
# script hammering the server's keys stops there.
DEFAULT_MAX_CONCURRENT_PER_VISITOR = 2
DEFAULT_MAX_DAILY_JOBS_PER_VISITOR = 20
# What the server's own keys may spend per UTC day, all visitors together: about forty
# standard WaveSpeed videos. An owner who wants more says so explicitly.
DEFAULT_DAILY_SPEND_CAP_USD = 20.0


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


# Credentials derived from a key that a provider may echo back ("...Authorization: Bearer
# eyJ..."): a JWT (Kling's token names the access key in its payload and is signed with
# the secret), and the value of any Authorization / x-api-key header or Bearer token.
# Also a JWT cut short (error texts are truncated): base64 JSON always starts "eyJ".
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{8,}(?:\.[A-Za-z0-9_-]*){0,2}")
_AUTH_HEADER = re.compile(
    r"(?i)\b(authorization|x-api-key|api[-_]?key)([\"']?\s*[:=]\s*[\"']?)((?:bearer|key|token|basic)\s+)?[^\s\"',;}]+"
)
_BEARER = re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]{6,}")


def redact(text: str, secrets: Sequence[str | None]) -> str:
    """``text`` with every secret (4+ characters) replaced by ****, longest first, and
    anything shaped like a derived credential (a JWT, an Authorization header's value,
    a Bearer token) as well."""
    for secret in sorted((x for x in secrets if x and len(x) >= 4), key=len, reverse=True):
        text = text.replace(secret, "****")
    text = _JWT.sub("****", text)
    text = _AUTH_HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{m.group(3) or ''}****", text)
    return _BEARER.sub(lambda m: f"{m.group(1)} ****", text)


def key_problem(key: str) -> str | None:
    """Why a typed API key cannot be sent, or None when it can.

    A key travels in an HTTP header, so it may hold printable ASCII only; a pasted key
    with a Cyrillic look-alike, a zero-width space (``strip()`` keeps it) or a line
    break would fail inside the HTTP library, or, worse, after part of a request left.
    The message names the position, never the key or the character.
    """
    for position, ch in enumerate(key, start=1):
        if not ("!" <= ch <= "~"):
            return (f"The key you typed contains a character that cannot be part of an API key "
                    f"(position {position}); paste it again.")
    return None


def key_values(settings: Settings) -> list[str]:
    """Every configured key, for redaction; a key made of two parts (fal.ai's ``id:secret``,
    a user's Kling ``ACCESS:SECRET``) also by each part, so an echo of either half is caught."""
    out: list[str] = []
    for names in PROVIDER_KEYS.values():
        for name in names:
            value = getattr(settings, name).get()
            if value:
                out.append(value)
                if ":" in value:
                    out += [part.strip() for part in value.split(":") if part.strip()]
    # Login passwords (AVATAR_AUTH) are secrets too.
    out += [password for _user, password in parse_auth(settings.auth.get())]
    return out


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
    # Whether visitors who are not signed in may run jobs on the server's keys. None =
    # automatic: only when the app is bound to a loopback address (guard.server_keys_allowed).
    allow_anonymous_server_keys: bool | None = None
    # Gradio login, "user:password" pairs one per line (see guard.auth_credentials).
    # A Secret so that printing the settings never shows a password. Empty = no login.
    auth: Secret = field(default_factory=lambda: Secret(""))
    # None = no limit (the env value "unlimited").
    max_concurrent_per_visitor: int | None = DEFAULT_MAX_CONCURRENT_PER_VISITOR
    max_daily_jobs_per_visitor: int | None = DEFAULT_MAX_DAILY_JOBS_PER_VISITOR
    # Estimated USD the server's keys may spend per UTC day; 0 = they never pay for a
    # job, None = no cap. Jobs paid with a visitor's own key do not count.
    daily_spend_cap_usd: float | None = DEFAULT_DAILY_SPEND_CAP_USD
    # Finished videos are deleted after this many days, oldest first once the output
    # folder passes this size; the rows stay. None = keep forever. Never a running job's.
    retention_days: int | None = DEFAULT_RETENTION_DAYS
    retention_max_mb: int | None = DEFAULT_RETENTION_MAX_MB
    # outputs/inputs + outputs/work, and Gradio's upload cache: each at most this many MB
    # (oldest first; never a file in use or changed in the last minutes). None = no cap.
    inputs_max_mb: int | None = DEFAULT_INPUTS_MAX_MB

    def has_key(self, provider: str) -> bool:
        """True when every key the provider needs is configured."""
        names = PROVIDER_KEYS.get(provider)
        if names is None:
            return False
        return all(bool(getattr(self, n)) for n in names)

    def with_key(self, provider: str, api_key: str | None) -> Settings:
        """A copy where the user's own key replaces the configured one.

        For Kling, ``api_key`` is ``"ACCESS_KEY:SECRET_KEY"``.
        """
        if not api_key:
            return self
        names = PROVIDER_KEYS.get(provider, ())
        if not names:
            return self
        problem = key_problem(api_key.strip().replace(":", "", 1) if len(names) == 2 else api_key.strip())
        if problem:
            from .errors import ConfigError

            raise ConfigError(problem, provider=provider)
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
    kwargs["allow_anonymous_server_keys"] = _tristate(merged, "AVATAR_ALLOW_ANONYMOUS_SERVER_KEYS")
    auth_text = merged.get("AVATAR_AUTH") or ""
    # Stored one pair per line with a final newline, so parse_auth reads it back by lines
    # even when it is a single pair whose password holds a comma.
    kwargs["auth"] = Secret("".join(f"{u}:{p}\n" for u, p in parse_auth(auth_text)))
    kwargs["max_concurrent_per_visitor"] = _limit(
        merged, "AVATAR_MAX_CONCURRENT_PER_VISITOR", DEFAULT_MAX_CONCURRENT_PER_VISITOR
    )
    kwargs["max_daily_jobs_per_visitor"] = _limit(
        merged, "AVATAR_MAX_DAILY_JOBS_PER_VISITOR", DEFAULT_MAX_DAILY_JOBS_PER_VISITOR
    )
    kwargs["daily_spend_cap_usd"] = _spend_cap(merged, "AVATAR_DAILY_SPEND_CAP_USD")
    kwargs["retention_days"] = _limit(merged, "AVATAR_RETENTION_DAYS", DEFAULT_RETENTION_DAYS)
    kwargs["retention_max_mb"] = _limit(merged, "AVATAR_RETENTION_MAX_MB", DEFAULT_RETENTION_MAX_MB)
    kwargs["inputs_max_mb"] = _limit(merged, "AVATAR_INPUTS_MAX_MB", DEFAULT_INPUTS_MAX_MB)
    return Settings(**kwargs)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_UNLIMITED = {"unlimited", "none"}


def _config_error(message: str):
    from .errors import ConfigError

    return ConfigError(message)


def _tristate(merged: Mapping[str, str], name: str) -> bool | None:
    """true/false, or None for unset, empty or "auto"."""
    text = (merged.get(name) or "").strip().lower()
    if text in {"", "auto"}:
        return None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _config_error(f"{name} must be true, false or auto (or unset for auto), not {text!r}.")


def _limit(merged: Mapping[str, str], name: str, default: int) -> int | None:
    """A whole number of at least 1, or None for "unlimited"; unset or empty = default."""
    text = (merged.get(name) or "").strip().lower()
    if not text:
        return default
    if text in _UNLIMITED:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise _config_error(f"{name} must be a whole number of at least 1, or 'unlimited', not {text!r}.")
    return value


def _spend_cap(merged: Mapping[str, str], name: str) -> float | None:
    """US dollars >= 0 (0 = the server's keys never pay), None for "unlimited"."""
    text = (merged.get(name) or "").strip().lower().lstrip("$")
    if not text:
        return DEFAULT_DAILY_SPEND_CAP_USD
    if text in _UNLIMITED:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value >= 0 and value != float("inf")):
        raise _config_error(
            f"{name} must be an amount of US dollars such as 20 or 5.50 (0 = the server's keys never pay, "
            f"'unlimited' = no cap), not {text!r}."
        )
    return value


def parse_auth(text: str) -> list[tuple[str, str]]:
    """``AVATAR_AUTH`` as (user, password) pairs, in order.

    Pairs are ``user:password``, one per line; when the value has no line break they
    may be separated by commas instead (so a password may contain a comma only in the
    one-per-line form). The user name ends at the first colon, so passwords may contain
    colons. Errors name the variable and the entry's position, never the password.
    """
    lines = text.splitlines() if ("\n" in text or "\r" in text) else text.split(",")
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for number, raw in enumerate(lines, start=1):
        entry = raw.strip()
        if not entry:
            continue
        user, sep, password = entry.partition(":")
        user = user.strip()
        if not sep or not user or not password:
            raise _config_error(
                f"AVATAR_AUTH entry {number} must look like user:password (both parts non-empty)."
            )
        if user in seen:
            raise _config_error(f"AVATAR_AUTH lists the user {user!r} twice; keep one password per user.")
        seen.add(user)
        pairs.append((user, password))
    return pairs
