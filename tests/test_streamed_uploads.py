"""Uploads are streamed: the bytes on the wire are exactly what PROVIDERS.md asks for, and
no single piece of the body holds the whole file.

- WaveSpeed (two-step upload): ``POST /api/v3/media/uploads`` with ``{filename,size,content_type}``,
  then ``PUT`` of the raw bytes to the presigned URL, with Content-Length, without our key.
- Segmind: ``POST <upload-asset>`` with JSON ``{"data_urls": ["data:<mime>;base64,..."]}``.
"""

from __future__ import annotations

import base64
import json

import httpx
import pytest

from avatar_core.providers.base import STREAM_CHUNK, data_uri_json_body
from avatar_core.providers.segmind import SegmindProvider
from avatar_core.providers.wavespeed import WaveSpeedProvider

KEY = "sk-test-streaming-key"
# Sizes around the piece boundary, where base64 padding or an off-by-one would show.
SIZES = [0, 1, 2, 3, STREAM_CHUNK - 1, STREAM_CHUNK, STREAM_CHUNK + 1, 3 * STREAM_CHUNK + 2]


def _payload(size: int) -> bytes:
    # Not a repeating pattern of period 3, so a misplaced base64 group changes the text.
    return bytes((i * 7 + i // 251) % 256 for i in range(size))


class Recorder(httpx.AsyncBaseTransport):
    """A transport that reads each body piece by piece, as a socket would, and keeps the pieces.

    (httpx.MockTransport reads the whole body before its handler sees it, hiding streaming.)
    """

    def __init__(self, answer):
        self.answer = answer
        self.requests: list[tuple[httpx.Request, list[bytes]]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        pieces = [bytes(p) async for p in request.stream]
        self.requests.append((request, pieces))
        return self.answer(request)


@pytest.mark.parametrize("size", SIZES)
async def test_segmind_upload_body_is_the_documented_json_byte_for_byte(tmp_path, size):
    raw = _payload(size)
    path = tmp_path / "voice.mp3"
    path.write_bytes(raw)
    rec = Recorder(lambda r: httpx.Response(200, json={"file_urls": ["https://files.example/voice.mp3"]}))
    provider = SegmindProvider(KEY, base_url="https://api.example", upload_url="https://up.example/upload-asset",
                               transport=rec)
    seen = []
    try:
        url = await provider.upload(path, "audio/mpeg", progress=lambda done, total: seen.append((done, total)))
    finally:
        await provider.aclose()

    assert url == "https://files.example/voice.mp3"
    [(request, pieces)] = rec.requests
    body = b"".join(pieces)
    expected = json.dumps({"data_urls": ["data:audio/mpeg;base64," + base64.b64encode(raw).decode("ascii")]})
    assert body == expected.encode("ascii")
    assert json.loads(body)["data_urls"][0].startswith("data:audio/mpeg;base64,")
    assert request.method == "POST" and str(request.url) == "https://up.example/upload-asset"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["content-length"] == str(len(body))
    assert "transfer-encoding" not in request.headers
    assert request.headers["x-api-key"] == KEY
    # Streamed: no piece is bigger than one base64-encoded read of the file.
    assert max(len(p) for p in pieces) <= 4 * STREAM_CHUNK // 3 + 64
    if size > STREAM_CHUNK:
        assert len(pieces) >= 3
    assert seen[0] == (0, size) and seen[-1] == (size, size)


async def test_segmind_upload_of_a_large_file_arrives_in_many_small_pieces(tmp_path):
    raw = _payload(10 * STREAM_CHUNK + 5)
    path = tmp_path / "long.wav"
    path.write_bytes(raw)
    rec = Recorder(lambda r: httpx.Response(200, json={"file_urls": ["https://files.example/long.wav"]}))
    provider = SegmindProvider(KEY, upload_url="https://up.example/upload-asset", transport=rec)
    try:
        await provider.upload(path, "audio/wav")
    finally:
        await provider.aclose()
    [(_request, pieces)] = rec.requests
    assert len(pieces) >= 11
    sent = json.loads(b"".join(pieces))
    assert base64.b64decode(sent["data_urls"][0].split(",", 1)[1], validate=True) == raw


@pytest.mark.parametrize("size", [0, 5, STREAM_CHUNK, 4 * STREAM_CHUNK + 1])
async def test_wavespeed_presigned_put_sends_the_raw_file_streamed_without_the_key(tmp_path, size):
    raw = _payload(size)
    path = tmp_path / "voice.mp3"
    path.write_bytes(raw)

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/api/v3/media/uploads":
            return httpx.Response(200, json={"code": 200, "message": "success", "data": {
                "download_url": "https://cdn.example/voice.mp3",
                "upload": {"method": "PUT", "url": "https://bucket.example/put/abc?sig=1",
                           "headers": {"content-type": "audio/mpeg", "x-amz-acl": "private"}},
            }})
        return httpx.Response(200)

    rec = Recorder(answer)
    provider = WaveSpeedProvider(KEY, base_url="https://api.example", transport=rec)
    seen = []
    try:
        url = await provider.upload(path, "audio/mpeg", progress=lambda done, total: seen.append((done, total)))
    finally:
        await provider.aclose()

    assert url == "https://cdn.example/voice.mp3"
    (ask, ask_pieces), (put, pieces) = rec.requests
    assert json.loads(b"".join(ask_pieces)) == {"filename": "voice.mp3", "size": size, "content_type": "audio/mpeg"}
    assert ask.headers["authorization"] == f"Bearer {KEY}"
    assert put.method == "PUT" and str(put.url) == "https://bucket.example/put/abc?sig=1"
    assert b"".join(pieces) == raw
    assert put.headers["content-length"] == str(size)
    assert "transfer-encoding" not in put.headers
    # The presigned headers are sent as given, once; our key never goes to the bucket.
    assert put.headers.get_list("content-type") == ["audio/mpeg"]
    assert put.headers["x-amz-acl"] == "private"
    assert "authorization" not in put.headers
    assert all(len(p) <= STREAM_CHUNK for p in pieces)
    if size > STREAM_CHUNK:
        assert len(pieces) >= 2
    assert seen[0] == (0, size) and seen[-1] == (size, size)


def test_data_uri_json_body_matches_json_dumps_for_other_shapes(tmp_path):
    raw = _payload(1000)
    path = tmp_path / "face.png"
    path.write_bytes(raw)
    uri = "data:image/png;base64," + base64.b64encode(raw).decode("ascii")

    def wrap(u):
        return {"input": {"image": u, "prompt": 'say "hi"\n', "mode": "std"}}

    body = data_uri_json_body(path, "image/png", wrap)

    async def collect():
        return b"".join([p async for p in body])

    import asyncio

    sent = asyncio.run(collect())
    assert sent == json.dumps(wrap(uri)).encode()
    assert body.length == len(sent)
    assert asyncio.run(collect()) == sent  # iterable again (a retried upload sends it anew)
    with pytest.raises(ValueError):
        data_uri_json_body(path, "image/png", lambda u: {"a": u, "b": u})
