"""Portrait checks: every accepted format, orientation, limits, broken files, faces, preview."""

from __future__ import annotations

import time

import pytest
from PIL import Image

import media_factory as mf
from avatar_core.config import Settings
from avatar_core.errors import InputError
from avatar_core.media import image as image_mod
from avatar_core.media.inputs import check_image


@pytest.fixture
def settings(tmp_path):
    return Settings(output_dir=tmp_path / "out")


@pytest.mark.parametrize(
    "fmt, ext, expect",
    [
        ("JPEG", "jpg", "JPEG"),
        ("PNG", "png", "PNG"),
        ("WEBP", "webp", "JPEG"),
        ("BMP", "bmp", "PNG"),
        ("GIF", "gif", "PNG"),
        ("TIFF", "tiff", "PNG"),
    ],
)
def test_each_format_becomes_rgb_jpeg_or_png(tmp_path, settings, fmt, ext, expect):
    src = mf.make_image(tmp_path / f"in.{ext}", fmt, (500, 640))
    res = check_image(src, settings=settings)
    assert res.original_format == fmt
    assert res.format == expect
    assert res.path.parent == settings.output_dir / "inputs"
    with Image.open(res.path) as out:
        assert out.format == expect
        assert out.mode == "RGB"
        assert out.size == (500, 640) == (res.width, res.height)
        # the red top-left quarter survived the conversion
        r, g, b = out.convert("RGB").getpixel((10, 10))
        assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied(tmp_path, settings):
    # Orientation 6 = "rotate 90 degrees clockwise to display": 400x600 stored -> 600x400 shown,
    # and the stored top-left corner ends up top-right.
    src = mf.make_image(tmp_path / "phone.jpg", "JPEG", (400, 600), exif_orientation=6)
    res = check_image(src, settings=settings)
    assert (res.width, res.height) == (600, 400)
    with Image.open(res.path) as out:
        assert out.size == (600, 400)
        assert out.getexif().get(0x0112) in (None, 1)  # no second rotation by the provider
        r, _g, _b = out.getpixel((590, 10))
        assert r > 200
        r, _g, _b = out.getpixel((10, 10))
        assert r < 240 and out.getpixel((10, 10)) != out.getpixel((590, 10))
    assert any("upright" in w for w in res.warnings)


def test_animated_gif_uses_first_frame(tmp_path, settings):
    src = mf.make_image(tmp_path / "anim.gif", "GIF", (400, 400), frames=3)
    res = check_image(src, settings=settings)
    with Image.open(res.path) as out:
        r, g, b = out.getpixel((10, 10))
    assert r > 200 and b < 60  # red of frame 1, not the blue of later frames
    assert any("first frame" in w for w in res.warnings)


def test_transparency_is_flattened_on_white(tmp_path, settings):
    img = Image.new("RGBA", (400, 400), (0, 0, 0, 0))
    img.save(tmp_path / "alpha.png")
    res = check_image(tmp_path / "alpha.png", settings=settings)
    with Image.open(res.path) as out:
        assert out.mode == "RGB"
        assert out.getpixel((5, 5)) == (255, 255, 255)


@pytest.mark.parametrize(
    "size, needle",
    [
        ((299, 400), "too small (299 x 400 px). Each side must be at least 300 px"),
        ((800, 300), "too wide (800 x 300 px, ratio 2.7:1)"),
        ((300, 800), "too tall (300 x 800 px, ratio 2.7:1)"),
    ],
)
def test_geometry_limits(tmp_path, settings, size, needle):
    src = mf.make_image(tmp_path / "x.png", "PNG", size)
    with pytest.raises(InputError) as exc:
        check_image(src, settings=settings)
    assert needle in str(exc.value)
    assert "crop" in str(exc.value) or "larger photo" in str(exc.value)  # says what to do


def test_edges_of_the_limits_are_accepted(tmp_path, settings):
    for size in [(300, 300), (750, 300), (300, 750)]:
        src = mf.make_image(tmp_path / f"{size[0]}x{size[1]}.png", "PNG", size)
        assert (check_image(src, settings=settings).width, check_image(src, settings=settings).height) == size


