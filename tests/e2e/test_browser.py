"""The app in a real browser: Debian's Chromium driven by Playwright, server on 127.0.0.1.

Covers what only a browser shows: uploads are checked and previewed, the status panel
updates while a job runs, the finished <video> loads and is as long as the voice clip,
and a typed API key is left nowhere in the page's storage. Screenshots of the finished
page (desktop and phone width) go to tests/artifacts/ for a human to look at.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import av
import pytest

import app
from avatar_core.config import load_settings
from avatar_core.emulator import Emulator, JobPlan, tone_video_maker
from tests.corpus import cut, encode_audio, synthesise_speech
from tests.helpers import free_port as _free_port

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "examples" / "portrait.jpg"
AUDIO = ROOT / "examples" / "voice.mp3"
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic",
]
# Distinctive, so a hit in storage or HTML can only be this key.
TYPED_KEY = "ws-browser-typed-KEY-93jd7Qx"
JOB_TIMEOUT_MS = 60_000


def expect(locator):
    from playwright.sync_api import expect as _expect

    return _expect(locator)


def _need_chromium() -> None:
    if Path(CHROMIUM).exists() or shutil.which("chromium"):
        return
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing on CI: install Debian's chromium package.")
    pytest.skip(f"{CHROMIUM} is not installed")



def _audio_seconds(path: Path) -> float:
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        return sum(f.samples for f in c.decode(stream)) / stream.rate


@contextlib.contextmanager
def _launched_app(env: dict[str, str]):
    """The app with these settings on a free loopback port; yields its URL."""
    settings = load_settings(env=env, dotenv_path=None)
    demo = app.build_demo(settings)
    port = _free_port()
    app.launch(demo, settings, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("browser-outputs")
    with Emulator(queue_s=0.3, processing_s=1.5, video_maker=tone_video_maker,
                  api_keys={"wavespeed": TYPED_KEY}) as emu:
        env = {
            "WAVESPEED_BASE_URL": emu.url,
            "SEGMIND_BASE_URL": emu.url,
            "SEGMIND_UPLOAD_URL": emu.url + "/upload-asset",
            "AVATAR_OUTPUT_DIR": str(out_dir),
            "AVATAR_POLL_TYPICAL_S": "1",
        }
        with _launched_app(env) as url:
            yield url, emu


@pytest.fixture(scope="module")
def browser():
    _need_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def _open(browser, url: str, width: int = 1280, height: int = 900):
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(url)
    page.locator("#generate").wait_for()
    return context, page


def _add_inputs(page, audio: Path = AUDIO) -> None:
    page.locator("#image-input input[type=file]").set_input_files(str(IMAGE))
    page.locator("#image-notes").get_by_text("Face found").wait_for()
    page.locator("#audio-input input[type=file]").set_input_files(str(audio))
    page.locator("#audio-notes").get_by_text(re.compile("of audio")).wait_for()


def _choose_provider(page, label: str, note: str) -> None:
    page.locator("#provider input").click()
    page.get_by_role("option", name=re.compile(label)).click()
    page.locator("#provider-note").get_by_text(re.compile(note)).wait_for()


def _ready_for_wavespeed(browser, url: str):
    """A page with both inputs checked, WaveSpeed chosen and the user's own key typed in."""
    context, page = _open(browser, url)
    try:
        _add_inputs(page)
        _choose_provider(page, "WaveSpeed", "WaveSpeed")
        page.locator("#api-key input").fill(TYPED_KEY)
    except BaseException:
        context.close()
        raise
    return context, page


def _start_job(page) -> None:
    """Press Generate and wait until the provider has the job."""
    page.locator("#generate").click()
    page.locator("#status").get_by_text("Generating the video").wait_for(timeout=JOB_TIMEOUT_MS)


def _generate_and_watch(page) -> list[str]:
    """Press Generate and record every distinct status text until the job is done."""
    page.locator("#generate").click()
    seen: list[str] = []
    deadline = time.monotonic() + JOB_TIMEOUT_MS / 1000
    while time.monotonic() < deadline:
        text = page.locator("#status").inner_text()
        if not seen or text != seen[-1]:
            seen.append(text)
        if "Done in" in text or "could not be made" in text:
            break
        time.sleep(0.1)
    return seen


