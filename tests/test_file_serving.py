"""The app serves only its own output and example files over HTTP; nothing else on the machine.

A real app is launched on 127.0.0.1 laid out like a deployment: ``deploy/.env`` (with a
key in it), ``deploy/outputs`` (videos, checked inputs, the job store). One video is
made through the public API, then Gradio's file routes are asked for files they must
refuse: system files, the .env, the job store, the app's source, by absolute path, by
``../`` and URL-encoded traversal, and through symlinks planted in the output folder.

Gradio 6 file routes (gradio/routes.py): ``GET|HEAD /gradio_api/file={path_or_url}`` and
the deprecated ``GET /gradio_api/file/{path}``; ``/file=`` without the prefix is the
Gradio 3/4 name, which must not exist either.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from gradio_client import Client, handle_file

import app
from avatar_core.config import load_settings
from media_factory import LocalServer
from tests.helpers import free_port as _free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ENV_KEY = "sk-env-file-key-never-served-5521"
JOB_TIMEOUT_S = 120



class Deployment:
    def __init__(self, base: str, root: Path, out_dir: Path, video: Path) -> None:
        self.base, self.root, self.out_dir, self.video = base, root, out_dir, video

    def get(self, route: str) -> httpx.Response:
        # Send the path exactly as written: httpx must not normalise ../ or %2e away.
        url = httpx.URL(self.base).copy_with(raw_path=route.encode())
        return httpx.get(url, timeout=10, follow_redirects=False)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deploy")
    out_dir = root / "outputs"
    (root / ".env").write_text(f"WAVESPEED_API_KEY={ENV_KEY}\n")
    settings = load_settings(env={"AVATAR_OUTPUT_DIR": str(out_dir), "AVATAR_POLL_TYPICAL_S": "1"},
                             dotenv_path=root / ".env")
    demo = app.build_demo(settings)  # opens the job store: outputs/jobs.sqlite3
    port = _free_port()
    app.launch(demo, settings, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    base = f"http://127.0.0.1:{port}"
    try:
        client = Client(base + "/", verbose=False)
        status, _rid, _video = client.predict(
            image=handle_file(str(EXAMPLES / "portrait.jpg")), audio=handle_file(str(EXAMPLES / "voice.mp3")),
            provider="local", tier="standard", prompt="", api_key="", api_name="/generate",
        )
        assert "Done in" in status, status
        videos = sorted((out_dir / "videos").glob("*.mp4"))
        assert len(videos) == 1, videos
        # Symlinks someone (or a bug) left in the served folder must not lead outside it.
        os.symlink("/etc/passwd", out_dir / "videos" / "passwd.mp4")
        os.symlink(root / ".env", out_dir / "videos" / "env.mp4")
        os.symlink(ROOT, out_dir / "videos" / "project")
        yield Deployment(base, root, out_dir, videos[0])
    finally:
        demo.close()


# ----------------------------------------------------------------------------- served


def test_an_output_video_is_served(deployment):
    r = deployment.get(f"/gradio_api/file={deployment.video}")
    assert r.status_code == 200
    assert r.content == deployment.video.read_bytes()
    assert r.headers["content-type"] == "video/mp4"


def test_an_example_file_is_served(deployment):
    r = deployment.get(f"/gradio_api/file={EXAMPLES / 'portrait.jpg'}")
    assert r.status_code == 200 and r.content == (EXAMPLES / "portrait.jpg").read_bytes()


# ----------------------------------------------------------------------------- refused


def _refused(deployment, route: str, forbidden: bytes) -> None:
    r = deployment.get(route)
    assert 400 <= r.status_code < 500, f"{route} answered {r.status_code}"
    assert forbidden not in r.content


def _targets(d: Deployment) -> dict[str, Path]:
    return {
        "passwd": Path("/etc/passwd"),
        "env": d.root / ".env",
        "app_source": ROOT / "app.py",
        "core_source": ROOT / "avatar_core" / "config.py",
    }


def _marker(name: str, path: Path) -> bytes:
    """Bytes that only the real file contains, to prove none of it leaked."""
    return {"passwd": b"root:", "env": ENV_KEY.encode()}.get(name) or path.read_bytes()[:60]


@pytest.mark.parametrize("name", ["passwd", "env", "app_source", "core_source"])
def test_other_files_are_refused_by_absolute_path(deployment, name):
    target = _targets(deployment)[name]
    assert target.is_file()  # the refusal is not just "no such file"
    for route in (f"/gradio_api/file={target}", f"/gradio_api/file/{target}", f"/file={target}",
                  f"/gradio_api/file={quote(str(target), safe='')}"):
        _refused(deployment, route, _marker(name, target))


@pytest.mark.parametrize("name", ["passwd", "env", "app_source"])
def test_traversal_out_of_the_served_folders_is_refused(deployment, name):
    target = _targets(deployment)[name]
    videos = deployment.out_dir / "videos"
    up_to_root = "/".join([".."] * len(videos.parts[1:]))  # from videos/ to /
    rel = f"{up_to_root}{target}"
    routes = [
        f"/gradio_api/file={videos}/{rel}",
        f"/gradio_api/file={EXAMPLES}/{'/'.join(['..'] * len(EXAMPLES.parts[1:]))}{target}",
        f"/gradio_api/file={videos}/{rel.replace('..', '%2e%2e')}",
        f"/gradio_api/file={videos}/{rel.replace('/', '%2F')}",
        f"/gradio_api/file={videos}/{rel.replace('..', '%252e%252e')}",
        f"/gradio_api/file={videos}/{rel.replace('/', chr(92))}",
        f"/gradio_api/file=../../../../../../..{target}",
        f"/gradio_api/file/{videos}/{rel}",
    ]
    for route in routes:
        _refused(deployment, route, _marker(name, target))


@pytest.mark.parametrize("link, name", [("passwd.mp4", "passwd"), ("env.mp4", "env"), ("project/app.py", "app_source")])
def test_symlinks_in_the_output_folder_pointing_outside_are_refused(deployment, link, name):
    path = deployment.out_dir / "videos" / link
    assert path.exists()  # the link resolves: only the file route's check stops it
    _refused(deployment, f"/gradio_api/file={path}", _marker(name, _targets(deployment)[name]))


def test_the_job_store_is_refused(deployment):
    store = deployment.out_dir / "jobs.sqlite3"
    assert store.is_file()
    _refused(deployment, f"/gradio_api/file={store}", b"SQLite format 3")


def test_the_visitor_id_key_is_refused(deployment):
    secret = deployment.out_dir / ".visitor-secret"
    assert secret.is_file()
    _refused(deployment, f"/gradio_api/file={secret}", secret.read_bytes())


def test_gradio_does_not_fetch_loopback_urls_for_a_visitor(deployment):
    """``/gradio_api/file=http://...`` fetches URLs server-side; loopback must be refused (SSRF)."""
    with LocalServer({"/secret": (200, {"Content-Type": "text/plain"}, b"internal-only")}) as inside:
        for url in (inside.url("/secret"), f"http://localhost:{inside.port}/secret",
                    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/"):
            _refused(deployment, f"/gradio_api/file={url}", b"internal-only")
        assert inside.hits == []


def test_the_app_keeps_serving_after_the_probes(deployment):
    r = httpx.get(deployment.base + "/", timeout=10)
    assert r.status_code == 200 and "<html" in r.text.lower()
    assert deployment.get(f"/gradio_api/file={deployment.video}").status_code == 200


# ----------------------------------------------------------------------------- uploads


def _multipart(size: int, boundary: str = "avatar-test-boundary"):
    """A multipart/form-data body with one file of ``size`` bytes, streamed in 1 MB pieces."""
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"voice.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def pieces():
        yield head
        left = size
        while left > 0:
            n = min(left, 1024 * 1024)
            yield b"\0" * n
            left -= n
        yield tail

    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}",
               "Content-Length": str(len(head) + size + len(tail))}
    return pieces(), headers


@pytest.mark.parametrize("size_mb, refused", [(1, False), (101, True)])
def test_uploads_over_100_mb_are_refused(deployment, size_mb, refused):
    """Gradio's upload route enforces ``max_file_size`` (ui.MAX_UPLOAD) and keeps nothing."""
    started = time.time()
    body, headers = _multipart(size_mb * 1024 * 1024)
    try:
        r = httpx.post(deployment.base + "/gradio_api/upload", content=body, headers=headers, timeout=60)
    except httpx.WriteError:  # the server answered and hung up while we were still sending
        r = None
    if refused:
        assert r is None or r.status_code == 413, (r.status_code, r.text[:200])
        if r is not None:
            assert "maximum allowed size of 104857600 bytes" in r.text, r.text[:200]
        temp = Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio")
        kept = [p for p in temp.rglob("*") if p.is_file() and p.stat().st_mtime >= started
                and p.stat().st_size >= 50 * 1024 * 1024]
        assert kept == []
    else:
        assert r is not None and r.status_code == 200, (r.status_code, r.text[:200])
        assert r.json()[0].endswith("voice.wav")
