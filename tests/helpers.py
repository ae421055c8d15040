"""Small helpers many tests (and the benchmarks) share: collecting job events, checking an
MP4, a free port, stopping a child process."""

from __future__ import annotations

import socket
import subprocess

from tests.mp4check import check_mp4, inspect_mp4  # noqa: F401 (shared with every test)


async def collect(gen) -> list:
    """Every event an async generator yields, in order."""
    return [e async for e in gen]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(gen, kind: type):
    """Consume job events up to the first of type ``kind`` and return it (the job goes on)."""
    async for event in gen:
        if isinstance(event, kind):
            return event
    raise AssertionError(f"the job ended without a {kind.__name__} event")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Ask a child process to end (SIGTERM); kill it if it has not within ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def run_through_read_faults(emu, provider: str, settings, inputs, faults, *, poll: str, submit: str) -> list:
    """Run a job while ``faults`` hit its status reads (the first a 429 with Retry-After: 1).

    Checks what every provider must do: the job still ends with its video, the paid submit
    went out exactly once, and the read after the 429 waited the second it was told.
    Returns the status reads (GETs matching ``poll``) for provider-specific checks.
    """
    from avatar_core import jobs
    from avatar_core.events import Done

    emu.faults.add(*faults)
    image, audio = inputs
    events = await collect(jobs.run_job(provider, image, audio, settings=settings))
    assert isinstance(events[-1], Done), events[-1]
    assert len(emu.requests_to("POST", submit)) == 1
    polls = emu.requests_to("GET", poll)
    assert polls[1].wall - polls[0].wall >= 0.95  # Retry-After: 1 was honoured
    return polls
