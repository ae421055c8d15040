"""The upload parameters take uploads only, as an outsider would try otherwise (issue 14 review).

``/generate``'s ``image``/``audio`` (and the same fields of the page's input checks, which
anyone can call through Gradio's queue) are Gradio upload components. Left to itself,
Gradio 6 would

* download an http(s) ``path`` (what ``gradio_client.handle_file("https://...")`` sends)
  into its cache before any handler runs: no size cap, no deadline, 20 redirects, its own
  address rules (safehttpx counts 100.64.0.0/10, e.g. 100.100.100.200, as public);
* decode an image payload's ``url: "data:..."`` into a file (no upload limit);
* take a payload without ``meta`` as it is: its ``path`` is not checked at all, so an
  image field could name any file on the server.

Each is sent here raw, over HTTP, to the launched app. The loopback web server stands
in for a public host: safehttpx (Gradio's downloader) is told it is public, and
:func:`test_the_stand_in_web_server_counts_as_public_for_gradio` proves Gradio would
fetch from it, so "the server got no request" means the app stopped it. The app's own
link rules are untouched (no AVATAR_ALLOW_PRIVATE_URLS).
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from pathlib import Path

import httpx
import media_factory as mf
import pytest
import safehttpx
from gradio_client import Client, handle_file
from media_factory import LocalServer

import app
from avatar_core.config import load_settings
from avatar_core.emulator import Emulator, tone_video_maker
from avatar_core.ui import UPLOAD_ONLY
from tests.helpers import free_port

WS_KEY = "ws-visitor-own-key-uploads-3141"
META = {"_type": "gradio.FileData"}


class Site:
    def __init__(self, base, root, gradio_dir, web, emu, files, ids, deps):
        self.base, self.root, self.gradio_dir, self.web, self.emu = base, root, gradio_dir, web, emu
        self.files, self.ids, self.deps = files, ids, deps

    def call(self, fn_index: int, data: list, session: str | None = None) -> tuple[bool, object]:
        """(success, output data or error text) of one queued event, by raw HTTP."""
        session = session or uuid.uuid4().hex
        with httpx.Client(base_url=self.base, timeout=60) as http:
            joined = http.post("/gradio_api/queue/join", json={
                "data": data, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None,
            })
            assert joined.status_code == 200, joined.text
            with http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
                for line in stream.iter_lines():
                    if line.startswith("data:"):
                        msg = json.loads(line[5:])
                        if msg.get("msg") == "process_completed":
                            out = msg.get("output") or {}
                            return (True, out.get("data")) if msg.get("success") else (False, out.get("error"))
        raise AssertionError("no result from the queue")

    def dep(self, inputs: list[str], output: str) -> int:
        want = [self.ids[i] for i in inputs]
        for i, d in enumerate(self.deps):
            if d["inputs"] == want and self.ids[output] in d["outputs"]:
                return d.get("id", i)
        raise AssertionError(f"no event takes {inputs} to {output}")

    @property
    def generate_fn(self) -> int:
        i = next(i for i, d in enumerate(self.deps) if d.get("api_name") == "generate")
        return self.deps[i].get("id", i)

    def generate_data(self, image, audio, provider="wavespeed") -> list:
        return [image, audio, provider, "standard", "", WS_KEY, "", "", "", False, None]

    def upload(self, path: Path) -> dict:
        with open(path, "rb") as fh:
            r = httpx.post(f"{self.base}/gradio_api/upload", files={"files": (path.name, fh)}, timeout=30)
        r.raise_for_status()
        return {"path": r.json()[0], "orig_name": path.name, "meta": META}

    def cached(self) -> set[Path]:
        return {p for p in self.gradio_dir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("uploads")
    gradio_dir = root / "gradio"
    files = {
        "face": mf.make_portrait(root / "server-face.jpg"),  # files that exist on the server
        "voice": mf.make_tone(root / "server-voice.mp3", "mp3", 3.0),
    }
    routes = {
        "/face.jpg": (200, {"Content-Type": "image/jpeg"}, files["face"].read_bytes()),
        "/voice.mp3": (200, {"Content-Type": "audio/mpeg"}, files["voice"].read_bytes()),
        "/hop": (302, {"Location": "/face.jpg"}, b""),
    }
    with pytest.MonkeyPatch.context() as mp, LocalServer(routes) as web, Emulator(
            queue_s=0.1, processing_s=0.3, video_maker=tone_video_maker, api_keys={"wavespeed": WS_KEY}) as emu:
        # Gradio's downloader treats the loopback server as a public host; nothing else changes.
        mp.setattr(safehttpx, "is_public_ip", lambda ip: True)
        mp.setenv("GRADIO_TEMP_DIR", str(gradio_dir))  # its own upload folder, to see what lands there
        settings = load_settings(env={"AVATAR_OUTPUT_DIR": str(root / "outputs"), "WAVESPEED_BASE_URL": emu.url,
                                      "AVATAR_POLL_TYPICAL_S": "1"}, dotenv_path=None)
        demo = app.build_demo(settings)
        port = free_port()
        app.launch(demo, settings, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            base = f"http://127.0.0.1:{port}"
            config = httpx.get(f"{base}/config", timeout=10).json()
            ids = {c["props"]["elem_id"]: c["id"] for c in config["components"] if c.get("props", {}).get("elem_id")}
            yield Site(base, root, gradio_dir, web, emu, files, ids, config["dependencies"])
        finally:
            demo.close()


def _checks(site: Site) -> dict[str, tuple[int, callable]]:
    """Every event with an upload field, and how to fill its other inputs."""
    image_check = site.dep(["image-input", "image-url"], "image-notes")
    audio_check = site.dep(["audio-input", "audio-url", "provider", "tier", "version", "trim"], "audio-notes")
    return {
        "image check": (image_check, lambda bad, face, voice: [bad, ""]),
        "audio check": (audio_check, lambda bad, face, voice: [bad, "", "wavespeed", "standard", "", False]),
        "generate, image": (site.generate_fn, lambda bad, face, voice: site.generate_data(bad, voice)),
        "generate, audio": (site.generate_fn, lambda bad, face, voice: site.generate_data(face, bad)),
    }


def _refused_everywhere(site: Site, payloads: list) -> None:
    face, voice = site.upload(site.files["face"]), site.upload(site.files["voice"])
    site.emu.reset()
    hits, cached = len(site.web.hits), site.cached()
    for name, (fn, data) in _checks(site).items():
        for payload in payloads:
            ok, out = site.call(fn, data(payload, face, voice))
            assert (ok, out) == (False, UPLOAD_ONLY), (name, payload, out)
    assert site.web.hits[hits:] == [], "Gradio fetched the URL"
    assert site.cached() == cached, "something landed in Gradio's cache"
    assert len(site.emu.requests) == 0, "the provider was contacted"


def test_the_stand_in_web_server_counts_as_public_for_gradio(site, tmp_path):
    """The control: Gradio's own downloader, as the app runs it, fetches from the test server."""
    from gradio.processing_utils import async_ssrf_protected_download

    before = len(site.web.hits)
    path = asyncio.run(async_ssrf_protected_download(site.web.url("/face.jpg"), cache_dir=str(tmp_path)))
    assert Path(path).read_bytes() == site.files["face"].read_bytes()
    assert site.web.hits[before:] == ["/face.jpg"]


