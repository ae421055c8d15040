"""Where Kling AI Avatar runs: the provider registry.

``make_provider`` builds a client from settings (a user's own key wins over the
configured one); ``provider_choices`` says what the app can offer and whether a key is
there. Clients are imported lazily so a missing optional piece never breaks the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from ..config import Settings
from ..errors import ConfigError, InputError
from .base import PROVIDER_IDS, Provider, default_version, versions_for

LABELS = {
    "local": "Local preview (offline, free — not Kling output)",
    "wavespeed": "WaveSpeed",
    "segmind": "Segmind",
    "fal": "fal.ai",
    "replicate": "Replicate",
    "kling": "Kling API",
}
KEY_NAMES = {
    "wavespeed": "WAVESPEED_API_KEY",
    "segmind": "SEGMIND_API_KEY",
    "fal": "FAL_KEY",
    "replicate": "REPLICATE_API_TOKEN",
    "kling": "KLING_ACCESS_KEY and KLING_SECRET_KEY",
}


@dataclass(frozen=True)
class ProviderInfo:
    id: str
    label: str
    has_key: bool
    offline: bool
    versions: tuple[str, ...]
    available: bool = True  # the client is implemented in this version


def implemented() -> tuple[str, ...]:
    """Provider ids whose client module exists in this install."""
    import importlib.util

    return tuple(p for p in PROVIDER_IDS if importlib.util.find_spec(f"{__name__}.{p}") is not None)


def provider_choices(settings: Settings) -> list[ProviderInfo]:
    have = implemented()
    return [
        ProviderInfo(
            id=p,
            label=LABELS[p],
            has_key=settings.has_key(p),
            offline=p == "local",
            versions=tuple(versions_for(p)),
            available=p in have,
        )
        for p in PROVIDER_IDS
    ]


def default_provider(settings: Settings) -> str:
    """The first hosted provider with a key, else the offline preview."""
    for info in provider_choices(settings):
        if info.available and not info.offline and info.has_key:
            return info.id
    return "local"


def make_provider(
    name: str,
    settings: Settings,
    *,
    api_key: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Provider:
    """A client for ``name``. ``api_key`` (the user's own) wins and is kept in memory only."""
    if name not in PROVIDER_IDS:
        raise InputError(f"Unknown provider {name!r}. Choose one of: {', '.join(PROVIDER_IDS)}.")
    settings = settings.with_key(name, api_key)
    if not settings.has_key(name):
        raise ConfigError(
            f"No API key for {LABELS[name]}. Set {KEY_NAMES[name]} in the environment or .env, "
            "or enter your own key.",
            provider=name,
        )
    kw = {"transport": transport} if transport is not None else {}
    if name == "local":
        from .local import LocalProvider

        return LocalProvider(Path(settings.output_dir) / "work")
    if name == "wavespeed":
        from .wavespeed import WaveSpeedProvider

        return WaveSpeedProvider(settings.wavespeed_api_key.get(), settings.wavespeed_base_url, **kw)
    if name == "segmind":
        from .segmind import SegmindProvider

        return SegmindProvider(
            settings.segmind_api_key.get(), settings.segmind_base_url, settings.segmind_upload_url, **kw
        )
    if name not in implemented():
        raise ConfigError(f"{LABELS[name]} is not available in this version yet.", provider=name)
    import importlib

    module = importlib.import_module(f"{__name__}.{name}")
    return module.from_settings(settings, **kw)


__all__ = [
    "LABELS",
    "ProviderInfo",
    "default_provider",
    "default_version",
    "make_provider",
    "provider_choices",
]