def _video_duration(page) -> float:
    video = page.locator("#video video")
    video.wait_for(state="attached", timeout=JOB_TIMEOUT_MS)
    return video.evaluate(
        """(el) => new Promise((resolve, reject) => {
            if (el.readyState >= 1 && isFinite(el.duration)) return resolve(el.duration);
            el.addEventListener('loadedmetadata', () => resolve(el.duration), {once: true});
            el.addEventListener('error', () => reject(new Error('video error ' + (el.error && el.error.code))), {once: true});
            el.load();
        })"""
    )


def test_make_a_local_preview_in_the_browser(server, browser):
    url, _emu = server
    context, page = _open(browser, url)
    try:
        expect_seconds = _audio_seconds(AUDIO)
        _add_inputs(page)
        assert page.locator("#image-preview img").count() == 1  # the face-check picture
        assert page.locator("#waveform img").count() == 1
        assert "free" in page.locator("#cost").inner_text()
        _choose_provider(page, "Local preview", "Offline preview")
        page.locator("#tier").get_by_text("Pro (about 1080p, slower)").click()

        statuses = _generate_and_watch(page)
        assert "Done in" in statuses[-1], statuses[-3:]
        assert len(statuses) >= 3, statuses  # it moved through stages, not straight to the end
        assert any("Rendering the preview" in s or "Waiting for the local renderer" in s for s in statuses)
        assert "Local preview, pro" in statuses[-1]

        assert _video_duration(page) == pytest.approx(expect_seconds, abs=0.1)
        page.locator("#download").wait_for(state="visible")
        page.locator("#session-videos").get_by_text(re.compile("Local preview · pro")).wait_for()
        assert "Traceback" not in page.content()

        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app_after_run.png"), full_page=True)
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / "app_after_run_phone.png"), full_page=True)
    finally:
        context.close()


# Longer than 10 s: the renderer's old timestamp bug made every clip past 10 s unplayable.
LONG_SPEECH_S = 13.0


@pytest.fixture(scope="module")
def long_speech(tmp_path_factory) -> Path:
    """13 s of real speech (espeak-ng) as an MP3, like a recorded voice clip."""
    d = tmp_path_factory.mktemp("browser-speech")
    pcm = synthesise_speech(d / "espeak.wav", LONG_SPEECH_S + 1)
    return encode_audio(d / "voice-13s.mp3", "mp3", cut(pcm, LONG_SPEECH_S))


# Plays the <video> muted (headless autoplay policy) for about 2 s of wall time.
_PLAY_FOR_2_S = """async (el) => {
    el.muted = true;
    await el.play();
    const t0 = el.currentTime, wall0 = performance.now();
    await new Promise((r) => setTimeout(r, 2000));
    const out = {t0, t1: el.currentTime, wall: (performance.now() - wall0) / 1000, paused: el.paused,
                 ended: el.ended, error: el.error && el.error.code};
    el.pause();
    return out;
}"""

# Seeks to each time, draws the shown frame to a <canvas>, and compares the pictures.
_FRAMES_AT = """async (el, times) => {
    el.pause();
    const w = el.videoWidth, h = el.videoHeight;
    const canvas = document.createElement('canvas');
    canvas.width = w; canvas.height = h;
    const ctx = canvas.getContext('2d', {willReadFrequently: true});
    const shots = [];
    for (const t of times) {
        await new Promise((resolve, reject) => {
            el.addEventListener('seeked', resolve, {once: true});
            el.addEventListener('error', () => reject(new Error('video error ' + el.error.code)), {once: true});
            el.currentTime = t;
        });
        ctx.drawImage(el, 0, 0, w, h);
        shots.push({at: el.currentTime, px: ctx.getImageData(0, 0, w, h).data});
    }
    const [a, b] = [shots[0].px, shots[1].px];
    let sumA = 0, sumB = 0, absDiff = 0, changed = 0;
    for (let i = 0; i < a.length; i += 4) {
        let d = 0;
        for (let c = 0; c < 3; c++) { sumA += a[i + c]; sumB += b[i + c]; d += Math.abs(a[i + c] - b[i + c]); }
        absDiff += d;
        if (d > 3 * 16) changed++;
    }
    const n = a.length / 4;
    return {w, h, at: shots.map((s) => s.at), meanA: sumA / (3 * n), meanB: sumB / (3 * n),
            meanAbsDiff: absDiff / (3 * n), changedShare: changed / n};
}"""


