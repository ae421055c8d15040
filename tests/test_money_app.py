"""Issue 14.4 as the attacker plays it, over HTTP against the launched app.

The attacker pastes a link to their own server, which serves a 3 s clip to the first
request (the app's checks, priced at one 5 s block) and a long clip to any later one (the
provider, which used to be handed the link when the checks changed nothing). The
provider must receive the uploaded bytes that were checked, never the link.
"""

from __future__ import annotations

import io
import re
import sqlite3
from pathlib import Path

import av
import pytest
from gradio_client import Client, handle_file

import app
from avatar_core.config import load_settings
from avatar_core.emulator import Emulator, tone_video_maker
from tests.helpers import free_port
from tests.media_factory import LocalServer, make_tone

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SERVER_KEY = "ws-server-key-Money-51z"
TIMEOUT_S = 90


def audio_seconds(data: bytes) -> float:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        return float(sum(frame.samples for frame in container.decode(stream)) / stream.rate)


@pytest.fixture
def clips(tmp_path):
    short = make_tone(tmp_path / "short.mp3", "mp3", 3.0).read_bytes()
    long = make_tone(tmp_path / "long.mp3", "mp3", 60.0).read_bytes()
    return short, long


def test_a_link_that_changes_its_answer_cannot_bill_a_long_clip(tmp_path, clips):
    short, long = clips
    served: list[int] = []

    def bait_and_switch(handler):  # the attacker's server: short first, long afterwards
        body = short if not served else long
        served.append(len(body))
        handler.send_response(200)
        handler.send_header("Content-Type", "audio/mpeg")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    with LocalServer({"/voice.mp3": bait_and_switch}) as attacker, \
            Emulator(queue_s=0.1, processing_s=0.3, video_maker=tone_video_maker,
                     api_keys={"wavespeed": [SERVER_KEY]}) as emu:  # fmt: skip
        env = {
            "WAVESPEED_BASE_URL": emu.url, "WAVESPEED_API_KEY": SERVER_KEY, "AVATAR_OUTPUT_DIR": str(tmp_path / "out"),
            "AVATAR_POLL_TYPICAL_S": "1", "AVATAR_ALLOW_PRIVATE_URLS": "true",
            "AVATAR_ALLOW_ANONYMOUS_SERVER_KEYS": "true", "AVATAR_DAILY_SPEND_CAP_USD": "1",
        }  # fmt: skip
        settings = load_settings(env=env, dotenv_path=None)
        demo = app.build_demo(settings, host="0.0.0.0")
        port = free_port()
        app.launch(demo, settings, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            link = attacker.url("/voice.mp3")
            status, request_id, video = client.submit(
                image=handle_file(str(EXAMPLES / "portrait.jpg")), audio=None, provider="wavespeed", tier="standard",
                prompt="", api_key="", audio_url=link, api_name="/generate",
            ).result(timeout=TIMEOUT_S)
        finally:
            demo.close()

        assert "Done in" in status, status
        # The app fetched the link once, for its checks; the provider never did.
        assert served == [len(short)]
        [submit] = emu.requests_to("POST", r"^/api/v3/kwaivgi/")
        sent = submit.json["audio"]
        assert link not in str(submit.json) and "voice.mp3" not in sent
        # What the provider got is our upload (its own file store), holding the checked 3 s.
        match = re.fullmatch(re.escape(emu.url) + r"/emulator/files/([0-9a-f]+)/.*", sent)
        assert match, sent
        received = emu.files[match.group(1)].data
        assert audio_seconds(received) == pytest.approx(3.0, abs=0.15)
        assert len(emu.requests_to("PUT", r"^/emulator/uploads/")) == 2  # image and audio went up
        # The video and the bill follow those 3 s: one 5 s block, $0.25, under the $1 cap.
        with av.open(video) as container:
            assert container.duration / 1e6 == pytest.approx(3.0, abs=0.2)
        with sqlite3.connect(settings.store_path) as conn:
            rows = conn.execute("SELECT state, request_id, cost_microusd FROM usage_ledger").fetchall()
        assert rows == [("submitted", request_id, 250_000)]