def test_a_url_sent_as_the_upload_is_never_fetched(site):
    url = site.web.url("/face.jpg")
    _refused_everywhere(site, [
        {"path": url, "meta": META},  # what gradio_client.handle_file(url) sends
        {"path": url, "url": url, "orig_name": "face.jpg", "meta": META},
        {"path": site.web.url("/hop"), "meta": META},
        {"path": "HTTPS://example.com/face.jpg", "meta": META},
        {"path": url},  # no meta
        url,  # a bare string
    ])


def test_gradio_client_handle_file_of_a_url_is_refused_too(site):
    """The same attack through the official client, as the reviewer sent it."""
    before, cached = len(site.web.hits), site.cached()
    client = Client(site.base, verbose=False)
    with pytest.raises(Exception) as caught:
        client.predict(image=handle_file(site.web.url("/face.jpg")), audio=handle_file(str(site.files["voice"])),
                       provider="local", tier="standard", prompt="", api_key="", api_name="/generate")
    assert UPLOAD_ONLY in str(caught.value)
    assert site.web.hits[before:] == []
    # The client uploaded the voice itself (a real upload); nothing came from the URL.
    assert not [p for p in site.cached() - cached if p.read_bytes() == site.files["face"].read_bytes()]


def test_the_rest_api_route_refuses_a_url_the_same_way(site):
    """``/gradio_api/call/generate`` (Gradio's plain-HTTP API) reaches the same rule."""
    before, cached = len(site.web.hits), site.cached()
    voice = site.upload(site.files["voice"])
    data = site.generate_data({"path": site.web.url("/face.jpg"), "meta": META}, voice)[:-1]  # no session state
    r = httpx.post(f"{site.base}/gradio_api/call/generate", json={"data": data}, timeout=30)
    assert r.status_code == 200, r.text
    answer = httpx.get(f"{site.base}/gradio_api/call/generate/{r.json()['event_id']}", timeout=60).text
    assert "event: error" in answer and UPLOAD_ONLY in answer, answer
    assert site.web.hits[before:] == []
    assert site.cached() <= cached | {Path(voice["path"])}  # the voice, uploaded by us


