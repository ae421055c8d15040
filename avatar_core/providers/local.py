"""The ``local`` provider: previews rendered on this machine by :mod:`avatar_core.render`.

No network and no cost: "upload" hands back a ``file://`` URL of the file itself, "submit"
queues :func:`~avatar_core.render.render_video` on a worker thread, and the finished video
is a ``file://`` URL in the provider's work folder (the job loop moves it to the output
folder). Renders are CPU-bound, so at most :data:`MAX_CONCURRENT_RENDERS` run at once;
the rest wait in order and report their place in the line.

Jobs live in this process only: after a restart a handle is unknown and ``status`` raises
ResultExpired (the preview is quick to make again).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from urllib.parse import urlparse
from urllib.request import url2pathname

from ..errors import AvatarError, InputError, JobCancelled, JobFailed, ResultExpired, TransientError
from ..render import RenderResult, render_video
from .base import Completed, Failed, JobHandle, JobStatus, ProgressFn, Processing, Queued, SubmitRequest, model_id

log = logging.getLogger(__name__)

# One render per core: each render keeps about two cores busy (OpenCV drawing plus x264's
# threads), so running more at once only makes every one of them slower, and a queue
# position tells the user more than a crawling progress bar.
MAX_CONCURRENT_RENDERS = max(1, os.cpu_count() or 1)
# An idle render thread exits after this long; the next submit starts a new one.
WORKER_IDLE_S = 30.0
RENDERER = "local-preview"
EXPIRED_MESSAGE = "Local previews are not kept across restarts; generate it again."
CANCELLED_MESSAGE = "The local preview was cancelled."

RenderFn = Callable[..., RenderResult]


@dataclass
class _Job:
    """One render's mutable state, shared between the worker thread and ``status``."""

    handle: JobHandle
    tier: str
    image: Path
    audio: Path
    out_path: Path
    cancel: threading.Event = field(default_factory=threading.Event)
    state: str = "queued"  # queued -> processing -> completed | failed
    progress: float = 0.0
    result: RenderResult | None = None
    error: str | None = None
    cancelled: bool = False
    queue: _RenderQueue | None = None  # where it waits, to tell its place in line
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards queued -> started/cancelled


class _RenderQueue:
    """Runs renders first-come first-served, at most ``limit`` at a time, and knows the
    place in line of every render still waiting.

    Workers are daemon threads that exit when idle, so quitting the app never waits for a
    render to finish (its partial file stays in the work folder, which is temporary).
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the render limit must be at least 1")
        self.limit = limit
        self._pending: deque[tuple[_Job, RenderFn]] = deque()
        self._workers = 0
        self._cv = threading.Condition()

    def submit(self, job: _Job, render: RenderFn) -> None:
        with self._cv:
            self._pending.append((job, render))
            if self._workers < self.limit:
                self._workers += 1
                threading.Thread(target=self._work, name="local-render", daemon=True).start()
            self._cv.notify()

    def position(self, request_id: str) -> int | None:
        """1 for the next render to start, 2 for the one after, ...; None if not waiting."""
        with self._cv:
            for place, (job, _render) in enumerate(self._pending, start=1):
                if job.handle.request_id == request_id:
                    return place
        return None

    def withdraw(self, request_id: str) -> None:
        with self._cv:
            self._pending = deque(item for item in self._pending if item[0].handle.request_id != request_id)

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._pending:
                    if not self._cv.wait(timeout=WORKER_IDLE_S) and not self._pending:
                        self._workers -= 1
                        return
                job, render = self._pending.popleft()
            self._run(job, render)

    def _run(self, job: _Job, render: RenderFn) -> None:
        with job.lock:
            if job.cancel.is_set():
                if job.state == "queued":
                    _finish_cancelled(job)
                return
            job.state = "processing"

        def on_progress(value: float) -> None:
            job.progress = value

        try:
            result = render(job.image, job.audio, job.out_path, tier=job.tier, progress=on_progress,
                            cancel=job.cancel)
        except JobCancelled:
            _finish_cancelled(job)
        except AvatarError as exc:
            job.error, job.state = exc.message, "failed"
        except Exception as exc:  # a bug or a broken install: say so rather than hang the job
            log.exception("local render %s crashed", job.handle.request_id)
            job.error = f"The local renderer failed unexpectedly ({type(exc).__name__}: {exc})."
            job.state = "failed"
        else:
            job.result, job.progress, job.state = result, 1.0, "completed"


def _finish_cancelled(job: _Job) -> None:
    job.out_path.unlink(missing_ok=True)
    job.cancelled, job.error, job.state = True, CANCELLED_MESSAGE, "failed"


# Jobs of this process, by request id, for every LocalProvider instance: the app may open a
# new provider per job, and a resumed job must still be found.
_JOBS: dict[str, _Job] = {}
_JOBS_LOCK = threading.Lock()
_SHARED_QUEUE: _RenderQueue | None = None


def _shared_queue() -> _RenderQueue:
    global _SHARED_QUEUE
    with _JOBS_LOCK:
        if _SHARED_QUEUE is None:
            _SHARED_QUEUE = _RenderQueue(MAX_CONCURRENT_RENDERS)
        return _SHARED_QUEUE


def _local_path(url: str, what: str) -> Path:
    """The file behind a ``file://`` URL or a plain path; InputError for anything remote."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = Path(url2pathname(parsed.path))
    elif not parsed.scheme or (len(parsed.scheme) == 1 and os.name == "nt"):  # a plain path (C:\... on Windows)
        path = Path(url)
    else:
        raise InputError(
            f"The local preview needs the {what} as a file on this computer, not a {parsed.scheme}: link. "
            "Download it first, or choose a hosted provider."
        )
    if not path.is_file():
        raise InputError(f"The {what} file {path.name!r} was not found. Choose the file again.")
    return path