@pytest.mark.parametrize("side", [100_000, 9_000])  # over Pillow's own limit / only over ours (30 MP)
def test_decompression_bomb_header_is_refused_before_decoding(tmp_path, settings, side):
    src = mf.make_png_bomb(tmp_path / "bomb.png", side, side)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match=r"bomb.png claims to be far too large.*to open safely.*Resize it"):
        check_image(src, settings=settings)
    assert time.perf_counter() - t0 < 1.0


def test_pixel_limit_is_a_module_constant(tmp_path, settings, monkeypatch):
    # A PNG: a JPEG over the limit is decoded at a smaller scale instead (next tests).
    src = mf.make_image(tmp_path / "ok.png", "PNG", (600, 600))
    monkeypatch.setattr(image_mod, "MAX_PIXELS", 300 * 300)
    with pytest.raises(InputError, match=r"ok.png claims to be far too large \(600 x 600 px.*limit 0.09 megapixels"):
        check_image(src, settings=settings)


def test_a_tiny_png_of_64_megapixels_is_refused_from_its_header(tmp_path, settings):
    from tests.attack_media import tiny_huge_png

    src = tiny_huge_png(tmp_path / "huge.png", 8000, 8000)  # fully decodable, about 200 KB
    assert src.stat().st_size < 400_000
    t0 = time.perf_counter()
    with pytest.raises(InputError) as exc:
        check_image(src, settings=settings)
    assert time.perf_counter() - t0 < 1.0, "decoding 64 MP takes seconds; the header alone takes milliseconds"
    assert exc.value.message == (
        "The image huge.png claims to be far too large (8000 x 8000 px, 64 megapixels) to open safely "
        "(limit 30 megapixels). Resize it to a few thousand pixels per side (for example 4000 x 3000) and try again."
    )