def test_a_finished_local_preview_plays_in_the_browser(server, browser, long_speech):
    """The finished preview of a 13 s voice clip plays: time runs, the picture moves, and it
    is as long as the voice."""
    url, _emu = server
    context, page = _open(browser, url)
    try:
        expect_seconds = _audio_seconds(long_speech)
        assert expect_seconds > 12
        _add_inputs(page, long_speech)
        _choose_provider(page, "Local preview", "Offline preview")
        statuses = _generate_and_watch(page)
        assert "Done in" in statuses[-1], statuses[-3:]
        video = page.locator("#video video")

        assert _video_duration(page) == pytest.approx(expect_seconds, abs=0.15)
        played = video.evaluate(_PLAY_FOR_2_S)
        assert played["error"] is None and not played["ended"], played
        assert played["t1"] - played["t0"] > 1.0, played  # it plays, not stuck on one frame
        assert played["t1"] - played["t0"] <= played["wall"] + 0.3, played  # at real speed, not skipping

        frames = video.evaluate(_FRAMES_AT, [0.3, 1.5])
        assert frames["at"] == [pytest.approx(0.3, abs=0.05), pytest.approx(1.5, abs=0.05)], frames
        assert 20 < frames["meanA"] < 235 and 20 < frames["meanB"] < 235, frames  # a picture, not black or white
        # The face moved between the two frames (head, mouth, eyes): a visible change, not codec noise.
        assert frames["meanAbsDiff"] > 1.5 and frames["changedShare"] > 0.01, frames
        # The end plays too (the old bug lost everything past 10 s).
        tail = video.evaluate(_FRAMES_AT, [expect_seconds - 2.0, expect_seconds - 0.5])
        assert tail["at"][1] == pytest.approx(expect_seconds - 0.5, abs=0.05), tail
        assert tail["meanAbsDiff"] > 1.5 and tail["changedShare"] > 0.01, tail

        video.evaluate("(el) => { el.currentTime = 1.5; }")
        page.wait_for_timeout(300)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "app_after_playing.png"), full_page=True)
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / "app_after_playing_phone.png"), full_page=True)
        assert "Traceback" not in page.content()
    finally:
        context.close()


def test_the_bundled_example_fills_and_checks_both_inputs(server, browser):
    url, _emu = server
    context, page = _open(browser, url)
    try:
        page.get_by_text("voice.mp3").click()  # a row of the examples table
        page.locator("#image-notes").get_by_text("Face found").wait_for()
        page.locator("#audio-notes").get_by_text(re.compile("of audio")).wait_for()
        assert page.locator("#image-preview img").count() == 1
    finally:
        context.close()


def test_a_typed_key_stays_out_of_browser_storage(server, browser):
    url, emu = server
    context, page = _ready_for_wavespeed(browser, url)
    try:
        emu.requests.clear()

        statuses = _generate_and_watch(page)
        assert "Done in" in statuses[-1], statuses[-3:]
        submits = emu.requests.to("POST", r"^/api/v3/kwaivgi/")
        assert len(submits) == 1 and submits[0].header("authorization") == f"Bearer {TYPED_KEY}"
        assert _video_duration(page) == pytest.approx(_audio_seconds(AUDIO), abs=0.1)
        page.wait_for_timeout(500)  # let any after-run bookkeeping in the page finish

        storage = page.evaluate(
            """() => JSON.stringify({
                local: Object.fromEntries(Object.keys(localStorage).map(k => [k, localStorage.getItem(k)])),
                session: Object.fromEntries(Object.keys(sessionStorage).map(k => [k, sessionStorage.getItem(k)])),
                cookies: document.cookie,
            })"""
        )
        assert TYPED_KEY not in storage, json.loads(storage)
        assert not any(k.startswith("gradio:run-history") for k in json.loads(storage)["local"])
        assert TYPED_KEY not in page.content()
        assert TYPED_KEY not in "\n".join(statuses)
        # After a reload the key box is empty: nothing brought it back.
        page.reload()
        page.locator("#api-key input").wait_for()
        assert page.locator("#api-key input").input_value() == ""
    finally:
        context.close()