class LocalProvider:
    """Kling-free previews rendered on this machine (see the module doc).

    ``work_dir`` receives the finished videos. ``max_concurrent`` gives this provider its own
    queue with that many render slots (tests use 1); by default all LocalProviders of the
    process share one queue of :data:`MAX_CONCURRENT_RENDERS` slots. ``render`` replaces
    :func:`render_video` (same signature), for tests.
    """

    name = "local"
    label = "Local preview"
    supports_cancel = True

    def __init__(self, work_dir: Path, *, max_concurrent: int | None = None, render: RenderFn = render_video) -> None:
        self.work_dir = Path(work_dir)
        self._render = render
        self._own_queue = _RenderQueue(max_concurrent) if max_concurrent is not None else None

    def __repr__(self) -> str:
        return f"<LocalProvider {self.work_dir}>"

    @property
    def _queue(self) -> _RenderQueue:
        return self._own_queue or _shared_queue()

    async def upload(self, path: Path, content_type: str, progress: ProgressFn | None = None) -> str:
        """Nothing to send: the ``file://`` URL of ``path`` itself (no copy is made)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"The file {path.name!r} was not found. Choose the file again.")
        size = path.stat().st_size
        if progress is not None:
            progress(size, size)
        return path.resolve().as_uri()

    async def submit(self, request: SubmitRequest) -> JobHandle:
        """Queue a render of ``request`` (standard: up to 720p, pro: up to 1080p). The model
        version is ignored: the preview looks the same for every version."""
        model = model_id(self.name, request.tier, "v1")
        image = _local_path(request.image_url, "image")
        audio = _local_path(request.audio_url, "audio")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        request_id = uuid.uuid4().hex
        handle = JobHandle(provider=self.name, request_id=request_id, model=model)
        job = _Job(handle=handle, tier=request.tier, image=image, audio=audio,
                   out_path=self.work_dir / f"local-{request_id}.mp4")
        with _JOBS_LOCK:
            _JOBS[request_id] = job
        job.queue = self._queue
        job.queue.submit(job, self._render)
        return handle

    async def status(self, handle: JobHandle) -> JobStatus:
        """Queued(place in line) / Processing(progress) / Completed(file URL) / Failed."""
        job = _find(handle)
        state = job.state
        if state == "queued":
            return Queued(position=job.queue.position(handle.request_id) if job.queue else None)
        if state == "processing":
            return Processing(progress=round(job.progress, 3))
        if state == "completed":
            return _completed(job)
        return Failed(message=job.error or "The local preview failed.", cancelled=job.cancelled)

    async def result(self, handle: JobHandle) -> Completed:
        """The finished preview; JobCancelled/JobFailed if it ended otherwise, TransientError
        while it is still rendering."""
        job = _find(handle)
        if job.state == "completed":
            return _completed(job)
        kw = dict(provider=self.name, request_id=handle.request_id)
        if job.state == "failed":
            raise (JobCancelled if job.cancelled else JobFailed)(job.error or "The local preview failed.", **kw)
        raise TransientError("The local preview is still rendering; ask again when it has finished.", **kw)

    async def cancel(self, handle: JobHandle) -> bool:
        """Stop the render (within a frame) or take it out of the queue; its partial file is
        deleted. False when it had already finished."""
        job = _find(handle)
        if job.state in ("completed", "failed"):
            return False
        job.cancel.set()
        with job.lock:
            if job.state == "queued":  # never started: leave the line now
                if job.queue is not None:
                    job.queue.withdraw(handle.request_id)
                _finish_cancelled(job)
        return True

    async def aclose(self) -> None:
        """Nothing to close. Renders still running keep going (like a hosted job after the
        client disconnects) and stay reachable through any LocalProvider of this process."""

    async def __aenter__(self) -> LocalProvider:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def _find(handle: JobHandle) -> _Job:
    with _JOBS_LOCK:
        job = _JOBS.get(handle.request_id)
    if job is None or handle.provider != LocalProvider.name:
        raise ResultExpired(EXPIRED_MESSAGE, provider=LocalProvider.name, request_id=handle.request_id)
    return job


def _completed(job: _Job) -> Completed:
    r = job.result
    assert r is not None
    return Completed(
        video_url=r.path.resolve().as_uri(),
        metadata={
            "width": r.width,
            "height": r.height,
            "fps": r.fps,
            "duration_s": round(r.duration_s, 3),
            "face_found": r.face_found,
            "note": r.note,
            "renderer": RENDERER,
        },
        note=r.note,
    )
