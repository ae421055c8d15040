"""Unit tests of the app's presentation logic (avatar_core/ui.py): what a person reads."""

from __future__ import annotations

import asyncio

import re
from pathlib import Path

import pytest

from avatar_core import ui
from avatar_core.config import Secret, Settings
from avatar_core.events import (
    Done,
    Downloading,
    FailedEvent,
    ProcessingEvent,
    QueuedEvent,
    Submitted,
    Uploading,
)
from avatar_core.media.pricing import CostEstimate

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _percent(markdown: str) -> int | None:
    m = re.search(r'<progress[^>]*value="(\d+)"', markdown)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------- launch options


def test_launch_binds_localhost_by_default_and_all_interfaces_on_a_space():
    assert ui.launch_options({})["server_name"] == "127.0.0.1"
    assert ui.launch_options({})["server_port"] == 7860
    assert ui.launch_options({"SPACE_ID": "someone/avatar"})["server_name"] == "0.0.0.0"


def test_launch_honours_gradio_environment_variables():
    opts = ui.launch_options({"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "8123", "SPACE_ID": ""})
    assert (opts["server_name"], opts["server_port"]) == ("0.0.0.0", 8123)
    with pytest.raises(ValueError, match="GRADIO_SERVER_PORT"):
        ui.launch_options({"GRADIO_SERVER_PORT": "eighty"})


def test_launch_switches_off_gradio_run_history_which_would_store_inputs_in_the_browser():
    opts = ui.launch_options({})
    assert opts["run_history"] is False
    assert "runs" not in opts["footer_links"]


# ----------------------------------------------------------------------------- text


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0 s"), (8.4, "8 s"), (59.6, "1 min 00 s"), (65, "1 min 05 s"), (3720, "1 h 02 min"), (None, "-"),
     (float("nan"), "-")],
)
def test_durations_read_naturally(seconds, text):
    assert ui.format_duration(seconds) == text


def test_markdown_escaping_stops_links_emphasis_and_html():
    shown = ui.md_escape("bad *key* <img src=x onerror=alert(1)> [click](http://evil)")
    unescaped = re.compile(r"(?<!\\)[<\[*]")
    assert not unescaped.search(shown), shown
    assert "click" in shown and "key" in shown


def test_redact_hides_every_secret_and_ignores_empty_ones():
    assert ui.redact("key sk-ABCDEF refused; sk-ABCDEF again", ["sk-ABCDEF", None, ""]) == "key **** refused; **** again"


def test_configured_keys_are_collected_for_redaction():
    s = Settings(wavespeed_api_key=Secret("ws-server-key"), kling_secret_key=Secret("kling-secret"))
    assert set(ui.configured_secrets(s)) == {"ws-server-key", "kling-secret"}


# ----------------------------------------------------------------------------- choices


def test_provider_labels_say_whether_a_key_is_there_and_local_is_a_preview():
    s = Settings(wavespeed_api_key=Secret("k"))
    choices, default = ui.provider_dropdown(s)
    labels = dict((v, label) for label, v in choices)
    assert "wavespeed" in labels and "key ready" in labels["wavespeed"]
    assert "needs your API key" in labels["segmind"]
    if "local" in labels:
        assert "not Kling output" in labels["local"] and "offline" in labels["local"]
    assert default == "wavespeed"  # a configured hosted provider wins over the preview


def test_without_keys_the_default_is_the_offline_preview():
    choices, default = ui.provider_dropdown(Settings())
    ids = [v for _label, v in choices]
    assert default in ids
    if "local" in ids:
        assert default == "local"


def test_provider_note_says_when_the_servers_key_is_not_for_visitors():
    s = Settings(wavespeed_api_key=Secret("k-1234"))
    note = ui.provider_note("wavespeed", s, server_keys=False)
    assert "not open to visitors" in note and "your own WaveSpeed API key" in note
    (label,) = [lab for lab, pid in ui.provider_dropdown(s, server_keys=False)[0] if pid == "wavespeed"]
    assert "needs your API key" in label
    assert ui.provider_dropdown(s, server_keys=False)[1] == "local"
    assert ui.provider_dropdown(s, server_keys=True)[1] == "wavespeed"