def test_stop_ends_the_wait_and_says_what_happens_to_the_job(server, browser):
    url, emu = server
    emu.plan_jobs(JobPlan(processing_s=120))
    context, page = _ready_for_wavespeed(browser, url)
    try:
        _start_job(page)
        assert page.locator("#generate").is_disabled() and page.locator("#stop").is_enabled()
        page.locator("#stop").click()
        expect(page.locator("#status")).to_contain_text("Stopped waiting", timeout=JOB_TIMEOUT_MS)
        status = page.locator("#status").inner_text()
        request_id = page.locator("#request-id").locator("input, textarea").first.input_value()
        assert "cannot cancel" in status and request_id and request_id in status
        page.wait_for_timeout(1000)
        polls = len(emu.requests.to("GET", r"/predictions/.*/result$"))
        page.wait_for_timeout(1500)
        assert len(emu.requests.to("GET", r"/predictions/.*/result$")) == polls, "still polling after Stop"
        assert page.locator("#generate").is_enabled() and page.locator("#stop").is_disabled()
    finally:
        context.close()


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """An app whose polling plan is the real one (2-minute jobs: reads 12 s apart early on)."""
    out_dir = tmp_path_factory.mktemp("browser-slow-outputs")
    with Emulator(queue_s=0.0, processing_s=120, video_maker=tone_video_maker,
                  api_keys={"wavespeed": TYPED_KEY}) as emu:
        env = {"WAVESPEED_BASE_URL": emu.url, "AVATAR_OUTPUT_DIR": str(out_dir), "AVATAR_POLL_TYPICAL_S": "120"}
        with _launched_app(env) as url:
            yield url, emu


def _elapsed_s(page) -> int:
    text = page.locator("#status").inner_text()
    m = re.search(r"Elapsed\s+(?:(\d+) min )?(\d+) s", text)
    assert m, text
    return int(m.group(1) or 0) * 60 + int(m.group(2))


def test_the_clock_moves_between_status_reads(slow_server, browser):
    """The page ticks every second on its own; the provider is not asked any more often."""
    url, emu = slow_server
    context, page = _ready_for_wavespeed(browser, url)
    try:
        _start_job(page)
        page.wait_for_timeout(1500)  # past the first (quick) read; the next one is ~12 s away
        reads = len(emu.requests.to("GET", r"/predictions/.*/result$"))
        first = _elapsed_s(page)
        page.wait_for_timeout(4000)
        later = _elapsed_s(page)
        assert len(emu.requests.to("GET", r"/predictions/.*/result$")) == reads, "the ticks made status reads"
        assert 3 <= later - first <= 5, (first, later)
        page.locator("#status").screenshot(path=str(ARTIFACTS / "status_while_waiting.png"))
        page.locator("#stop").click()
        expect(page.locator("#status")).to_contain_text("Stopped waiting", timeout=JOB_TIMEOUT_MS)
    finally:
        context.close()


def _history_text(page) -> str:
    return page.locator("#history-table").inner_text()


def test_history_keeps_a_job_whose_page_was_closed_and_shows_it_only_to_that_browser(server, browser):
    url, emu = server
    emu.plan_jobs(JobPlan(processing_s=3.0))
    context, page = _ready_for_wavespeed(browser, url)
    try:
        _start_job(page)
        request_id = page.locator("#request-id").locator("input, textarea").first.input_value()
        assert request_id
        page.close()  # the tab closes mid-job

        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(url)
        page.locator("#generate").wait_for()
        page.get_by_role("tab", name="History").click()
        deadline = time.monotonic() + JOB_TIMEOUT_MS / 1000
        while not re.search(rf"done\s+{re.escape(request_id)}", _history_text(page)):
            assert time.monotonic() < deadline, _history_text(page)
            page.wait_for_timeout(500)
            page.locator("#history-refresh").click()
        assert "WaveSpeed" in _history_text(page) and "Only you can see them" in page.locator("#history-note").inner_text()
        page.locator("#history-gallery video").first.wait_for(state="attached")
        assert "Traceback" not in page.content()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "history_tab.png"), full_page=True)
    finally:
        context.close()

    stranger, other = _open(browser, url)
    try:
        other.get_by_role("tab", name="History").click()
        other.locator("#history-note").get_by_text("No jobs yet").wait_for()
        assert request_id not in other.content()
    finally:
        stranger.close()