def test_data_urls_and_server_paths_in_the_upload_are_refused(site):
    face = site.upload(site.files["face"])
    data_url = "data:image/jpeg;base64," + base64.b64encode(site.files["face"].read_bytes()).decode()
    _refused_everywhere(site, [
        {**face, "url": data_url},  # a real upload's path, but Gradio would decode the data: URL
        {"path": "x.jpg", "url": data_url},  # no meta: Gradio checks nothing
        {"path": face["path"], "url": " DATA:image/jpeg;base64,AAAA", "meta": META},
        {"path": str(site.files["face"])},  # no meta: would read the server's file
        {"path": str(site.files["face"]), "meta": META},
        {"path": "/etc/passwd"},
        {"path": str(Path(face["path"]).parent / ".." / ".." / "server-face.jpg"), "meta": META},
        {"path": str(site.gradio_dir), "meta": META},  # the upload folder itself
        {"path": f"file://{site.files['face']}", "meta": META},
    ])


def test_an_example_click_does_not_undo_the_rule(site):
    """Clicking an example gives the session fresh image/audio components (a Gradio update);
    the rule holds for that session all the same."""
    session = uuid.uuid4().hex
    example = next(i for i, d in enumerate(site.deps)
                   if d["outputs"] == [site.ids["image-input"], site.ids["audio-input"]] and len(d["inputs"]) == 1)
    r = httpx.post(f"{site.base}/gradio_api/run/predict", timeout=30, json={
        "data": [0], "fn_index": site.deps[example].get("id", example), "session_hash": session})
    assert r.status_code == 200, r.text
    loaded = r.json()["data"]
    before = len(site.web.hits)
    ok, out = site.call(site.dep(["image-input", "image-url"], "image-notes"),
                        [{"path": site.web.url("/face.jpg"), "meta": META}, ""], session=session)
    assert (ok, out) == (False, UPLOAD_ONLY)
    assert site.web.hits[before:] == []
    # The example itself, as the page sends it back, is accepted (it sits in Gradio's cache).
    image = loaded[0]["value"] if "value" in loaded[0] else loaded[0]
    ok, out = site.call(site.dep(["image-input", "image-url"], "image-notes"),
                        [{**image, "meta": META}, ""], session=session)
    assert ok and out[0] is not None and "Problem" not in out[1], out


def test_after_an_example_click_a_bomb_upload_still_gets_our_words(site, tmp_path):
    """The session's fresh image component keeps the app's own preprocess (which hands a file
    Pillow refuses to our check) instead of ending in Gradio's bare "Error"."""
    session = uuid.uuid4().hex
    example = next(i for i, d in enumerate(site.deps)
                   if d["outputs"] == [site.ids["image-input"], site.ids["audio-input"]] and len(d["inputs"]) == 1)
    r = httpx.post(f"{site.base}/gradio_api/run/predict", timeout=30, json={
        "data": [0], "fn_index": site.deps[example].get("id", example), "session_hash": session})
    assert r.status_code == 200, r.text
    bomb = site.upload(mf.make_png_bomb(tmp_path / "bomb.png"))
    ok, out = site.call(site.dep(["image-input", "image-url"], "image-notes"), [bomb, ""], session=session)
    assert ok and out[0] is None and "claims to be far too large" in out[1], out


def test_real_uploads_still_work(site):
    site.emu.reset()
    face, voice = site.upload(site.files["face"]), site.upload(site.files["voice"])
    ok, out = site.call(site.dep(["image-input", "image-url"], "image-notes"), [face, ""])
    assert ok and out[0] is not None and "Problem" not in out[1], out
    ok, out = site.call(site.dep(["audio-input", "audio-url", "provider", "tier", "version", "trim"], "audio-notes"),
                        [voice, "", "wavespeed", "standard", "", False])
    assert ok and out[0] is not None and "**3.0 s** of audio" in out[1], out
    ok, out = site.call(site.generate_fn, site.generate_data(face, voice))
    assert ok and out[2] is not None and "Done in" in out[0], out
    assert site.emu.requests_to("POST", r"^/api/v3/kwaivgi/"), "the job was submitted"