def test_provider_note_tells_what_to_do_without_a_key():
    note = ui.provider_note("segmind", Settings())
    assert "no key" in note and "your own" in note and "SEGMIND_API_KEY" in note
    assert "not* Kling output" in ui.provider_note("local", Settings())


def test_version_choices_follow_the_provider():
    choices, value = ui.version_dropdown("wavespeed")
    assert value == "" and [v for _l, v in choices] == ["", "v1", "v2"]
    assert [v for _l, v in ui.version_dropdown("replicate")[0]] == ["", "v2"]


def test_cost_line_follows_duration_and_tier():
    standard = ui.cost_markdown("wavespeed", "standard", "", 6.5)
    pro = ui.cost_markdown("wavespeed", "pro", "", 6.5)
    assert "$0.50" in standard and "$1.00" in pro  # two started 5 s blocks
    assert "add a voice clip" in ui.cost_markdown("wavespeed", "standard", "", None)
    assert "free" in ui.cost_markdown("local", "pro", "", 30.0)
    assert "unknown" in ui.cost_markdown("segmind", "standard", "v2", 5.0)


def test_cost_line_for_an_impossible_combination_explains_instead_of_failing():
    text = ui.cost_markdown("local", "standard", "v2", 5.0)
    assert "v2" in text and "Traceback" not in text


# ----------------------------------------------------------------------------- status panel


def test_status_board_walks_through_a_whole_job():
    board = ui.StatusBoard("wavespeed", tier="pro", version="v1", cost=CostEstimate(1.0, "b", "s"))
    frames = [
        board.update(Uploading("image", 0, 100, 0.1)),
        board.update(Uploading("audio", 100, 100, 0.5)),
        board.update(Submitted("wavespeed", "req-42", "m", 1.0)),
        board.update(QueuedEvent("wavespeed", "req-42", position=3, elapsed=2.0, estimate_s=400)),
        board.update(ProcessingEvent("wavespeed", "req-42", elapsed=200, estimate_s=400)),
        board.update(Downloading("wavespeed", "req-42", 50, 100, 390)),
        board.update(Done("wavespeed", "req-42", Path("/x.mp4"), 6.5, {}, 400)),
    ]
    assert "Sending the image" in frames[0]
    assert "position 3" in frames[3] and "usually about **6 min 40 s**" in frames[3]
    assert "Generating the video" in frames[4] and "estimated from typical times" in frames[4]
    assert "Downloading" in frames[5]
    assert "Done in 6 min 40 s" in frames[6] and "6.5 s" in frames[6]
    assert all("req-42" in f for f in frames[2:])
    assert "estimated **$1.00**" in frames[6] and "pro" in frames[6]
    percents = [_percent(f) for f in frames]
    assert percents == sorted(percents) and percents[-1] == 100


def test_progress_from_time_never_claims_done():
    board = ui.StatusBoard("segmind")
    frame = board.update(ProcessingEvent("segmind", "r", elapsed=10_000, estimate_s=60))
    assert _percent(frame) < 100


def test_reported_progress_is_used_and_never_goes_back():
    board = ui.StatusBoard("local")
    a = _percent(board.update(ProcessingEvent("local", "r", elapsed=1, progress=0.5)))
    b = _percent(board.update(ProcessingEvent("local", "r", elapsed=2, progress=0.2)))
    assert a == b and 50 < a < 60
    assert "Rendering the preview" in board.render()


def test_unknown_progress_shows_an_indeterminate_bar():
    board = ui.StatusBoard("segmind")
    frame = board.update(ProcessingEvent("segmind", "r", elapsed=5))
    assert '<progress class="job-progress" max="100"></progress>' in frame


