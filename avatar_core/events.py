"""The events a job yields, from upload to the finished file (see ``jobs.run_job``).

They are small frozen dataclasses so the app and the CLI can render them without ever
seeing provider JSON. ``elapsed`` is seconds since the job started (submit for resumed
jobs, upload for new ones).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Mapping


@dataclass(frozen=True)
class Uploading:
    what: str  # "image" or "audio"
    sent: int
    total: int
    elapsed: float = 0.0


@dataclass(frozen=True)
class Submitted:
    provider: str
    request_id: str
    model: str | None = None
    elapsed: float = 0.0


@dataclass(frozen=True)
class QueuedEvent:
    provider: str
    request_id: str
    position: int | None = None
    elapsed: float = 0.0
    estimate_s: float | None = None


@dataclass(frozen=True)
class ProcessingEvent:
    provider: str
    request_id: str
    elapsed: float = 0.0
    estimate_s: float | None = None  # typical total seconds for this provider and tier
    progress: float | None = None  # 0..1 when the provider reports it
    logs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Downloading:
    provider: str
    request_id: str
    received: int
    total: int | None = None
    elapsed: float = 0.0


@dataclass(frozen=True)
class Done:
    provider: str
    request_id: str
    path: Path
    duration_s: float | None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    elapsed: float = 0.0
    # The price of the video as it came back (its real length, media.pricing); None when the
    # length could not be read or the price is unknown. Providers bill the output's length.
    cost_usd: float | None = None
    # Something the user must be told about the bill (guard.Ticket.settle), else "".
    notice: str = ""
    # What the user should know about the result, shown with "done" ("" when nothing), e.g.
    # the Local preview found no face and animated the picture without a mouth.
    note: str = ""


@dataclass(frozen=True)
class FailedEvent:
    message: str  # says what happened and what to do; includes the request id when known
    provider: str
    request_id: str | None = None
    kind: str = "error"  # the error class name, e.g. "AuthError", "JobFailed", "SubmitUncertain"
    elapsed: float = 0.0


JobEvent = Uploading | Submitted | QueuedEvent | ProcessingEvent | Downloading | Done | FailedEvent
