"""Money on a public deployment, as visitors meet it: gradio_client against a live app.

The app holds a WaveSpeed key (the emulator's) and is told it listens on a public
address, as on a Space. Asserts the words visitors read and what reached the provider.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

import app
from avatar_core.config import load_settings
from avatar_core.emulator import Emulator, JobPlan, tone_video_maker
from tests.helpers import free_port as _free_port

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
IMAGE, AUDIO = EXAMPLES / "portrait.jpg", EXAMPLES / "voice.mp3"
SERVER_KEY = "ws-server-key-Guard-81x"
USER_KEY = "ws-visitor-own-key-33q"
TIMEOUT_S = 60



class Deployment:
    def __init__(self, url, emu, out_dir):
        self.url, self.emu, self.out_dir = url, emu, out_dir


def _deploy(tmp_path, emu, host, **env_extra):
    env = {
        "WAVESPEED_BASE_URL": emu.url, "WAVESPEED_API_KEY": SERVER_KEY,
        "AVATAR_OUTPUT_DIR": str(tmp_path), "AVATAR_POLL_TYPICAL_S": "1", **env_extra,
    }
    settings = load_settings(env=env, dotenv_path=None)
    demo = app.build_demo(settings, host=host)
    port = _free_port()
    # Bound to loopback for the test; the app is told it serves `host` (a Space binds 0.0.0.0).
    app.launch(demo, settings, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def emu():
    with Emulator(queue_s=0.2, processing_s=0.8, video_maker=tone_video_maker,
                  api_keys={"wavespeed": [SERVER_KEY, USER_KEY]}) as emulator:
        yield emulator


@pytest.fixture
def public(tmp_path, emu):
    emu.reset()
    demo, url = _deploy(tmp_path, emu, "0.0.0.0", AVATAR_MAX_CONCURRENT_PER_VISITOR="1",
                        AVATAR_MAX_DAILY_JOBS_PER_VISITOR="3")
    try:
        yield Deployment(url, emu, tmp_path)
    finally:
        demo.close()


def _generate(client, **params):
    return client.submit(image=handle_file(str(IMAGE)), audio=handle_file(str(AUDIO)), api_name="/generate",
                         **{"provider": "wavespeed", "tier": "standard", "prompt": "", "api_key": "", **params})


def test_on_a_public_address_anonymous_visitors_cannot_spend_the_servers_key(public):
    client = Client(public.url, verbose=False)
    status, request_id, video = _generate(client).result(timeout=TIMEOUT_S)
    assert "This server's keys are not open to visitors here." in status, status
    assert "your own WaveSpeed API key" in status and video is None and not request_id
    assert public.emu.requests.to("POST", r".*") == [], "nothing may reach the provider"
    # The page says so before anyone tries.
    import httpx

    config = httpx.get(public.url + "config", timeout=10).json()
    props = {c["props"].get("elem_id"): c["props"] for c in config["components"] if c.get("props")}
    assert props["provider"]["value"] == "local"  # the default is what a visitor can run
    labels = [c[0] for c in props["provider"]["choices"]]
    assert any(label.startswith("WaveSpeed") and "needs your API key" in label for label in labels)


def test_with_their_own_key_visitors_can_and_only_their_key_is_used(public):
    client = Client(public.url, verbose=False)
    status, request_id, video = _generate(client, api_key=USER_KEY).result(timeout=TIMEOUT_S)
    assert "Done in" in status and video
    submits = public.emu.requests.to("POST", r"^/api/v3/kwaivgi/")
    assert len(submits) == 1 and submits[0].header("authorization") == f"Bearer {USER_KEY}"


def test_one_visitor_cannot_run_more_jobs_at_once_than_allowed(public):
    client = Client(public.url, verbose=False)
    public.emu.plan_jobs(JobPlan(processing_s=4.0))
    first = _generate(client, api_key=USER_KEY)
    deadline = time.monotonic() + TIMEOUT_S
    while not any("Generating the video" in o[0] for o in first.outputs()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    status, _, video = _generate(client, api_key=USER_KEY).result(timeout=TIMEOUT_S)
    assert "You already have 1 video in progress; wait for one to finish." in status
    assert video is None
    # Another visitor is not affected.
    other = Client(public.url, verbose=False)
    assert "Done in" in _generate(other, api_key=USER_KEY).result(timeout=TIMEOUT_S)[0]
    assert "Done in" in first.result(timeout=TIMEOUT_S)[0]
    assert len(public.emu.requests.to("POST", r"^/api/v3/kwaivgi/")) == 2


def test_the_daily_job_limit_stops_the_fourth_job(public):
    client = Client(public.url, verbose=False)
    for _ in range(3):
        assert "Done in" in _generate(client, api_key=USER_KEY).result(timeout=TIMEOUT_S)[0]
    status, _, video = _generate(client, api_key=USER_KEY).result(timeout=TIMEOUT_S)
    assert "3 videos today" in status and "00:00 UTC" in status and video is None
    assert len(public.emu.requests.to("POST", r"^/api/v3/kwaivgi/")) == 3


def test_the_daily_budget_of_the_servers_keys_is_enforced(tmp_path, emu):
    emu.reset()
    # Anonymous use allowed by the owner, with a budget of one standard 5 s job ($0.25 each,
    # the example clip is 6.5 s -> $0.50), so the second job would pass the cap.
    demo, url = _deploy(tmp_path, emu, "0.0.0.0", AVATAR_ALLOW_ANONYMOUS_SERVER_KEYS="true",
                        AVATAR_DAILY_SPEND_CAP_USD="0.75")
    try:
        client = Client(url, verbose=False)
        assert "Done in" in _generate(client).result(timeout=TIMEOUT_S)[0]
        status, _, video = _generate(Client(url, verbose=False)).result(timeout=TIMEOUT_S)
        assert "daily budget" in status and "$0.75" in status and "own API key" in status and video is None
        submits = emu.requests.to("POST", r"^/api/v3/kwaivgi/")
        assert len(submits) == 1 and submits[0].header("authorization") == f"Bearer {SERVER_KEY}"
        # A visitor's own key is not bound by the server's budget.
        assert "Done in" in _generate(client, api_key=USER_KEY).result(timeout=TIMEOUT_S)[0]
    finally:
        demo.close()


def test_signed_in_users_may_use_the_servers_keys(tmp_path, emu):
    emu.reset()
    demo, url = _deploy(tmp_path, emu, "0.0.0.0", AVATAR_AUTH="ann:correct-horse-9")
    try:
        with pytest.raises(Exception):  # noqa: B017 - gradio_client names no error type for a login wall
            Client(url, verbose=False)  # no login, no app
        client = Client(url, auth=("ann", "correct-horse-9"), verbose=False)
        status, request_id, _ = _generate(client).result(timeout=TIMEOUT_S)
        assert "Done in" in status
        submits = emu.requests.to("POST", r"^/api/v3/kwaivgi/")
        assert len(submits) == 1 and submits[0].header("authorization") == f"Bearer {SERVER_KEY}"
        assert request_id in {j["request_id"] for j in client.predict(api_name="/history")}
    finally:
        demo.close()


def test_on_loopback_the_servers_key_just_works(tmp_path, emu):
    emu.reset()
    demo, url = _deploy(tmp_path, emu, "127.0.0.1")
    try:
        status, _, video = _generate(Client(url, verbose=False)).result(timeout=TIMEOUT_S)
        assert "Done in" in status and video
    finally:
        demo.close()


# ----------------------------------------------------------------------------- resuming


def _remote_job(emu) -> str:
    """A job at the provider, finished there (as one submitted earlier would be)."""
    import base64

    image = base64.b64encode(IMAGE.read_bytes()).decode()
    audio = base64.b64encode(AUDIO.read_bytes()).decode()
    job = emu.create_job("wavespeed", "kwaivgi/kling-v1-ai-avatar-standard", "standard",
                         {"image": f"data:image/jpeg;base64,{image}", "audio": f"data:audio/mpeg;base64,{audio}"})
    emu.wait_for_job(job, 10)
    return job.id


def _row(store, rid: str, owner: str | None):
    return store.record_submitted(provider="wavespeed", request_id=rid, model=None, tier="standard",
                                  version="v1", prompt="", image_name=None, audio_name=None, audio_seconds=None,
                                  estimated_cost_usd=None, owner=owner)


def _polls(emu, rid: str) -> list:
    return emu.requests.to(None, rf"/predictions/{rid}|/emulator/outputs/{rid}/")


def _history_ids(client) -> set[str]:
    return {j["request_id"] for j in client.predict(api_name="/history")}


def _refused_without_a_trace(client, emu, store, rid, key, words):
    before, history = store.get("wavespeed", rid), client.predict(api_name="/history")
    status, _, video = client.predict("wavespeed", rid, key, api_name="/resume")
    assert words in status and video is None, status
    assert _polls(emu, rid) == [], "nothing may be asked of the provider"
    assert store.get("wavespeed", rid) == before  # the row (owner, status, history) is untouched
    assert client.predict(api_name="/history") == history  # nothing claimed into the visitor's history


def test_on_a_public_address_resume_uses_the_servers_key_only_for_the_visitors_own_jobs(tmp_path, emu):
    """Anonymous use of the server's keys allowed by the owner: still only the visitor's own jobs."""
    from avatar_core.store import JobStore

    emu.reset()
    demo, url = _deploy(tmp_path, emu, "0.0.0.0", AVATAR_ALLOW_ANONYMOUS_SERVER_KEYS="true")
    try:
        visitor = Client(url, verbose=False)
        store = JobStore(tmp_path / "jobs.sqlite3")
        cli_job, others_job, unknown_job, own_job = (_remote_job(emu) for _ in range(4))
        _row(store, cli_job, None)  # started with `python -m avatar_core generate` on the server
        _row(store, others_job, "session:someone-else-entirely")
        _row(store, own_job, f"session:{visitor.session_hash}")
        emu.requests.clear()

        _refused_without_a_trace(visitor, emu, store, cli_job, "", "started by someone else")
        _refused_without_a_trace(visitor, emu, store, cli_job, USER_KEY, "started by someone else")
        _refused_without_a_trace(visitor, emu, store, others_job, "", "started by someone else")
        _refused_without_a_trace(visitor, emu, store, unknown_job, "",
                                 "This server's key only collects jobs this app started for you")
        assert store.get("wavespeed", unknown_job) is None  # not claimed into anyone's history

        status, rid, video = visitor.predict("wavespeed", own_job, "", api_name="/resume")
        assert "Done in" in status and video and rid == own_job, status
        polls = emu.requests.to("GET", rf"/api/v3/predictions/{own_job}/result$")
        assert polls and all(p.header("authorization") == f"Bearer {SERVER_KEY}" for p in polls)
        assert store.get("wavespeed", own_job).status == "completed" and own_job in _history_ids(visitor)
    finally:
        demo.close()


def test_on_a_public_address_anonymous_resume_follows_the_same_gate_as_generate(public):
    from avatar_core.store import JobStore

    visitor = Client(public.url, verbose=False)
    store = JobStore(public.out_dir / "jobs.sqlite3")
    own_job = _remote_job(public.emu)
    _row(store, own_job, f"session:{visitor.session_hash}")
    public.emu.requests.clear()
    # Their own job, but the server's key is not open to anonymous visitors here.
    _refused_without_a_trace(visitor, public.emu, store, own_job, "",
                             "This server's keys are not open to visitors here. Enter your own WaveSpeed API key")
    # With their own key it resumes, on their key only.
    status, _, video = visitor.predict("wavespeed", own_job, USER_KEY, api_name="/resume")
    assert "Done in" in status and video, status
    polls = public.emu.requests.to("GET", rf"/api/v3/predictions/{own_job}/result$")
    assert polls and all(p.header("authorization") == f"Bearer {USER_KEY}" for p in polls)