def test_a_failure_reads_as_words_with_the_request_id():
    board = ui.StatusBoard("wavespeed")
    board.update(Submitted("wavespeed", "req-7"))
    frame = board.update(FailedEvent("WaveSpeed reports the job failed: face not found", "wavespeed", "req-7", "JobFailed", 3))
    assert "could not be made" in frame and "face not found" in frame and "req-7" in frame
    assert "Traceback" not in frame and "{" not in frame
    cancelled = ui.StatusBoard("local").failed("Stopped.", kind="JobCancelled")
    assert "Cancelled" in cancelled


# ----------------------------------------------------------------------------- history


def _done(rid: str, path: Path) -> Done:
    return Done("wavespeed", rid, path, 6.5, {}, 30.0)


def test_session_history_is_newest_first_without_duplicates_and_bounded(tmp_path):
    history: list[dict] = []
    for i in range(ui.SESSION_HISTORY_MAX + 3):
        p = tmp_path / f"{i}.mp4"
        p.write_bytes(b"x")
        history = ui.add_to_history(history, ui.history_entry(_done(f"r{i}", p), tier="standard", version="v1",
                                                              cost_usd=0.5, now=0))
    assert history[0]["request_id"] == f"r{ui.SESSION_HISTORY_MAX + 2}"
    oldest = history[-1]
    history = ui.add_to_history(history, oldest)  # the same job again moves to the top, once
    assert len(history) == ui.SESSION_HISTORY_MAX
    assert history[0]["request_id"] == oldest["request_id"]
    assert len({h["request_id"] for h in history}) == len(history)
    assert ui.add_to_history(history, None) == history
    choices = ui.history_choices(history)
    assert choices[0][1] == f"wavespeed:{oldest['request_id']}"
    assert "WaveSpeed" in choices[0][0] and "6.5 s" in choices[0][0]
    video, download = ui.play_from_history(choices[0][1], history)
    assert video == oldest["path"] and download["visible"] is True


def test_history_entries_hold_no_key_and_skip_vanished_files(tmp_path):
    entry = ui.history_entry(_done("r1", tmp_path / "gone.mp4"), tier="pro", version="v1", cost_usd=None)
    assert not any("key" in k for k in entry)
    assert ui.history_choices([entry]) == []
    assert ui.play_from_history("wavespeed:r1", [entry]) == ({"__type__": "update"}, {"__type__": "update"})


# ----------------------------------------------------------------------------- handlers (no server)


async def _running_job(h, provider, request_id, owner=None):
    """A job in the app's registry whose events never end until it is cancelled."""
    from avatar_core.events import Submitted

    async def events():
        yield Submitted(provider, request_id, None, 0.0)
        await asyncio.sleep(3600)

    job = h.running.start(events(), owner=owner)
    for _ in range(100):
        if h.running.find(provider, request_id):
            return job
        await asyncio.sleep(0.01)
    raise AssertionError("the job never registered")


async def test_stop_message_is_honest_about_providers_that_cannot_cancel():
    h = ui.Handlers(Settings())
    job = await _running_job(h, "wavespeed", "req-9")
    text = await h.stopped("wavespeed", "req-9")
    assert "cannot cancel" in text and "req-9" in text and "billed" in text
    assert job.task.done() and h.running.find("wavespeed", "req-9") is None
    assert "nothing was charged" in await h.stopped("segmind", "")
    assert "not running in this app for you" in await h.stopped("wavespeed", "req-9")


async def test_a_watcher_leaving_detaches_a_submitted_job_but_cancels_an_unsubmitted_one():
    h = ui.Handlers(Settings())
    job = await _running_job(h, "fal", "req-1")
    watcher = job.follow()
    assert (await watcher.__anext__()).request_id == "req-1"
    await watcher.aclose()  # the page closed
    await asyncio.sleep(0.05)
    assert not job.task.done(), "a submitted job must keep running for its owner's history"
    assert await h.running.cancel("fal", "req-1", owner="someone-else") is False
    assert await h.running.cancel("fal", "req-1", owner=None) is True and job.task.done()

    started = asyncio.Event()

    async def uploading():
        started.set()
        await asyncio.sleep(3600)
        yield None

    early = h.running.start(uploading(), owner=None)
    watcher = early.follow()
    pending = asyncio.ensure_future(watcher.__anext__())
    await started.wait()
    pending.cancel()
    await asyncio.sleep(0.05)
    assert early.task.done(), "nothing was submitted, so nothing is kept running"