def test_a_jpeg_over_the_pixel_limit_is_decoded_at_a_smaller_scale(tmp_path, settings, monkeypatch):
    src = mf.make_portrait(tmp_path / "big.jpg", "JPEG", scale=2.0)
    with Image.open(src) as im:
        full = im.size
    monkeypatch.setattr(image_mod, "MAX_PIXELS", full[0] * full[1] // 3)  # 1/2 scale fits, full size does not
    loaded = image_mod.load_image(src)
    assert loaded.reduced and loaded.original_size == full
    assert loaded.image.size == (-(-full[0] // 2), -(-full[1] // 2))
    assert any(f"is {full[0]} x {full[1]} px" in w and "it was read at" in w for w in loaded.warnings)
    check = check_image(src, settings=settings)
    assert (check.width, check.height) == loaded.image.size and check.faces


def test_a_png_just_under_the_pixel_limit_is_still_decoded(tmp_path, settings, monkeypatch):
    src = mf.make_image(tmp_path / "ok.png", "PNG", (600, 600))
    monkeypatch.setattr(image_mod, "MAX_PIXELS", 600 * 600)
    assert (check_image(src, settings=settings).width, check_image(src, settings=settings).height) == (600, 600)


def test_truncated_file(tmp_path, settings):
    full = mf.make_image(tmp_path / "full.jpg", "JPEG", (600, 800)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(full[: len(full) // 2])
    with pytest.raises(InputError, match="damaged or incomplete"):
        check_image(tmp_path / "cut.jpg", settings=settings)


def test_text_file_named_png(tmp_path, settings):
    (tmp_path / "notes.png").write_text("hello, I am not a picture\n" * 20)
    with pytest.raises(InputError, match=r"notes\.png is not an image we can read. Use a JPEG, PNG"):
        check_image(tmp_path / "notes.png", settings=settings)


def test_empty_and_missing_files(tmp_path, settings):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty \(0 bytes\)"):
        check_image(tmp_path / "empty.jpg", settings=settings)
    with pytest.raises(InputError, match="was not found"):
        check_image(tmp_path / "nope.jpg", settings=settings)
    with pytest.raises(InputError, match="No image was given"):
        check_image("", settings=settings)


def test_too_many_bytes_are_reencoded_then_downscaled_not_refused():
    noise = Image.effect_noise((900, 900), 120).convert("RGB")
    enc = image_mod.encode_for_providers(noise, "JPEG", max_bytes=150_000)
    assert len(enc.data) <= 150_000
    assert enc.format == "JPEG"
    assert enc.downscaled and enc.size[0] < 900
    assert any("scaled down from 900 x 900" in w for w in enc.warnings)


def test_big_png_falls_back_to_jpeg():
    noise = Image.effect_noise((600, 600), 120).convert("RGB")
    enc = image_mod.encode_for_providers(noise, "PNG", max_bytes=400_000)
    assert enc.format == "JPEG" and len(enc.data) <= 400_000
    assert any("saved as JPEG" in w for w in enc.warnings)


def test_real_face_is_found_with_no_warning(tmp_path, settings):
    src = mf.make_portrait(tmp_path / "astronaut.png", "PNG")
    res = check_image(src, settings=settings)
    assert len(res.faces) == 1
    face = res.faces[0]
    # Eileen Collins' face in skimage's astronaut: around x 170-280, y 60-170 of 512x512.
    assert 140 < face.x + face.w / 2 < 260 and 60 < face.y + face.h / 2 < 180
    assert not any("face" in w for w in res.warnings)
    # the preview shows the box in green
    prev = res.preview
    assert prev.size == (512, 512)
    assert prev.getpixel((face.x + face.w // 2, face.y + 1))[1] > 200
    assert prev.getpixel((face.x + face.w // 2, face.y + 1)) != Image.open(res.path).getpixel((face.x + face.w // 2, face.y + 1))


def test_flat_drawing_has_no_face_and_warns(tmp_path, settings):
    res = check_image(mf.make_image(tmp_path / "d.png", "PNG", (500, 500)), settings=settings)
    assert res.faces == []
    assert any("No face was found" in w for w in res.warnings)


def test_two_faces_warn_with_positions(tmp_path, settings):
    head = Image.open(mf.make_portrait(tmp_path / "a.png", "PNG")).crop((110, 0, 350, 260))
    two = Image.new("RGB", (600, 400), (128, 128, 128))
    two.paste(head, (20, 70))
    two.paste(head, (330, 70))
    two.save(tmp_path / "two.png")
    res = check_image(tmp_path / "two.png", settings=settings)
    assert len(res.faces) == 2
    assert sorted(f.x < 300 for f in res.faces) == [False, True]  # one in each half
    warning = next(w for w in res.warnings if "faces were found" in w)
    assert warning.startswith("2 faces were found (1: at x=")
    assert "crop" in warning


def test_preview_of_a_large_photo_is_small(tmp_path, settings):
    src = mf.make_portrait(tmp_path / "big.jpg", "JPEG", scale=4)  # 2048 x 2048
    res = check_image(src, settings=settings)
    assert max(res.preview.size) == 1024
    assert (res.width, res.height) == (2048, 2048)
    assert len(res.faces) == 1


def test_12_megapixel_jpeg_is_checked(tmp_path, settings):
    # How fast: bench/bench_media.py (timing goals live in bench/, not in tests).
    src = mf.make_portrait(tmp_path / "12mp.jpg", "JPEG", scale=3464 / 512)  # 3464 x 3464 = 12 MP
    res = check_image(src, settings=settings)
    assert len(res.faces) == 1
    assert res.path.stat().st_size <= image_mod.MAX_OUTPUT_BYTES


def test_same_input_reuses_the_same_output_file(tmp_path, settings):
    src = mf.make_image(tmp_path / "a.jpg", "JPEG", (400, 400))
    assert check_image(src, settings=settings).path == check_image(src, settings=settings).path


def test_a_heic_over_the_pixel_limit_is_refused_before_it_is_decoded(tmp_path, settings, monkeypatch):
    from pillow_heif import as_plugin

    from tests.corpus import heic

    src = heic(tmp_path / "portrait.heic")
    with Image.open(src) as im:
        size = im.size
    monkeypatch.setattr(image_mod, "MAX_PIXELS", size[0] * size[1] - 1)

    def no_decoding(self):
        raise AssertionError("the HEIC was decoded")

    monkeypatch.setattr(as_plugin._LibHeifImageFile, "load", no_decoding)
    with pytest.raises(InputError, match=rf"portrait.heic claims to be far too large \({size[0]} x {size[1]} px"):
        check_image(src, settings=settings)


@pytest.mark.parametrize("block", [1 << 20, 1000])  # one band; bands of 3 rows and a short last one
@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped_white(mode, block, monkeypatch):
    """Every 16-bit level v becomes v >> 8 (Pillow's own convert("RGB") clips all of them
    above 255 to white)."""
    import numpy as np

    monkeypatch.setattr(image_mod, "_BLOCK_PIXELS", block)

    levels = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    im = Image.fromarray(levels)  # I;16
    if mode != "I;16":
        im = im.convert(mode) if mode == "I" else Image.frombytes(mode, im.size, levels.astype(">u2").tobytes())
    assert im.mode == mode
    rgb = image_mod.to_rgb(im)
    assert rgb.mode == "RGB"
    out = np.asarray(rgb)
    assert (out[..., 0] == out[..., 2]).all() and (out[..., 0] == out[..., 1]).all()
    assert (out[..., 0].astype(np.int64) == (levels >> 8)).all()


def test_32_bit_grey_outside_16_bits_is_clipped_before_the_shift(monkeypatch):
    import numpy as np

    monkeypatch.setattr(image_mod, "_BLOCK_PIXELS", 7)
    values = np.array([[-70000, -1, 0, 255], [256, 65535, 65536, 2**31 - 1]], dtype=np.int32)
    out = np.asarray(image_mod.to_rgb(Image.fromarray(values, "I")))[..., 0]
    assert out.tolist() == [[0, 0, 0, 0], [1, 255, 255, 255]]


# Run in a fresh interpreter: its peak RSS (ru_maxrss) is this one check's, not the test run's.
_PEAK_OF_CHECK = """
import resource, sys, tempfile
from pathlib import Path
from avatar_core.config import Settings
from avatar_core.media.inputs import check_image
from avatar_core.errors import InputError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    check_image(Path(sys.argv[1]), settings=Settings(output_dir=Path(tempfile.mkdtemp())))
    print("accepted")
except InputError as exc:
    print("refused", exc.message)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def _peak_growth_mb(path) -> tuple[str, float]:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _PEAK_OF_CHECK, str(path)], cwd=root, capture_output=True,
                          text=True, check=False, timeout=120, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    verdict, growth = done.stdout.strip().splitlines()
    return verdict, float(growth)


def test_a_16_bit_grey_png_under_the_pixel_cap_costs_what_an_8_bit_one_does(tmp_path):
    """A 65 KB 16-bit grey PNG of 5470 x 5470 (29.9 MP) took +541 MB to check: 8-byte copies of
    every pixel. Its shift to 8 bits now holds no more than the 8-bit result, so it costs what
    any picture of that size costs (about 230 MB, mostly the RGB copies every check makes)."""
    from tests.attack_media import grey16_png

    sixteen = grey16_png(tmp_path / "grey16.png", 5470, 5470)
    assert sixteen.stat().st_size < 100_000
    eight = tmp_path / "grey8.png"
    Image.new("L", (5470, 5470), 128).save(eight)
    verdict16, grew16 = _peak_growth_mb(sixteen)
    verdict8, grew8 = _peak_growth_mb(eight)
    print(f"\n5470 x 5470 check: 16-bit grey +{grew16:.0f} MB, 8-bit grey +{grew8:.0f} MB")
    assert verdict16 == verdict8 == "accepted"
    assert grew16 < 350, f"+{grew16:.0f} MB"
    assert grew16 < grew8 + 40, f"16-bit +{grew16:.0f} MB against 8-bit +{grew8:.0f} MB"
