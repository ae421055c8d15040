"""The app as API users see it: gradio_client against a live server on 127.0.0.1.

Complete jobs run with the offline ``local`` provider and with WaveSpeed and Segmind
against the loopback emulator. We assert what a caller sees (streamed statuses, the
returned MP4 and its length) and what went over the wire (the auth header).
"""

from __future__ import annotations

import functools
import http.server
import threading
import time
from pathlib import Path

import av
import httpx
import pytest
from gradio_client import Client, handle_file

import app
from avatar_core.config import load_settings
from avatar_core.emulator import Emulator, JobPlan, tone_video_maker
from tests.helpers import free_port as _free_port

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
IMAGE = EXAMPLES / "portrait.jpg"
AUDIO = EXAMPLES / "voice.mp3"
# The emulator accepts only these keys, so a wrong key is refused like the real thing.
USER_WAVESPEED_KEY = "ws-user-own-key-7Q2x9"
SERVER_SEGMIND_KEY = "sg-server-key-4k8Lm"
JOB_TIMEOUT_S = 60



def _audio_seconds(path: Path) -> float:
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        samples = sum(f.samples for f in c.decode(stream))
        return samples / stream.rate


class Served:
    def __init__(self, url: str, emu: Emulator, client: Client, out_dir: Path) -> None:
        self.url, self.emu, self.client, self.out_dir = url, emu, client, out_dir


