"""A corpus of bad input through the app's own handlers, the command line and a launched app.

Every case must end in a message that names the problem and says what to do, never a
traceback, and nothing may be submitted to a provider. After the corpus the app still
makes a video. Links to ``file:``, loopback, private and link-local addresses are
refused, also when a public-looking link redirects there; the redirecting host is a
test server on 127.0.0.1 that the fetcher's test seams (``resolver``, ``transport``,
see avatar_core/media/fetch.py) present as a public host, while every later hop is
checked for real.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import httpcore
import httpx
import pytest
from PIL import Image

import avatar_core.media.inputs as inputs_mod
from avatar_core.config import Secret, load_settings
from avatar_core.emulator import Emulator, tone_video_maker
from avatar_core.media import fetch as fetch_mod
from avatar_core.media.inputs import LINK_ONLY_WEB
from avatar_core.ui import Handlers
from media_factory import (LocalServer, make_image, make_png_bomb, make_portrait, make_silence, make_tone,
                           make_video_with_audio)
from tests.helpers import free_port as _free_port

ROOT = Path(__file__).resolve().parent.parent
WS_KEY = "ws-bad-input-key-3141"
PUBLIC_HOST = "files.example.com"  # presented as public; served by a LocalServer
PUBLIC_IP = "93.184.216.34"  # what the fake resolver says PUBLIC_HOST is (never contacted)
CONTROL_PROMPT = "smile\x00 and\x1b[31m nod\x07\x08\r\x7f\u200b\u202e gently\x0c"
CLEANED_PROMPT = "smile and [31m nod gently"  # what clean_prompt makes of it
LONG_PROMPT = "a" * 10_000


# ----------------------------------------------------------------------------- the corpus


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    return make_portrait(d / "face.jpg", "JPEG", size=(480, 600)), make_tone(d / "voice.mp3", "mp3", 2.5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, good):
    d = tmp_path_factory.mktemp("bad")
    image, _ = good
    (d / "empty.jpg").write_bytes(b"")
    (d / "truncated.jpg").write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    (d / "notes.png").write_text("Shopping list: eggs, milk.\n")
    make_png_bomb(d / "bomb.png")
    Image.new("RGB", (1, 1), (90, 80, 70)).save(d / "dot.png")
    make_image(d / "banner.png", "PNG", (4000, 400))
    (d / "empty.mp3").write_bytes(b"")
    make_silence(d / "silent.wav", "wav", 3.0)
    make_tone(d / "blip.wav", "wav", 0.5)
    make_tone(d / "speech400.wav", "wav", 400.0, sample_rate=8000)
    (d / "corrupt.mp3").write_bytes(b"ID3\x03\x00\x00\x00\x00\x00\x00" + os.urandom(6000))
    make_video_with_audio(d / "mute.mp4", 3.0, audio=False)
    make_image(d / "photo.png", "PNG", (480, 600))  # a portrait dropped on the voice field
    return d


# (file, expected words) — each names the problem and what to do.
BAD_IMAGES = [
    ("empty.jpg", ["empty.jpg is empty (0 bytes)", "Choose the photo again"]),
    ("truncated.jpg", ["truncated.jpg is damaged or incomplete", "export it again"]),
    ("notes.png", ["notes.png is not an image we can read", "Use a JPEG, PNG"]),
    ("bomb.png", ["bomb.png claims to be far too large", "Resize it"]),
    ("dot.png", ["too small (1 x 1 px)", "use a larger photo"]),
    ("banner.png", ["too wide (4000 x 400 px", "crop it closer to the face"]),
]
BAD_AUDIO = [
    ("empty.mp3", ["empty.mp3 is empty (0 bytes)", "Record or export it again"]),
    ("silent.wav", ["The audio is silent", "choose another recording"]),
    ("blip.wav", ["too short (0.5 s)", "at least 2 s", "record a longer sentence"]),
    ("speech400.wav", ["too long (400.0 s)", "at most 300 s", "cut it into shorter parts"]),
    ("corrupt.mp3", ["corrupt.mp3 is not an audio file we can read", "Use MP3, WAV"]),
    ("mute.mp4", ["video has no sound track (mute.mp4)", "Choose a voice recording"]),
    ("photo.png", ["photo.png is a picture, not a sound file", "Put it in the portrait field",
                   "choose a voice recording"]),
]
PRIVATE = "a local or private network address, which this app does not fetch from. Use a public link, or upload"
BAD_URLS = [
    ("file:///etc/passwd", ["Only web links starting with http:// or https://", "'file:'", "upload the file instead"]),
    ("http://127.0.0.1:{port}/face.jpg", ["points to 127.0.0.1, " + PRIVATE]),
    ("http://10.0.0.1/face.jpg", ["points to 10.0.0.1, " + PRIVATE]),
    ("http://169.254.169.254/latest/meta-data/", ["points to 169.254.169.254, " + PRIVATE]),
    ("http://[::1]:{port}/face.jpg", ["points to ::1, " + PRIVATE]),
    ("http://localhost:{port}/face.jpg", ["points to localhost", PRIVATE]),
]
# Where a "public" link redirects to: all must be refused before any connection.
REDIRECT_TARGETS = [
    "http://127.0.0.1:{port}/face.jpg",
    "http://localhost:{port}/face.jpg",
    "http://[::1]:{port}/face.jpg",
    "http://10.0.0.1/face.jpg",
    "http://169.254.169.254/latest/meta-data/",
    "file:///etc/passwd",
]


def _unmd(text: str) -> str:
    """Markdown as read (the app escapes [ ] < > * ` \\ so text shows literally)."""
    return text.replace("\\", "")


def _assert_says(text: str, words: list[str]) -> None:
    plain = _unmd(text)
    for w in words:
        assert w in plain, f"{w!r} not in {plain!r}"
    assert "Traceback" not in plain and "Something went wrong inside this app" not in plain


# ----------------------------------------------------------------------------- the public-looking host


class _PinnedBackend(httpcore.NetworkBackend):
    """Connects PUBLIC_HOST to 127.0.0.1; every other host as asked."""

    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        return self._inner.connect_tcp("127.0.0.1" if host == PUBLIC_HOST else host, port, timeout=timeout,
                                       local_address=local_address, socket_options=socket_options)

    def sleep(self, seconds):  # pragma: no cover
        self._inner.sleep(seconds)


def pinned_transport() -> httpx.HTTPTransport:
    transport = httpx.HTTPTransport(retries=0)
    transport._pool._network_backend = _PinnedBackend(transport._pool._network_backend)
    return transport


def fake_resolver(host: str, port: int) -> list[str]:
    """PUBLIC_HOST is public; everything else resolves for real (and is judged for real)."""
    return [PUBLIC_IP] if host == PUBLIC_HOST else fetch_mod.system_resolver(host, port)


@pytest.fixture(scope="module")
def files(good):
    """A file host on 127.0.0.1: /face.jpg, /voice.mp3 and /go?to=... redirects."""
    image, audio = good
    routes = {
        "/face.jpg": (200, {"Content-Type": "image/jpeg"}, image.read_bytes()),
        "/voice.mp3": (200, {"Content-Type": "audio/mpeg"}, audio.read_bytes()),
    }
    with LocalServer(routes) as server:
        for i, target in enumerate(REDIRECT_TARGETS):
            server.routes[f"/go{i}"] = (302, {"Location": target.format(port=server.port)}, b"")
        yield server


@pytest.fixture
def public_host(monkeypatch):
    """Let the handlers reach PUBLIC_HOST (the first hop only) through the fetcher's seams."""
    real_fetch = fetch_mod.fetch

    def fetch(url, **kw):
        return real_fetch(url, **{**kw, "resolver": fake_resolver, "transport": pinned_transport()})

    monkeypatch.setattr(inputs_mod, "fetch", fetch)


# ----------------------------------------------------------------------------- handlers


@pytest.fixture(scope="module")
def emu():
    with Emulator(queue_s=0.1, processing_s=0.3, video_maker=tone_video_maker,
                  api_keys={"wavespeed": WS_KEY}) as e:
        yield e


@pytest.fixture
def handlers(emu, tmp_path):
    emu.reset()
    settings = replace(load_settings(env={}, dotenv_path=None), output_dir=tmp_path / "out",
                       wavespeed_api_key=Secret(WS_KEY), wavespeed_base_url=emu.url, poll_typical_s=1.0)
    return Handlers(settings)


async def _generate(h: Handlers, **kw) -> list[tuple]:
    params = {"provider": "wavespeed", "tier": "standard", **kw}
    return [frame async for frame in h.generate(**params)]


def _no_submit(emu) -> None:
    assert not emu.requests_to("POST", r"^/api/v3/"), "something was sent to the provider"


@pytest.mark.parametrize("name, words", BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
async def test_bad_image_through_the_handlers(handlers, emu, corpus, good, name, words):
    preview, text = handlers.check_image(str(corpus / name), "")
    assert preview is None and text.startswith("**Problem:**")
    _assert_says(text, words)
    frames = await _generate(handlers, image=str(corpus / name), audio=str(good[1]))
    status, _rid, video, _job = frames[-1]
    assert video is None and "could not be made" in status
    _assert_says(status, words)
    _no_submit(emu)


@pytest.mark.parametrize("name, words", BAD_AUDIO, ids=[c[0] for c in BAD_AUDIO])
async def test_bad_audio_through_the_handlers(handlers, emu, corpus, good, name, words):
    wave, text, seconds = handlers.check_audio(str(corpus / name), "", "wavespeed", "standard", "", False)
    assert wave is None and seconds is None and text.startswith("**Problem:**")
    _assert_says(text, words)
    frames = await _generate(handlers, image=str(good[0]), audio=str(corpus / name))
    status, _rid, video, _job = frames[-1]
    assert video is None and "could not be made" in status
    _assert_says(status, words)
    _no_submit(emu)


@pytest.mark.parametrize("url, words", BAD_URLS, ids=[c[0].split(":")[0] + str(i) for i, c in enumerate(BAD_URLS)])
async def test_links_to_local_and_private_addresses_through_the_handlers(handlers, emu, files, url, words):
    url = url.format(port=files.port)
    if url.startswith("file:"):  # link text that is not http(s): the one fixed answer (the CLI names the scheme)
        words = [LINK_ONLY_WEB]
    before = len(files.hits)
    _preview, text = handlers.check_image(None, url)
    _assert_says(text, words)
    _wave, text, _s = handlers.check_audio(None, url.replace("face.jpg", "voice.mp3"), "wavespeed", "standard", "", False)
    _assert_says(text, words)
    frames = await _generate(handlers, image_url=url, audio_url=url.replace("face.jpg", "voice.mp3"))
    _assert_says(frames[-1][0], words)
    assert files.hits[before:] == [], "the app connected to a private address"
    _no_submit(emu)


async def test_the_public_host_seam_lets_only_the_first_hop_through(handlers, emu, files, public_host):
    """Control: the public-looking link itself works, so the refusals below are about the redirect."""
    preview, text = handlers.check_image(None, f"http://{PUBLIC_HOST}:{files.port}/face.jpg")
    assert preview is not None and "480×600 px" in text, text


@pytest.mark.parametrize("i", range(len(REDIRECT_TARGETS)), ids=[t.split(":")[0] + str(i) for i, t in
                                                                  enumerate(REDIRECT_TARGETS)])
async def test_a_public_link_redirecting_to_a_private_address_is_refused(handlers, emu, files, public_host, i):
    url = f"http://{PUBLIC_HOST}:{files.port}/go{i}"
    target = REDIRECT_TARGETS[i]
    words = ["Only web links starting with http:// or https://"] if target.startswith("file:") else [PRIVATE]
    before = len(files.hits)
    _preview, text = handlers.check_image(None, url)
    _assert_says(text, words)
    frames = await _generate(handlers, image_url=url, audio=None, audio_url=f"http://{PUBLIC_HOST}:{files.port}/voice.mp3")
    _assert_says(frames[-1][0], words)
    # Only the redirect was fetched (twice: check and generate); never its target.
    assert files.hits[before:] == [f"/go{i}", f"/go{i}"], files.hits[before:]
    _no_submit(emu)


async def test_an_overlong_prompt_is_refused_before_anything_is_sent(handlers, emu, good):
    frames = await _generate(handlers, image=str(good[0]), audio=str(good[1]), prompt=LONG_PROMPT, api_key=WS_KEY)
    _assert_says(frames[-1][0], ["The prompt is 10000 characters long; the limit is 2500", "Shorten it"])
    assert frames[-1][2] is None
    _no_submit(emu)
    assert not emu.requests_to(None, r"/media/upload"), "inputs were uploaded for a job that cannot run"


async def test_control_characters_never_reach_the_provider(handlers, emu, good):
    frames = await _generate(handlers, image=str(good[0]), audio=str(good[1]), prompt=CONTROL_PROMPT, api_key=WS_KEY)
    assert "Done in" in frames[-1][0], frames[-1][0]
    submits = emu.requests_to("POST", r"^/api/v3/kwaivgi/")
    assert len(submits) == 1 and submits[0].json["prompt"] == CLEANED_PROMPT


async def test_the_handlers_still_make_a_video_after_the_corpus(handlers, emu, corpus, good):
    for name, _ in BAD_IMAGES:
        await _generate(handlers, image=str(corpus / name), audio=str(good[1]))
    frames = await _generate(handlers, image=str(good[0]), audio=str(good[1]), api_key=WS_KEY)
    status, rid, video, _job = frames[-1]
    assert "Done in" in status and rid and Path(video).is_file()


# ----------------------------------------------------------------------------- the command line


def run_cli(args: list[str], tmp_path: Path, env_extra: dict | None = None, *, code: str | None = None):
    env = {k: v for k, v in os.environ.items() if not k.endswith(("_KEY", "_TOKEN"))}
    env.update({"AVATAR_OUTPUT_DIR": str(tmp_path / "out"), "AVATAR_POLL_TYPICAL_S": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **(env_extra or {})})
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "avatar_core", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def _assert_cli_refused(proc, words: list[str]) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for w in words:
        assert w in errors[0], f"{w!r} not in {errors[0]!r}"
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize("name, words", BAD_IMAGES + BAD_AUDIO, ids=[c[0] for c in BAD_IMAGES + BAD_AUDIO])
def test_bad_files_through_the_cli(corpus, good, tmp_path, name, words):
    is_image = any(name == c[0] for c in BAD_IMAGES)
    image, audio = (corpus / name, good[1]) if is_image else (good[0], corpus / name)
    proc = run_cli(["generate", "--provider", "local", "--image", str(image), "--audio", str(audio)], tmp_path)
    _assert_cli_refused(proc, words)
    assert not list((tmp_path / "out").glob("videos/*.mp4"))


@pytest.mark.parametrize("url, words", BAD_URLS, ids=[c[0].split(":")[0] + str(i) for i, c in enumerate(BAD_URLS)])
def test_links_to_local_and_private_addresses_through_the_cli(good, files, tmp_path, url, words):
    url = url.format(port=files.port)
    before = len(files.hits)
    proc = run_cli(["generate", "--provider", "local", "--image", url, "--audio", str(good[1])], tmp_path)
    _assert_cli_refused(proc, words)
    assert files.hits[before:] == []


# The CLI with the same seam as the `public_host` fixture, set up before main() runs.
_CLI_WITH_PUBLIC_HOST = """
import sys
import test_bad_input as t
import avatar_core.media.inputs as inputs_mod
from avatar_core.media import fetch as fetch_mod
from avatar_core.media.inputs import LINK_ONLY_WEB
real = fetch_mod.fetch
inputs_mod.fetch = lambda url, **kw: real(url, **{**kw, "resolver": t.fake_resolver, "transport": t.pinned_transport()})
from avatar_core.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("i", [0, 1, 3, 4])
def test_a_public_link_redirecting_to_a_private_address_through_the_cli(good, files, tmp_path, i):
    before = len(files.hits)
    url = f"http://{PUBLIC_HOST}:{files.port}/go{i}"
    proc = run_cli(["generate", "--provider", "local", "--image", url, "--audio", str(good[1])], tmp_path,
                   code=_CLI_WITH_PUBLIC_HOST)
    _assert_cli_refused(proc, [PRIVATE])
    assert files.hits[before:] == [f"/go{i}"]


def test_the_cli_seam_lets_the_public_host_through(good, files, tmp_path):
    """Control for the test above: without a redirect the same link makes a video."""
    url = f"http://{PUBLIC_HOST}:{files.port}/face.jpg"
    proc = run_cli(["generate", "--provider", "local", "--image", url, "--audio", str(good[1])], tmp_path,
                   code=_CLI_WITH_PUBLIC_HOST)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip().splitlines()[-1]).is_file()


def test_prompts_through_the_cli(emu, good, tmp_path):
    emu.reset()
    env = {"WAVESPEED_BASE_URL": emu.url, "WAVESPEED_API_KEY": WS_KEY}
    base = ["generate", "--provider", "wavespeed", "--image", str(good[0]), "--audio", str(good[1])]
    proc = run_cli([*base, "--prompt", LONG_PROMPT], tmp_path, env)
    _assert_cli_refused(proc, ["The prompt is 10000 characters long; the limit is 2500", "Shorten it"])
    _no_submit(emu)
    proc = run_cli([*base, "--prompt", CONTROL_PROMPT.replace("\x00", "")], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    submits = emu.requests_to("POST", r"^/api/v3/kwaivgi/")
    assert len(submits) == 1 and submits[0].json["prompt"] == CLEANED_PROMPT
    assert "\x1b" not in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- a launched app



@pytest.fixture(scope="module")
def launched(tmp_path_factory, files):
    from gradio_client import Client

    import app

    out = tmp_path_factory.mktemp("launched-out")
    settings = load_settings(env={"AVATAR_OUTPUT_DIR": str(out)}, dotenv_path=None)
    demo = app.build_demo(settings)
    port = _free_port()
    app.launch(demo, settings, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        demo.close()


LAUNCHED_CASES = [
    pytest.param("image", "bomb.png", BAD_IMAGES[3][1], id="bomb"),
    pytest.param("image", "truncated.jpg", BAD_IMAGES[1][1], id="truncated"),
    pytest.param("audio", "corrupt.mp3", BAD_AUDIO[4][1], id="corrupt-mp3"),
    pytest.param("audio", "speech400.wav", BAD_AUDIO[3][1], id="400s"),
    pytest.param("image_url", "file:///etc/passwd", [LINK_ONLY_WEB], id="file-url"),
    pytest.param("image_url", "http://169.254.169.254/latest/meta-data/", BAD_URLS[3][1], id="metadata-url"),
    pytest.param("image_url", "{files}/face.jpg", ["points to 127.0.0.1, " + PRIVATE], id="loopback-url"),
    pytest.param("prompt", LONG_PROMPT, ["The prompt is 10000 characters long"], id="long-prompt"),
]


@pytest.mark.slow
@pytest.mark.parametrize("field, value, words", LAUNCHED_CASES)
def test_bad_input_through_a_launched_app(launched, corpus, good, files, field, value, words):
    from gradio_client import handle_file

    _url, client = launched
    params = {"image": handle_file(str(good[0])), "audio": handle_file(str(good[1])), "prompt": ""}
    if field in ("image", "audio"):
        params[field] = handle_file(str(corpus / value))
    elif field == "image_url":
        params.update(image=None, image_url=value.format(files=files.url("").rstrip("/")))
    else:
        params[field] = value
    before = len(files.hits)
    status, _rid, video = client.predict(provider="local", tier="standard", api_key="", api_name="/generate", **params)
    assert video is None
    _assert_says(status, words)
    assert files.hits[before:] == []


@pytest.mark.slow
def test_the_launched_app_still_serves_after_the_bad_input(launched, good):
    from gradio_client import handle_file

    url, client = launched
    status, rid, video = client.predict(image=handle_file(str(good[0])), audio=handle_file(str(good[1])),
                                        provider="local", tier="standard", prompt=CONTROL_PROMPT.replace("\x00", ""),
                                        api_key="", api_name="/generate")
    assert "Done in" in status and rid and video, status
    assert httpx.get(url, timeout=10).status_code == 200


# Emoji sequences are joined by U+200D and shaped by variation selectors; subdivision flags
# by tag characters. None of them is a control character, so none may become a space.
EMOJI_PROMPT = ("A 👨\u200d👩\u200d👧 family waves ❤\ufe0f, a 👩🏽\u200d🚀 nods under "
                "🏴\U000E0067\U000E0062\U000E0065\U000E006E\U000E0067\U000E007F")


async def test_emoji_sequences_reach_the_provider_intact(handlers, emu, good):
    frames = await _generate(handlers, image=str(good[0]), audio=str(good[1]),
                             prompt=EMOJI_PROMPT + "\x07\u202e", api_key=WS_KEY)
    assert "Done in" in frames[-1][0], frames[-1][0]
    submits = emu.requests_to("POST", r"^/api/v3/kwaivgi/")
    assert submits[-1].json["prompt"] == EMOJI_PROMPT  # the bell and the bidi override are gone


# Invisible format characters pasted inside words (a soft hyphen, LRM/RLM, a word joiner,
# a BOM, a zero-width space): dropped, not turned into spaces that split the words.
FORMAT_PROMPT = ("\ufeffA cheer\u00adful wave, then a gen\u2060tle nod for \u200eAl\u200fice\u200b, "
                 "👩\u200d💻 typing\x1bon")


async def test_invisible_format_characters_do_not_split_words_on_the_wire(handlers, emu, good):
    frames = await _generate(handlers, image=str(good[0]), audio=str(good[1]), prompt=FORMAT_PROMPT, api_key=WS_KEY)
    assert "Done in" in frames[-1][0], frames[-1][0]
    sent = emu.requests_to("POST", r"^/api/v3/kwaivgi/")[-1].json["prompt"]
    # Words whole, the emoji's joiner kept, the escape (a control character) still a space.
    assert sent == "A cheerful wave, then a gentle nod for Alice, 👩\u200d💻 typing on"


# A pasted key with a Cyrillic look-alike (position 3), a zero-width space that strip()
# keeps (position 7), or a line break inside a two-part fal.ai key (position 10).
BAD_KEYS = [("wavespeed", "ws\u0430-bad-input-key", 3), ("wavespeed", "ws-bad\u200b-input-key-3141", 7),
            ("fal", "fal-id-12\r\nX-Injected: 1:secret", 10), ("kling", "access\u00e9:secret-key-123", 7)]


@pytest.mark.parametrize("provider,key,position", BAD_KEYS)
async def test_a_typed_key_with_a_character_no_key_can_hold_is_refused_first(emu, tmp_path, good, provider, key,
                                                                           position):
    emu.reset()
    settings = replace(load_settings(env={}, dotenv_path=None), output_dir=tmp_path / "out",
                       wavespeed_base_url=emu.url, fal_base_url=emu.url, kling_base_url=emu.url, poll_typical_s=1.0)
    h = Handlers(settings)
    frames = await _generate(h, provider=provider, image=str(good[0]), audio=str(good[1]), api_key=key)
    status = frames[-1][0]
    assert (f"contains a character that cannot be part of an API key (position {position}); paste it again"
            in status), status
    assert len(frames) == 1 and "Checking your files" not in status  # refused before any input check
    assert key.strip() not in status and not any(part in status for part in key.split(":") if len(part) > 3)
    assert len(emu.requests) == 0, "nothing may reach the provider"
    # Resume refuses it the same way, before asking the provider anything.
    frames = [f async for f in h.resume(provider, "some-job-1", key, None, None)]
    assert f"(position {position})" in frames[-1][0] and len(emu.requests) == 0
