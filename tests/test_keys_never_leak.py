"""API keys never leak: not in a log line, a stored row, a status message or a file.

The app runs as a separate process, set up like ``python app.py`` (root logging to
stderr, the key-redaction filter installed) but at DEBUG, with a server key for every
provider. Each provider gets its own loopback emulator, so its faults cannot touch
another provider's jobs. For every provider, every way a job can fail is run twice:
once with a key the visitor typed into ``/generate`` and once on the server's key. The
providers echo the key back in their error messages where a real one might, to prove
the app scrubs what it is given, not only what it says itself.

Then the app's whole stderr/stdout, a dump of the job store (and its raw bytes, WAL
included), every file in the output folder and every status frame a caller received
are searched for: each key, both halves of a Kling ``ACCESS:SECRET`` key, and every
credential that went over the wire (the Kling JWT included).

A second, in-process app (root logger captured by caplog at DEBUG, no redaction
filter) serves two visitors with different keys at the same time; each job reaches the
emulator with its own visitor's key only.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file

from avatar_core.emulator import Emulator, Fault, JobPlan, tone_video_maker
from media_factory import make_portrait, make_tone
from tests.helpers import free_port as _free_port, stop_process

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PROVIDERS = ("wavespeed", "segmind", "fal", "replicate", "kling")
# Distinctive keys: a leak of any of them is an exact substring to find.
USER_KEYS = {
    "wavespeed": "wsUSERkey0000alpha1111",
    "segmind": "smUSERkey0000bravo2222",
    "fal": "falUSERid-3333:falUSERsecret4444charlie",
    "replicate": "r8_USERtoken5555delta",
    "kling": "klUSERaccess6666echo:klUSERsecret7777foxtrot",
}
SERVER_KEYS = {
    "wavespeed": "wsSERVERkey8888golf",
    "segmind": "smSERVERkey9999hotel",
    "fal": "falSERVERid-1010:falSERVERsecret1212india",
    "replicate": "r8_SERVERtoken1313juliet",
    "kling": "klSERVERaccess1414kilo:klSERVERsecret1515lima",
}
SERVER_ENV = {
    "wavespeed": {"WAVESPEED_API_KEY": SERVER_KEYS["wavespeed"]},
    "segmind": {"SEGMIND_API_KEY": SERVER_KEYS["segmind"]},
    "fal": {"FAL_KEY": SERVER_KEYS["fal"]},
    "replicate": {"REPLICATE_API_TOKEN": SERVER_KEYS["replicate"]},
    "kling": dict(zip(("KLING_ACCESS_KEY", "KLING_SECRET_KEY"), SERVER_KEYS["kling"].split(":"))),
}
SUBMIT = {
    "wavespeed": r"^/api/v3/kwaivgi/",
    "segmind": r"^/v2/kling",
    "fal": r"^/fal-ai/",
    "replicate": r"^/v1/models/",
    "kling": r"^/v1/videos/avatar/image2video$",
}
READ = {
    "wavespeed": r"^/api/v3/predictions/",
    "segmind": r"^/v2/requests/",
    "fal": r"^/fal-ai/[^/]+/requests/",
    "replicate": r"^/v1/predictions/",
    "kling": r"^/v1/videos/avatar/image2video/",
}
CREDITS_STATUS = {"segmind": 406}  # the others answer 402 Payment Required
MAX_VIDEO_MB = 1  # the "huge video" case sends 3 MB
DEADLINE_S = 6  # the "timeout" case processes for a minute
SURVIVED = {"500-burst"}  # transient: the job still ends with a video
JOB_TIMEOUT_S = 90


def secrets_of(key: str) -> list[str]:
    """The key and, for ACCESS:SECRET keys (Kling; fal's id:secret), each half."""
    return [key, *(part for part in key.split(":") if part)] if ":" in key else [key]


def _echo(key: str) -> str:
    """An error text a careless provider might send: the key and each half spelled out."""
    return "Invalid credentials " + " / ".join(secrets_of(key))


def failure_cases(provider: str, key: str) -> list[tuple[str, list[Fault], list[JobPlan]]]:
    """(name, faults, job plans) for every way a job can fail; the key is echoed where it can be."""
    submit, read = SUBMIT[provider], READ[provider]
    echo = _echo(key)
    return [
        ("401", [Fault("status", submit, method="POST", status=401, message=echo)], []),
        ("403", [Fault("status", submit, method="POST", status=403, message=echo)], []),
        ("credits", [Fault("status", submit, method="POST", status=CREDITS_STATUS.get(provider, 402), message=echo)], []),
        ("422", [Fault("status", submit, method="POST", status=422, message=echo)], []),
        ("429", [Fault("status", submit, method="POST", status=429, retry_after=0.2, count=None, message=echo)], []),
        ("500-burst", [Fault("status", read, method="GET", status=500, count=3, message=echo)], []),
        ("503-forever", [Fault("status", read, method="GET", status=503, count=None, message=echo)], []),
        ("malformed-json", [Fault("malformed_json", submit, method="POST")], []),
        ("dropped-after-submit", [Fault("drop", submit, method="POST", process=True)], []),
        ("job-failed", [], [JobPlan(fail=f"Rejected: {echo}")]),
        ("404-result", [], [JobPlan(video="404")]),
        ("html-result", [], [JobPlan(video="html")]),
        ("huge-video", [], [JobPlan(video="huge", huge_bytes=3 * 1024 * 1024)]),
        ("timeout", [], [JobPlan(processing_s=60)]),
    ]



@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys-inputs")
    return make_portrait(d / "face.jpg", "JPEG", size=(480, 600)), make_tone(d / "voice.mp3", "mp3", 2.2)


# ----------------------------------------------------------------------------- the app in its own process

_APP = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
import app
from avatar_core import ui
from avatar_core.config import load_settings
settings = load_settings()
ui.install_log_redaction(settings)  # as `python app.py` does
app.launch(app.build_demo(settings), settings, server_name="127.0.0.1", server_port=int(sys.argv[1]))
"""


def _limits_off() -> dict[str, str]:
    """This deployment's money guards must not refuse the matrix's many jobs."""
    return {"AVATAR_ALLOW_ANONYMOUS_SERVER_KEYS": "true", "AVATAR_MAX_CONCURRENT_PER_VISITOR": "unlimited",
            "AVATAR_MAX_DAILY_JOBS_PER_VISITOR": "unlimited", "AVATAR_DAILY_SPEND_CAP_USD": "unlimited"}


def _base_urls(emus: dict[str, Emulator]) -> dict[str, str]:
    return {
        "WAVESPEED_BASE_URL": emus["wavespeed"].url,
        "SEGMIND_BASE_URL": emus["segmind"].url, "SEGMIND_UPLOAD_URL": emus["segmind"].url + "/upload-asset",
        "FAL_BASE_URL": emus["fal"].url,
        "REPLICATE_BASE_URL": emus["replicate"].url,
        "KLING_BASE_URL": emus["kling"].url,
    }


@dataclass
class Run:
    provider: str
    mode: str  # "user" or "server"
    case: str
    frames: list[tuple] = field(default_factory=list)
    error: str | None = None


@dataclass
class Matrix:
    out_dir: Path
    log_path: Path
    runs: list[Run]
    wire_credentials: set[str]
    emus: dict[str, Emulator]


def _run_one(client: Client, inputs, provider: str, api_key: str) -> list[tuple]:
    job = client.submit(image=handle_file(str(inputs[0])), audio=handle_file(str(inputs[1])), provider=provider,
                        tier="standard", prompt="", api_key=api_key, api_name="/generate")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel()
            raise AssertionError("job did not finish")
        time.sleep(0.05)
    frames = [tuple(o) for o in job.outputs()]
    try:
        frames.append(tuple(job.result()))
    except Exception as exc:
        frames.append((f"gradio_client error: {exc}",))
    return frames


def _drive_provider(url: str, emu: Emulator, provider: str, inputs, runs: list[Run]) -> None:
    client = Client(url, verbose=False)
    for mode, key in (("user", USER_KEYS[provider]), ("server", SERVER_KEYS[provider])):
        for name, faults, plans in failure_cases(provider, key):
            emu.faults.clear()
            emu.faults.add(*faults) if faults else None
            emu.plan_jobs(*plans) if plans else None
            run = Run(provider, mode, name)
            try:
                run.frames = _run_one(client, inputs, provider, key if mode == "user" else "")
            except Exception as exc:
                run.error = f"{type(exc).__name__}: {exc}"
            runs.append(run)
            emu.faults.clear()


@pytest.fixture(scope="module")
def matrix(tmp_path_factory, inputs):
    work = tmp_path_factory.mktemp("keys-app")
    out_dir = work / "outputs"
    log_path = work / "app.log"
    emus = {}
    for p in PROVIDERS:
        keys = {p: {USER_KEYS[p], SERVER_KEYS[p]}}
        emus[p] = Emulator(queue_s=0.1, processing_s=0.3, video_maker=tone_video_maker, api_keys=keys).start()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_KEY", "_TOKEN"))}
    env.update({"PYTHONPATH": str(ROOT), "AVATAR_OUTPUT_DIR": str(out_dir), "AVATAR_POLL_TYPICAL_S": "1",
                "AVATAR_MAX_VIDEO_MB": str(MAX_VIDEO_MB), "AVATAR_DEADLINE_S": str(DEADLINE_S),
                "GRADIO_ANALYTICS_ENABLED": "False", **_limits_off(), **_base_urls(emus)})
    for p in PROVIDERS:
        env.update(SERVER_ENV[p])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", _APP, str(port)], cwd=work, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    runs: list[Run] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, log_path.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the app did not start"
            time.sleep(0.2)
        threads = [threading.Thread(target=_drive_provider, args=(url, emus[p], p, inputs, runs)) for p in PROVIDERS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=900)
        wire = set()
        for emu in emus.values():
            for r in emu.requests:
                for name in ("authorization", "x-api-key"):
                    value = r.header(name)
                    if value:
                        wire.add(value.split(" ", 1)[-1])
        yield Matrix(out_dir, log_path, runs, wire, emus)
    finally:
        stop_process(proc, timeout=20)
        for emu in emus.values():
            emu.stop()


def _all_secrets(provider: str) -> list[str]:
    return secrets_of(USER_KEYS[provider]) + secrets_of(SERVER_KEYS[provider])


def _store_text(out_dir: Path) -> tuple[str, bytes]:
    db = out_dir / "jobs.sqlite3"
    assert db.is_file(), "no job store was written"
    with sqlite3.connect(db) as conn:
        dump = "\n".join(conn.iterdump())
    raw = b"".join(p.read_bytes() for p in out_dir.glob("jobs.sqlite3*"))
    return dump, raw


# ----------------------------------------------------------------------------- the matrix


def test_every_case_ran_and_used_the_intended_key(matrix):
    assert len(matrix.runs) == len(PROVIDERS) * 2 * len(failure_cases("wavespeed", "k"))
    for run in matrix.runs:
        assert run.error is None, (run.provider, run.mode, run.case, run.error)
        status, _rid, video = run.frames[-1]
        if run.case in SURVIVED:
            assert "Done in" in status and video, (run.provider, run.mode, run.case, status)
        else:
            assert "could not be made" in status and video is None, (run.provider, run.mode, run.case, status)
        assert "Traceback" not in status
    # The keys really were used: every provider saw both on the wire (Kling as signed JWTs).
    for p in ("wavespeed", "segmind", "fal", "replicate"):
        seen = {v for r in matrix.emus[p].requests for v in (r.header("authorization"), r.header("x-api-key")) if v}
        for key in (USER_KEYS[p], SERVER_KEYS[p]):
            assert any(key in v for v in seen), (p, key)
    kling_tokens = [r.header("authorization") for r in matrix.emus["kling"].requests if r.header("authorization")]
    assert kling_tokens and all(t.startswith("Bearer ey") for t in kling_tokens)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_no_key_in_what_callers_were_shown(matrix, provider):
    secrets = _all_secrets(provider) + sorted(matrix.wire_credentials)
    for run in matrix.runs:
        text = "\n".join(str(x) for frame in run.frames for x in frame)
        for s in secrets:
            assert s not in text, f"{s!r} shown to the caller in {run.provider}/{run.mode}/{run.case}"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_no_key_in_the_app_log(matrix, provider):
    log = matrix.log_path.read_text(errors="replace")
    assert "DEBUG" in log and "avatar_core" in log, "the log was not captured at DEBUG"
    for s in _all_secrets(provider) + sorted(matrix.wire_credentials):
        assert s not in log, f"{s!r} in the app's output: ...{log[max(0, log.find(s) - 300):log.find(s) + 100]}"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_no_key_in_the_job_store(matrix, provider):
    dump, raw = _store_text(matrix.out_dir)
    assert provider in dump  # the runs left rows
    for s in _all_secrets(provider) + sorted(matrix.wire_credentials):
        assert s not in dump, f"{s!r} in a stored row"
        assert s.encode() not in raw, f"{s!r} in the store's file bytes"


def test_no_key_in_any_output_file(matrix):
    """Videos, checked inputs, renderer work files (the store has its own test above)."""
    secrets = [s for p in PROVIDERS for s in _all_secrets(p)] + sorted(matrix.wire_credentials)
    files = [p for p in matrix.out_dir.rglob("*") if p.is_file() and not p.name.startswith("jobs.sqlite3")]
    assert any(p.suffix == ".mp4" for p in files) and any(p.parent.name == "inputs" for p in files)
    for path in files:
        data = path.read_bytes()
        for s in secrets:
            assert s.encode() not in data, f"{s!r} in {path}"


# ----------------------------------------------------------------------------- two visitors at once


def test_two_visitors_at_once_each_reach_the_provider_with_their_own_key(tmp_path, inputs, caplog):
    import app
    from avatar_core.config import load_settings

    caplog.set_level(logging.DEBUG)  # root, no redaction filter on caplog's handler: stricter than production
    key_a, key_b = "wsVISITORa-1717mike", "wsVISITORb-1818november"
    with Emulator(queue_s=0.3, processing_s=0.8, video_maker=tone_video_maker,
                  api_keys={"wavespeed": {key_a, key_b}}) as emu:
        settings = load_settings(env={"WAVESPEED_BASE_URL": emu.url, "AVATAR_OUTPUT_DIR": str(tmp_path / "out"),
                                      "AVATAR_POLL_TYPICAL_S": "1", **_limits_off()}, dotenv_path=None)
        demo = app.build_demo(settings)
        port = _free_port()
        app.launch(demo, settings, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            url = f"http://127.0.0.1:{port}/"
            visitors = {key_a: Client(url, verbose=False), key_b: Client(url, verbose=False)}
            jobs = []
            for i in range(3):  # interleaved: a, b, a, b, ...
                for key, client in visitors.items():
                    jobs.append((key, client.submit(
                        image=handle_file(str(inputs[0])), audio=handle_file(str(inputs[1])), provider="wavespeed",
                        tier="standard", prompt=f"visitor {key[-6:]} job {i}", api_key=key, api_name="/generate")))
            results = [(key, job.result(timeout=JOB_TIMEOUT_S), job.outputs()) for key, job in jobs]
        finally:
            demo.close()
        submits = emu.requests_to("POST", SUBMIT["wavespeed"])
        assert len(submits) == 6
        for key, (status, rid, video), frames in results:
            assert "Done in" in status and rid and video, status
            other = key_b if key == key_a else key_a
            # The job's own submit (found by its prompt) and every request about its id.
            mine = [r for r in submits if r.json["prompt"].startswith(f"visitor {key[-6:]}")]
            assert len(mine) == 3
            about = mine + emu.requests_to(None, rf"/predictions/{rid}/")
            assert len(about) > 3
            for r in about:
                assert r.header("authorization") == f"Bearer {key}", (r.path, r.header("authorization"))
            shown = "\n".join(str(x) for f in frames for x in f)
            assert key not in shown and other not in shown
        uploads = emu.requests_to("POST", r"^/api/v3/media/uploads")
        assert {u.header("authorization") for u in uploads} == {f"Bearer {key_a}", f"Bearer {key_b}"}
        logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
        assert caplog.records and key_a not in logged and key_b not in logged
        db = tmp_path / "out" / "jobs.sqlite3"
        with sqlite3.connect(db) as conn:
            dump = "\n".join(conn.iterdump())
        assert dump.count("wavespeed") >= 6 and key_a not in dump and key_b not in dump


# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("provider", ["wavespeed", "fal", "kling"])
@pytest.mark.parametrize("case", ["401", "500-burst", "job-failed"])
def test_the_cli_never_prints_a_key(tmp_path, inputs, provider, case):
    key = SERVER_KEYS[provider]
    with Emulator(queue_s=0.1, processing_s=0.3, video_maker=tone_video_maker, api_keys={provider: key}) as emu:
        _name, faults, plans = next(c for c in failure_cases(provider, key) if c[0] == case)
        emu.faults.add(*faults) if faults else None
        emu.plan_jobs(*plans) if plans else None
        env = {k: v for k, v in os.environ.items() if not k.endswith(("_KEY", "_TOKEN"))}
        env.update({"PYTHONPATH": str(ROOT), "AVATAR_OUTPUT_DIR": str(tmp_path / "out"), "AVATAR_POLL_TYPICAL_S": "1",
                    **_base_urls({p: emu for p in PROVIDERS}), **SERVER_ENV[provider]})
        proc = subprocess.run([sys.executable, "-m", "avatar_core", "generate", "--provider", provider,
                               "--image", str(inputs[0]), "--audio", str(inputs[1])], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == (0 if case in SURVIVED else 1), proc.stderr
    assert "Invalid credentials" in proc.stderr or case in SURVIVED  # the provider's echo did reach the CLI
    wire = {r.header("authorization").split(" ", 1)[-1] for r in emu.requests if r.header("authorization")}
    for s in secrets_of(key) + sorted(wire):
        assert s not in proc.stdout + proc.stderr, f"{s!r} printed by the CLI"