@pytest.fixture(scope="module")
def files_url():
    """The examples folder over HTTP on 127.0.0.1, standing in for a public file host."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(EXAMPLES))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("app-outputs")
    with Emulator(
        queue_s=0.3, processing_s=1.0, video_maker=tone_video_maker,
        api_keys={"wavespeed": USER_WAVESPEED_KEY, "segmind": SERVER_SEGMIND_KEY},
    ) as emu:
        env = {
            "WAVESPEED_BASE_URL": emu.url,
            "SEGMIND_BASE_URL": emu.url,
            "SEGMIND_UPLOAD_URL": emu.url + "/upload-asset",
            "SEGMIND_API_KEY": SERVER_SEGMIND_KEY,
            "AVATAR_OUTPUT_DIR": str(out_dir),
            "AVATAR_POLL_TYPICAL_S": "1",
            # Our stand-in "public" file host is on 127.0.0.1 (see files_url).
            "AVATAR_ALLOW_PRIVATE_URLS": "1",
        }
        settings = load_settings(env=env, dotenv_path=None)
        demo = app.build_demo(settings)
        port = _free_port()
        app.launch(demo, settings, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        url = f"http://127.0.0.1:{port}/"
        try:
            yield Served(url, emu, Client(url, verbose=False), out_dir)
        finally:
            demo.close()


def _run(served: Served, **params):
    """Submit /generate and collect every streamed status until it ends -> (statuses, result)."""
    job = served.client.submit(
        api_name="/generate",
        **{"image": handle_file(str(IMAGE)), "audio": handle_file(str(AUDIO)),
           "tier": "standard", "prompt": "", "api_key": "", **params},
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not job.done():
        assert time.monotonic() < deadline, "the job did not finish in time"
        time.sleep(0.05)
    statuses = [out[0] for out in job.outputs()]
    return statuses, job.result()


def _video_path(value) -> Path:
    path = value.get("video") if isinstance(value, dict) else value
    assert path, f"no video returned: {value!r}"
    return Path(path)


def _assert_playable_mp4_as_long_as_the_audio(path: Path) -> None:
    with av.open(str(path)) as c:
        assert c.streams.video, "no video stream"
        assert c.streams.video[0].codec_context.name == "h264"
        duration = c.duration / 1_000_000
    assert duration == pytest.approx(_audio_seconds(AUDIO), abs=0.1)


# ----------------------------------------------------------------------------- API shape


def test_generate_endpoint_has_the_documented_parameters(served):
    info = served.client.view_api(print_info=False, return_format="dict")
    endpoints = info["named_endpoints"]
    params = [p["parameter_name"] for p in endpoints["/generate"]["parameters"]]
    assert params[:6] == ["image", "audio", "provider", "tier", "prompt", "api_key"]
    optional = {p["parameter_name"] for p in endpoints["/generate"]["parameters"] if p["parameter_has_default"]}
    assert {"provider", "tier", "prompt", "api_key", "version", "image_url", "audio_url", "trim_silence"} <= optional
    # UI-only events (input checks, buttons, history views) are not part of the API.
    assert sorted(endpoints) == ["/cancel", "/generate", "/history", "/resume"]
    assert [p["parameter_name"] for p in endpoints["/resume"]["parameters"]] == ["provider", "request_id", "api_key"]
    assert [p["parameter_name"] for p in endpoints["/cancel"]["parameters"]] == ["provider", "request_id"]
    assert len(endpoints["/generate"]["returns"]) == 3  # status, request id, video


def test_served_config_switches_off_browser_run_history(served):
    config = httpx.get(served.url + "config", timeout=10).json()
    assert config["run_history"] is False
    # The key box never carries a value in the page's config.
    key_box = [c for c in config["components"] if c.get("props", {}).get("elem_id") == "api-key"]
    assert key_box and key_box[0]["props"]["type"] == "password" and not key_box[0]["props"].get("value")


# ----------------------------------------------------------------------------- complete jobs


def test_local_preview_end_to_end(served):
    statuses, (status, request_id, video) = _run(served, provider="local")
    assert statuses[0].startswith("### Checking your files")
    assert any("Rendering the preview" in s for s in statuses)
    assert "Done in" in status and request_id and request_id in status
    _assert_playable_mp4_as_long_as_the_audio(_video_path(video))


def test_a_16_bit_grey_scan_uploaded_to_the_app_stays_grey(served, corpus):
    """A 16-bit greyscale PNG (a scanned photo) sent as an upload is not turned white on the
    way in: the portrait input hands the file on as it is (image_mode=None), and the checks
    and the renderer scale it to 8 bits."""
    import numpy as np
    from PIL import Image

    source = corpus.image("png16_gray")
    with Image.open(source) as im:
        assert im.mode == "I;16"
        expected = float((np.asarray(im, dtype=np.uint16) >> 8).mean())
    _statuses, (status, _request_id, video) = _run(served, provider="local", image=handle_file(str(source)))
    assert "Done in" in status, status
    with av.open(str(_video_path(video))) as c:
        first = next(c.decode(video=0)).to_ndarray(format="rgb24").astype(np.float32)
    assert abs(first.mean() - expected) < 6, (first.mean(), expected)
    assert first.std() > 20  # a face, not a flat grey or white frame


def test_wavespeed_with_the_users_own_key(served):
    served.emu.requests.clear()
    statuses, (status, request_id, video) = _run(served, provider="wavespeed", api_key=USER_WAVESPEED_KEY)
    joined = "\n".join(statuses)
    for stage in ("Checking your files", "Sending the image to WaveSpeed", "Submitted to WaveSpeed",
                  "Generating the video", "Done in"):
        assert stage in joined, stage
    assert "estimated **$0.50**" in status  # 6.5 s = two started 5 s blocks at $0.25
    submits = served.emu.requests.to("POST", r"^/api/v3/kwaivgi/kling-v1-ai-avatar-standard$")
    assert len(submits) == 1
    assert submits[0].header("authorization") == f"Bearer {USER_WAVESPEED_KEY}"
    assert submits[0].json["image"].startswith(served.emu.url)
    assert request_id and request_id in served.emu.jobs
    assert USER_WAVESPEED_KEY not in joined
    _assert_playable_mp4_as_long_as_the_audio(_video_path(video))


def test_segmind_with_the_servers_key(served):
    served.emu.requests.clear()
    statuses, (status, request_id, video) = _run(served, provider="segmind", tier="pro")
    assert "Done in" in status and "Segmind, pro" in status
    submits = served.emu.requests.to("POST", r"^/v2/kling-v1-pro-ai-avatar$")
    assert len(submits) == 1 and submits[0].header("x-api-key") == SERVER_SEGMIND_KEY
    assert submits[0].header("authorization") is None
    assert not any(SERVER_SEGMIND_KEY in s for s in statuses)
    _assert_playable_mp4_as_long_as_the_audio(_video_path(video))


def _audio_seconds_of(data: bytes) -> float:
    import io

    with av.open(io.BytesIO(data)) as c:
        return sum(f.samples for f in c.decode(audio=0)) / c.streams.audio[0].rate


def test_links_instead_of_files_are_checked_then_the_checked_files_are_uploaded(served, files_url):
    # Behaviour changed on purpose (issue 14.4): links that needed no conversion used to go
    # to the provider as given; a link may serve the provider other bytes than it served the
    # checks, so the provider now always gets our upload of exactly what was checked.
    served.emu.requests.clear()
    job = served.client.submit(
        image=None, audio=None, provider="wavespeed", tier="standard", prompt="smiles", api_key=USER_WAVESPEED_KEY,
        image_url=f"{files_url}/portrait.jpg", audio_url=f"{files_url}/voice.mp3", api_name="/generate",
    )
    status, _rid, video = job.result(timeout=JOB_TIMEOUT_S)
    assert "Done in" in status, status
    submit = served.emu.requests.to("POST", r"^/api/v3/kwaivgi/")[0]
    for field in ("image", "audio"):
        sent = submit.json[field]
        assert sent.startswith(f"{served.emu.url}/emulator/files/") and files_url not in sent
        stored = served.emu.files[sent[len(f"{served.emu.url}/emulator/files/"):].split("/")[0]]
        # The upload is the checked copy the app made in its inputs folder, byte for byte.
        checked = served.out_dir / "inputs" / stored.filename
        assert checked.is_file() and stored.data == checked.read_bytes()
    # A link's bytes are never kept or sent as they came (issue 14.2): even an MP3 that
    # needed no conversion is our re-encode, as long as the linked voice.
    sent_audio = served.emu.files[submit.json["audio"].split("/")[-2]].data
    assert sent_audio != AUDIO.read_bytes()
    assert abs(_audio_seconds_of(sent_audio) - _audio_seconds_of(AUDIO.read_bytes())) <= 0.1
    assert submit.json.get("prompt") == "smiles"
    assert len(served.emu.requests.to("PUT", r"^/emulator/uploads/")) == 2
    _assert_playable_mp4_as_long_as_the_audio(_video_path(video))


# ----------------------------------------------------------------------------- problems


def test_a_refused_key_is_explained_and_never_echoed(served):
    wrong = "ws-wrong-key-ZZ9plural"
    statuses, (status, _rid, video) = _run(served, provider="wavespeed", api_key=wrong)
    assert "could not be made" in status and "refused the API key" in status
    assert video is None
    assert not any(wrong in s for s in statuses)


def test_a_hosted_provider_without_any_key_says_what_to_do(served):
    served.emu.requests.clear()
    _statuses, (status, _rid, video) = _run(served, provider="wavespeed")
    assert "No API key for WaveSpeed" in status and "your own key" in status and video is None
    assert not served.emu.requests.to("POST", r"^/api/v3/kwaivgi/")  # nothing was submitted


def test_a_portrait_without_a_face_is_refused_for_a_hosted_provider_before_any_request(served, corpus):
    served.emu.requests.clear()
    cat = handle_file(str(corpus.image("cat")))
    statuses, (status, request_id, video) = _run(served, image=cat, provider="wavespeed", api_key=USER_WAVESPEED_KEY)
    assert status.startswith("### The video could not be made"), status
    assert "No face was found in the portrait" in status and "nothing was sent to WaveSpeed" in status
    assert "one face looks at the camera" in status
    assert video is None and not request_id
    assert not any("Sending the image" in s or "Submitted" in s for s in statuses)
    assert list(served.emu.requests) == []  # no upload, no submit: nothing reached the provider


def test_the_local_preview_of_a_portrait_without_a_face_says_so_when_done(served, corpus):
    cat = handle_file(str(corpus.image("cat")))
    statuses, (status, request_id, video) = _run(served, image=cat, provider="local")
    assert any("Rendering the preview" in s for s in statuses)
    headline = status.splitlines()[0]
    assert headline.startswith("### Done in") and headline.endswith(", but no face was found in the portrait")
    assert "the mouth does not move" in status and "one face looks at the camera" in status
    assert request_id and request_id in status
    _assert_playable_mp4_as_long_as_the_audio(_video_path(video))


def test_a_failed_job_shows_the_providers_reason(served):
    served.emu.plan_jobs(JobPlan(fail="Content blocked by the safety filter"))
    _statuses, (status, request_id, video) = _run(served, provider="wavespeed", api_key=USER_WAVESPEED_KEY)
    assert "could not be made" in status and "safety filter" in status
    assert request_id and request_id in status and video is None
    assert "Traceback" not in status


def _submit_slow_wavespeed_job(served, client, processing_s: float):
    served.emu.requests.clear()
    served.emu.plan_jobs(JobPlan(processing_s=processing_s))
    job = client.submit(
        image=handle_file(str(IMAGE)), audio=handle_file(str(AUDIO)), provider="wavespeed", tier="standard",
        prompt="", api_key=USER_WAVESPEED_KEY, api_name="/generate",
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any("Generating the video" in o[0] for o in job.outputs()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return job, job.outputs()[-1][1]


def _result_polls(served) -> int:
    return len(served.emu.requests.to("GET", r"/predictions/.*/result$"))


def test_cancel_endpoint_stops_the_job_on_the_server(served):
    client = Client(served.url, verbose=False)
    job, request_id = _submit_slow_wavespeed_job(served, client, 120)
    said = client.predict("wavespeed", request_id, api_name="/cancel")
    assert "Stopped waiting" in said and request_id in said and "may still finish and be billed" in said
    time.sleep(1.0)
    polls = _result_polls(served)
    time.sleep(2.0)
    assert _result_polls(served) == polls, "still polling after cancel"
    (row,) = [j for j in client.predict(api_name="/history") if j["request_id"] == request_id]
    # WaveSpeed cannot cancel: the job may still finish and be billed, so it stays resumable.
    assert row["status"] != "cancelled" and row["resumable"] is True


def test_a_dropped_call_never_loses_a_submitted_job(served):
    """Closing the page (or dropping the API call) only stops watching: the paid job finishes."""
    client = Client(served.url, verbose=False)
    job, request_id = _submit_slow_wavespeed_job(served, client, 2.0)
    job.cancel()
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        (row,) = [j for j in client.predict(api_name="/history") if j["request_id"] == request_id]
        if row["status"] == "completed":
            break
        assert time.monotonic() < deadline, f"the job never finished after the call was dropped: {row}"
        time.sleep(0.2)
    assert row["video"] and Path(row["video"]).is_file()
    _assert_playable_mp4_as_long_as_the_audio(Path(row["video"]))
    assert len(served.emu.requests.to("POST", r"/api/v3/kwaivgi/")) == 1, "submitted more than once"


def test_another_visitor_can_neither_see_nor_cancel_my_job(served):
    mine, theirs = Client(served.url, verbose=False), Client(served.url, verbose=False)
    job, request_id = _submit_slow_wavespeed_job(served, mine, 3.0)
    said = theirs.predict("wavespeed", request_id, api_name="/cancel")
    assert "not running in this app for you" in said
    assert request_id not in {j["request_id"] for j in theirs.predict(api_name="/history")}
    status, rid, video = job.result(timeout=JOB_TIMEOUT_S)
    assert "Done in" in status and rid == request_id
    assert request_id in {j["request_id"] for j in mine.predict(api_name="/history")}
    assert request_id not in {j["request_id"] for j in theirs.predict(api_name="/history")}


def test_jobs_run_side_by_side_not_one_after_another(served):
    served.emu.plan_jobs(JobPlan(processing_s=3.0), JobPlan(processing_s=3.0))
    served.emu.requests.clear()
    jobs = [
        served.client.submit(
            image=handle_file(str(IMAGE)), audio=handle_file(str(AUDIO)), provider="wavespeed", tier="standard",
            prompt="", api_key=USER_WAVESPEED_KEY, api_name="/generate",
        )
        for _ in range(2)
    ]
    results = [j.result(timeout=JOB_TIMEOUT_S) for j in jobs]
    assert all("Done in" in r[0] for r in results)
    # Order, not time: both jobs were submitted before either's video was fetched. Run one
    # after the other, the second submit would come after the first download.
    submits = served.emu.requests_to("POST", r"/api/v3/kwaivgi/")
    downloads = served.emu.requests_to("GET", r"/emulator/outputs/.*/output\.mp4$")
    assert len(submits) == 2 and len(downloads) >= 2
    assert max(r.at for r in submits) < min(r.at for r in downloads), "the second job waited for the first"


# ----------------------------------------------------------------------------- history and resume


def _data_uri(path: Path, mime: str) -> str:
    import base64

    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def test_resume_a_job_started_elsewhere_by_its_request_id(served):
    """As if submitted from another computer: the app fetches it and files it under this visitor."""
    client = Client(served.url, verbose=False)
    served.emu.requests.clear()
    job = served.emu.create_job(
        "wavespeed", "kwaivgi/kling-v1-ai-avatar-standard", "standard",
        {"image": _data_uri(IMAGE, "image/jpeg"), "audio": _data_uri(AUDIO, "audio/mpeg")},
    )
    statuses = []
    run = client.submit("wavespeed", job.id, USER_WAVESPEED_KEY, api_name="/resume")
    status, request_id, video = run.result(timeout=JOB_TIMEOUT_S)
    statuses = [o[0] for o in run.outputs()]
    assert "Done in" in status and request_id == job.id, statuses
    _assert_playable_mp4_as_long_as_the_audio(_video_path(video))
    # Resuming only reads: no submit went out, and the user's key was the one used.
    assert not served.emu.requests.to("POST", r"/api/v3/kwaivgi/")
    polls = served.emu.requests.to("GET", rf"/api/v3/predictions/{job.id}/result$")
    assert polls and all(r.headers["authorization"] == f"Bearer {USER_WAVESPEED_KEY}" for r in polls)
    (row,) = [j for j in client.predict(api_name="/history") if j["request_id"] == job.id]
    assert row["status"] == "completed" and Path(row["video"]).is_file()
    # Resuming it again shows the stored video without asking the provider.
    served.emu.requests.clear()
    status, _, again = client.predict("wavespeed", job.id, "", api_name="/resume")
    assert "Already finished" in status and Path(_video_path(again)).name == Path(row["video"]).name
    assert not served.emu.requests.to("GET", r"/predictions/")


def test_resume_refuses_someone_elses_job_and_nonsense_ids(served):
    mine, theirs = Client(served.url, verbose=False), Client(served.url, verbose=False)
    _, rid = _submit_slow_wavespeed_job(served, mine, 0.5)
    status, _, video = theirs.predict("wavespeed", rid, USER_WAVESPEED_KEY, api_name="/resume")
    assert "started by someone else" in status and video is None
    status, _, video = theirs.predict("wavespeed", "../../etc/passwd", USER_WAVESPEED_KEY, api_name="/resume")
    assert "request id exactly as the provider gave it" in status and video is None
    with pytest.raises(Exception, match="not in the list of choices"):
        theirs.predict("local", "abc", "", api_name="/resume")


def test_two_sessions_each_see_only_their_own_history(served):
    alice, bob = Client(served.url, verbose=False), Client(served.url, verbose=False)
    ids = {}
    for name, client in (("alice", alice), ("bob", bob)):
        status, rid, video = client.predict(
            image=handle_file(str(IMAGE)), audio=handle_file(str(AUDIO)), provider="local", tier="standard",
            prompt="", api_key="", api_name="/generate",
        )
        assert "Done in" in status
        ids[name] = rid
    seen = {name: {j["request_id"] for j in c.predict(api_name="/history")} for name, c in (("alice", alice), ("bob", bob))}
    assert ids["alice"] in seen["alice"] and ids["alice"] not in seen["bob"]
    assert ids["bob"] in seen["bob"] and ids["bob"] not in seen["alice"]
    # What the history holds about a job: no key, no provider URL.
    (row,) = [j for j in alice.predict(api_name="/history") if j["request_id"] == ids["alice"]]
    assert set(row) >= {"provider", "request_id", "tier", "status", "estimated_cost_usd", "audio_seconds", "video"}
    assert "http" not in str(row.get("video"))


def test_the_readme_client_example_runs_as_written(served, monkeypatch, capsys):
    readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    api = readme[readme.index("## API"):]
    code = api[api.index("```python") + len("```python"):]
    code = code[:code.index("```")]
    assert 'Client("http://127.0.0.1:7860/")' in code
    monkeypatch.chdir(EXAMPLES.parent)
    exec(compile(code.replace("http://127.0.0.1:7860/", served.url), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "### Done in" in out and "'status': 'completed'" in out
