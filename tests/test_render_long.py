"""Real speech of ordinary lengths through the Local preview, decoded as a browser would.

The frozen-picture and "> 10 s fails" bugs hid because every render test used a few
seconds of tone. Here espeak-ng speaks 30 s and 300 s, the renderer writes the MP4, and
tests.mp4check decodes all of it (timestamps at 1/fps, durations, codecs, movement).
Peak memory is measured in a child process: a 300 s clip must cost about what a 30 s one does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.mp4check import check_mp4

ROOT = Path(__file__).resolve().parent.parent
TEXT = ("The quarterly figures are in, and the team has done well. Sales rose in every region, "
        "costs fell a little, and the new product is ahead of plan. ")


def _speech(dest: Path, seconds: float) -> Path:
    if not shutil.which("espeak-ng"):
        if os.environ.get("CI"):
            pytest.fail("espeak-ng is missing: .ci/run installs it")
        pytest.skip("espeak-ng is not installed")
    once = dest.with_suffix(".one.wav")
    subprocess.run(["espeak-ng", "-w", str(once), TEXT * 3], check=True)
    import av
    import numpy as np

    with av.open(str(once)) as c:
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
        rate = c.streams.audio[0].rate
    need = int(seconds * rate)
    pcm = np.resize(pcm, need)  # repeat the speech up to the length wanted
    with av.open(str(dest), "w", format="wav") as out:
        s = out.add_stream("pcm_s16le", rate=rate, layout="mono")
        for i in range(0, need, 8192):
            f = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[None, i:i + 8192]), format="s16", layout="mono")
            f.sample_rate = rate
            for p in s.encode(f):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    return dest


_CHILD = r"""
import json, resource, sys
from avatar_core.render.video import render_video
r = render_video(sys.argv[1], sys.argv[2], sys.argv[3])
print(json.dumps({"duration": r.duration_s, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def _render_in_child(image: Path, audio: Path, out: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(image), str(audio), str(out)], cwd=ROOT,
                          capture_output=True, text=True, check=True, timeout=900)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_thirty_seconds_of_speech_plays_as_a_moving_video(tmp_path):
    audio = _speech(tmp_path / "speech30.wav", 30.0)
    got = _render_in_child(ROOT / "examples" / "portrait.jpg", audio, tmp_path / "out.mp4")
    assert abs(got["duration"] - 30.0) < 0.01
    report = check_mp4(tmp_path / "out.mp4", 30.0)
    assert report.fps == 25 and len(report.video_pts) == 750


@pytest.mark.slow
@pytest.mark.timeout(1200)  # two renders (30 s and 300 s of speech) plus a full decode of each
def test_five_minutes_of_speech_plays_and_costs_no_more_memory_than_thirty_seconds(tmp_path):
    image = ROOT / "examples" / "portrait.jpg"
    short = _render_in_child(image, _speech(tmp_path / "s30.wav", 30.0), tmp_path / "s30.mp4")
    long = _render_in_child(image, _speech(tmp_path / "s300.wav", 300.0), tmp_path / "s300.mp4")
    check_mp4(tmp_path / "s300.mp4", 300.0)
    grown_mb = (long["peak_kb"] - short["peak_kb"]) / 1024
    assert grown_mb < 40, f"a 300 s render peaked {grown_mb:.0f} MB above a 30 s one"
