"""Loopback emulators of the hosted providers' HTTP protocols (see shared/PROVIDERS.md).

One server (:class:`Emulator`) serves every protocol module at once; tests point a
provider's base URL at ``emu.url``, script faults and job outcomes, and assert on the
requests it recorded::

    with Emulator(queue_s=0.1, processing_s=0.2, video_maker=tone_video_maker) as emu:
        emu.faults.add(Fault("status", r"/result$", count=2, status=503))
        ...
        assert emu.requests_to("POST", r"^/api/v3/kwaivgi/")[0].json["image"]
        job, = emu.jobs.values()
        job.received["image"].data   # the bytes the model got, however they travelled
"""

from .server import (
    COMPLETED,
    EXPIRED,
    FAILED,
    PROCESSING,
    QUEUED,
    Emulator,
    Fault,
    FaultList,
    FormPart,
    Job,
    JobPlan,
    Protocol,
    ReceivedInput,
    RecordedRequest,
    Response,
    main_serve,
    serve,
)
from .testing import FakeClock
from .video import default_video_maker, render_video_maker, tone_video_maker

__all__ = [
    "COMPLETED",
    "EXPIRED",
    "FAILED",
    "PROCESSING",
    "QUEUED",
    "Emulator",
    "FakeClock",
    "Fault",
    "FaultList",
    "FormPart",
    "Job",
    "JobPlan",
    "Protocol",
    "ReceivedInput",
    "RecordedRequest",
    "Response",
    "default_video_maker",
    "main_serve",
    "render_video_maker",
    "serve",
    "tone_video_maker",
]