def test_image_check_shows_the_face_and_plain_words(tmp_path):
    h = ui.Handlers(Settings(output_dir=tmp_path))
    preview, words = h.check_image(str(EXAMPLES / "portrait.jpg"), "")
    assert preview is not None and "Face found" in words
    none, words = h.check_image(None, "  ")
    assert none is None and words == ""


def test_image_check_problems_are_sentences_not_tracebacks(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    h = ui.Handlers(Settings(output_dir=tmp_path))
    preview, words = h.check_image(str(bad), "")
    assert preview is None and words.startswith("**Problem:**") and "Traceback" not in words


def test_audio_check_reports_duration_and_feeds_the_cost(tmp_path):
    h = ui.Handlers(Settings(output_dir=tmp_path))
    wave, words, seconds = h.check_audio(str(EXAMPLES / "voice.mp3"), "", "wavespeed", "standard", "", False)
    assert wave and Path(wave).is_file()
    assert seconds == pytest.approx(6.5, abs=0.1)
    assert "**6.5 s** of audio, sent as MP3" in words


async def test_generate_without_inputs_asks_for_them(tmp_path):
    h = ui.Handlers(Settings(output_dir=tmp_path))
    frames = [f async for f in h.generate(None, None, "wavespeed", "standard", "", "", "", "", "")]
    status, rid, video, job = frames[-1]
    assert "Add a portrait and a voice clip" in status and video is None and rid == "" and job is None


async def test_generate_rejects_unknown_provider_in_words(tmp_path):
    h = ui.Handlers(Settings(output_dir=tmp_path))
    frames = [f async for f in h.generate(str(EXAMPLES / "portrait.jpg"), str(EXAMPLES / "voice.mp3"), "dall-e")]
    assert "Unknown provider" in frames[-1][0]


async def test_generate_turns_a_bug_into_a_friendly_message_without_the_key(tmp_path, monkeypatch, caplog):
    h = ui.Handlers(Settings(output_dir=tmp_path))

    async def boom(*args, **kwargs):
        raise RuntimeError("exploded with key sk-user-SECRET-1 inside")
        yield  # pragma: no cover

    monkeypatch.setattr(h, "_generate", boom)
    frames = [f async for f in h.generate("a.jpg", "b.mp3", "wavespeed", api_key="sk-user-SECRET-1")]
    status = frames[-1][0]
    assert "Something went wrong inside this app" in status and "RuntimeError" in status
    assert "sk-user-SECRET-1" not in status
    assert "sk-user-SECRET-1" not in caplog.text and "exploded" in caplog.text


async def test_log_lines_during_a_request_lose_the_users_key(tmp_path, monkeypatch):
    import io
    import logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("test_app_ui.redaction")
    logger.addHandler(handler)
    logger.propagate = False
    ui.install_log_redaction(Settings(segmind_api_key=Secret("sg-server-KEY-55")), logger)
    h = ui.Handlers(Settings(output_dir=tmp_path))

    async def echoing_provider(*args, **kwargs):
        logger.warning("provider said: invalid key ws-user-KEY-77 (server key sg-server-KEY-55)")
        try:
            raise ValueError("bad ws-user-KEY-77")
        except ValueError:
            logger.exception("and a traceback")
        yield ("status", "", None, None)

    monkeypatch.setattr(h, "_generate", echoing_provider)
    frames = [f async for f in h.generate("a.jpg", "b.mp3", "wavespeed", api_key="ws-user-KEY-77")]
    logger.warning("after the request ws-user-KEY-77 is no longer known")
    text = stream.getvalue()
    assert frames and "provider said: invalid key **** (server key ****)" in text
    assert "bad ****" in text and "ValueError" in text
    assert text.count("ws-user-KEY-77") == 1  # only the line logged outside the request


# ----------------------------------------------------------------------------- visitors and history


class _Req:
    def __init__(self, username=None, session_hash=None):
        self.username, self.session_hash = username, session_hash


def test_owner_is_the_user_then_the_browser_then_the_session():
    vid = ui.new_visitor_id()
    assert ui.owner_for(_Req("ann", "s1"), vid) == "user:ann"
    assert ui.owner_for(_Req(None, "s1"), vid) == f"browser:{vid}"
    assert ui.owner_for(_Req(None, "s1"), "short") == "session:s1"
    assert ui.owner_for(_Req(None, "s1"), None) == "session:s1"
    a, b = ui.owner_for(_Req(), None), ui.owner_for(_Req(), None)
    assert a.startswith("nobody:") and a != b  # never a shared bucket
    assert ui.owner_for(None, vid) is None  # code calling directly: the CLI's own jobs
    assert ui.ensure_visitor(vid) == (vid, vid)
    fresh, same = ui.ensure_visitor("not-an-id")
    assert fresh == same and ui.VISITOR_ID.fullmatch(fresh) and fresh != ui.ensure_visitor(None)[0]


def test_the_visitor_key_survives_restarts_and_is_private(tmp_path):
    settings = Settings(output_dir=tmp_path)
    first = ui.visitor_secret(settings)
    assert ui.visitor_secret(settings) == first and len(first) >= 32
    assert (tmp_path / ui.VISITOR_SECRET_FILE).stat().st_mode & 0o077 == 0
    blocked = ui.private_files(settings)
    assert str((tmp_path / ui.VISITOR_SECRET_FILE).resolve()) in blocked
    assert str((tmp_path / "jobs.sqlite3").resolve()) in blocked


def _record(store, rid, *, status, owner="browser:x", provider="wavespeed", video=None, error=None):
    store.record_submitted(provider=provider, request_id=rid, model="m", tier="pro", version="v1", prompt="",
                           image_name="face.png", audio_name="voice.wav", audio_seconds=12.5,
                           estimated_cost_usd=1.44, owner=owner)
    if status != "submitted":
        store.update(provider, rid, status=status, output_path=video, error=error)
    return store.get(provider, rid)


def test_history_views_show_every_fact_and_offer_only_unfinished_jobs(tmp_path):
    from avatar_core.store import JobStore

    store = JobStore(tmp_path / "jobs.sqlite3")
    video = tmp_path / "v.mp4"
    video.write_bytes(b"\0" * 10)
    done = _record(store, "r-done", status="completed", video=str(video))
    running = _record(store, "r-run", status="processing")
    failed = _record(store, "r-fail", status="failed", error="The safety filter refused the image.")
    waited = _record(store, "r-wait", status="timed_out")
    records = [done, running, failed, waited]
    rows = ui.history_table(records)
    assert rows[0][1:] == ["WaveSpeed", "pro", "12.5 s", "$1.44", "done", "r-done"]
    assert rows[2][5] == "failed: The safety filter refused the image."
    assert rows[3][5] == "stopped waiting (may still finish)"
    gallery = ui.history_gallery(records)
    assert gallery == [(str(video), ui.job_caption(done))]
    assert all(w in gallery[0][1] for w in ("WaveSpeed", "pro", "12.5 s", "$1.44", "done", "r-done"))
    assert [key for _, key in ui.resumable_choices(records)] == ["wavespeed:r-run", "wavespeed:r-wait"]
    video.unlink()
    assert ui.history_gallery(records) == []  # deleted by retention: the row stays, the tile goes
    assert "2 earlier jobs have not finished" in ui.unfinished_notice(2) and ui.unfinished_notice(0) == ""


def test_show_history_is_per_visitor(tmp_path):
    from avatar_core.store import JobStore

    store = JobStore(tmp_path / "jobs.sqlite3")
    vid_a, vid_b = ui.new_visitor_id(), ui.new_visitor_id()
    _record(store, "a-1", status="processing", owner=f"browser:{vid_a}")
    _record(store, "b-1", status="processing", owner=f"browser:{vid_b}")
    h = ui.Handlers(Settings(output_dir=tmp_path), store=store)
    _gallery, table, pick, note, banner, button = h.show_history(vid_a, _Req(None, "s"))
    assert button["interactive"] is True
    assert [r[-1] for r in table] == ["a-1"] and pick["value"] == "wavespeed:a-1"
    assert "Only you can see them" in note and "1 earlier job has not finished" in banner
    assert [j["request_id"] for j in h.history_api(vid_b, _Req(None, "s"))] == ["b-1"]
    assert h.history_api(None, None) == []  # no request, no visitor: nothing


async def test_resume_handler_explains_what_it_cannot_do(tmp_path):
    from avatar_core.store import JobStore

    store = JobStore(tmp_path / "jobs.sqlite3")
    _record(store, "theirs", status="processing", owner="browser:someone")
    h = ui.Handlers(Settings(output_dir=tmp_path), store=store)
    frames = [f async for f in h.resume("local", "x", "", None, _Req(None, "s"))]
    assert "Pick the provider the job was sent to" in frames[-1][0]
    frames = [f async for f in h.resume("wavespeed", "theirs", "", None, _Req(None, "s"))]
    assert "started by someone else" in frames[-1][0] and frames[-1][2] is None
    frames = [f async for f in h.resume_selected(None, "", None, _Req(None, "s"))]
    assert "Pick a job to resume" in frames[-1][0]


def test_startup_applies_retention_and_lists_unfinished_jobs(tmp_path, caplog):
    import logging
    import time as _time

    from avatar_core.store import JobStore

    store = JobStore(tmp_path / "jobs.sqlite3")
    old, running = tmp_path / "old.mp4", tmp_path / "running.mp4"
    old.write_bytes(b"0" * 100)
    running.write_bytes(b"0" * 100)
    _record(store, "r-old", status="completed", video=str(old))
    _record(store, "r-run", status="processing", video=str(running))
    _record(store, "r-local", status="processing", provider="local")
    # Make the finished job 40 days old.
    with store._write() as conn:
        conn.execute("UPDATE jobs SET finished_at = ?, created_at = ? WHERE request_id = 'r-old'",
                     (_time.time() - 40 * 86400, _time.time() - 40 * 86400))
    settings = Settings(output_dir=tmp_path, retention_days=30, retention_max_mb=None)
    with caplog.at_level(logging.INFO, logger="avatar_core.ui"):
        text = ui.startup_upkeep(store, settings)
    assert not old.exists() and running.exists(), "retention removes old videos, never a running job's"
    assert store.get("wavespeed", "r-old").output_path is None  # the row stays
    assert text.startswith("1 unfinished job(s)") and "wavespeed:r-run" in text and "r-local" not in text
    assert "wavespeed:r-run" in caplog.text
    assert ui.startup_upkeep(None, settings).startswith("job history unavailable")
    assert ui.apply_retention(store, Settings(output_dir=tmp_path, retention_days=None, retention_max_mb=None)) == 0


async def test_resuming_a_job_this_app_already_follows_does_not_poll_it_twice(tmp_path):
    h = ui.Handlers(Settings(output_dir=tmp_path, wavespeed_api_key=Secret("k-1234")))
    job = await _running_job(h, "wavespeed", "r-live")
    frames = [f async for f in h.resume("wavespeed", "r-live", "", None, _Req(None, "s"))]
    assert "Still running here" in frames[-1][0] and frames[-1][2] is None
    assert not job.task.done()
    job.task.cancel()
