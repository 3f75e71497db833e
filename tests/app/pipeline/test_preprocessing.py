"""Tests for app.preprocessing: untrusted bytes -> model input tensor."""

from __future__ import annotations

import io
import random
import re
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from app.pipeline import preprocessing
from app.pipeline.preprocessing import ImageError, decode_image, to_rgb
from models.transforms import normalize, pil_to_uint8
from tests.app.hostile_images import encode, hostile_corpus, png_bytes

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MAX_PIXELS = 40_000_000
CORPUS = hostile_corpus()

# Which machine codes may go with which status.
CODES_BY_STATUS = {
    400: {"empty_image", "invalid_image"},
    413: {"image_too_large", "too_many_pixels"},
    415: {"unsupported_image_format"},
    422: {"invalid_image_dimensions", "unsupported_image_mode"},
}

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def decode(data: bytes, *, image_size: int = 64, **limits) -> torch.Tensor:
    """decode_image with the project's ImageNet normalisation."""
    limits.setdefault("max_pixels", MAX_PIXELS)
    return decode_image(data, image_size=image_size, mean=MEAN, std=STD, **limits)


def decode_pixels(data: bytes, *, image_size: int = 16, **limits) -> torch.Tensor:
    """decode_image with identity normalisation, back on the 0..255 scale: [3, S, S] float."""
    limits.setdefault("max_pixels", MAX_PIXELS)
    x = decode_image(data, image_size=image_size, mean=(0, 0, 0), std=(1, 1, 1), **limits)
    return x * 255


def refusal(data: bytes, **limits) -> ImageError:
    with pytest.raises(ImageError) as caught:
        decode(data, **limits)
    return caught.value


def solid(mode: str, color, size=(16, 16)) -> Image.Image:
    return Image.new(mode, size, color)


def noise_rgb(width: int, height: int) -> Image.Image:
    return Image.frombytes("RGB", (width, height), random.Random(7).randbytes(width * height * 3))


def assert_color(pixels: torch.Tensor, rgb, tol: float = 1.0) -> None:
    """Every pixel of ``pixels`` ([3, H, W], 0..255) is ``rgb`` within ``tol``."""
    expected = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1)
    assert (pixels - expected).abs().max().item() <= tol, pixels.mean(dim=(1, 2))


# --- the hostile corpus ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_hostile_corpus_entry_is_refused_with_its_status(name):
    data, status = CORPUS[name]
    err = refusal(data, max_bytes=1 << 20)
    assert err.status == status
    assert err.code in CODES_BY_STATUS[status]
    message = str(err)
    # Safe to show a client: no PIL internals, paths, object reprs or tracebacks.
    for leak in ("Traceback", "/", "\\", "<_io", "PIL", "site-packages"):
        assert leak not in message
    assert not re.search(r"0x[0-9a-f]{6,}", message)  # an object address


def test_hostile_corpus_is_deterministic():
    assert hostile_corpus() == CORPUS


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("empty", "empty_image"),
        ("random_bytes", "invalid_image"),
        ("png_truncated", "invalid_image"),
        ("jpeg_truncated", "invalid_image"),
        ("png_bad_ihdr_crc", "invalid_image"),
        ("png_bomb_50000x50000", "too_many_pixels"),
        ("gif_bomb_65535x65535", "too_many_pixels"),
        ("tiff", "unsupported_image_format"),
        ("pdf_header", "unsupported_image_format"),
        ("svg", "unsupported_image_format"),
        ("png_5000x1_strip", "invalid_image_dimensions"),
    ],
)
def test_error_codes(name, code):
    assert refusal(CORPUS[name][0]).code == code


# --- normal inputs --------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [64, 32])
def test_png_round_trip_equals_the_shared_transform(image_size):
    img = noise_rgb(64, 64)
    x = decode(encode(img, "PNG"), image_size=image_size)
    assert x.dtype == torch.float32
    assert x.shape == (3, image_size, image_size)
    assert torch.equal(x, normalize(pil_to_uint8(img, image_size), MEAN, STD))


def test_non_square_input_is_resized_to_square():
    img = noise_rgb(120, 40)
    x = decode(encode(img, "PNG"), image_size=32)
    assert x.shape == (3, 32, 32)
    assert torch.equal(x, normalize(pil_to_uint8(img, 32), MEAN, STD))


@pytest.mark.parametrize(("fmt", "params"), [("BMP", {}), ("WEBP", {"lossless": True})])
def test_lossless_formats_round_trip_exactly(fmt, params):
    img = noise_rgb(48, 48)
    x = decode(encode(img, fmt, **params), image_size=48)
    assert torch.equal(x, normalize(pil_to_uint8(img, 48), MEAN, STD))


def test_jpeg_decodes():
    assert_color(decode_pixels(encode(solid("RGB", RED), "JPEG", quality=95)), RED, tol=3)


def test_gif_first_frame_only():
    first, second = solid("RGB", RED).convert("P"), solid("RGB", BLUE).convert("P")
    data = encode(first, "GIF", save_all=True, append_images=[second], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert_color(decode_pixels(data), RED)


# --- byte and pixel limits ------------------------------------------------------------------


def test_max_bytes():
    data = encode(solid("RGB", RED), "PNG")
    decode(data, max_bytes=len(data))  # at the limit: fine
    err = refusal(data, max_bytes=len(data) - 1)
    assert (err.status, err.code) == (413, "image_too_large")


def test_pixel_limit_is_inclusive_and_states_size_and_limit():
    data = encode(solid("RGB", RED, (100, 100)), "PNG")
    decode(data, max_pixels=10_000)
    err = refusal(data, max_pixels=9_999)
    assert (err.status, err.code) == (413, "too_many_pixels")
    assert "100x100" in str(err) and "9,999" in str(err)


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Fail the test if any image's pixel data gets decoded."""

    def forbidden_load(self):
        raise AssertionError(f"decoded the pixels of a {self.size} image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", forbidden_load)


def _status_kb() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f)
                if k in ("VmRSS", "VmHWM")}


def peak_rss_growth_kb(fn):
    """(fn(), how far this process's resident memory peaked above where it was, in KiB), while
    fn ran. The peak (VmHWM) is reset first (Linux: ``5`` > /proc/self/clear_refs), so a peak
    left by an earlier test cannot hide this one (ru_maxrss is the process's lifetime peak)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb()["VmRSS"]
    out = fn()
    return out, _status_kb()["VmHWM"] - before


def test_peak_rss_growth_sees_a_transient_allocation():
    def allocate_and_free():
        block = bytearray(200 * 1024 * 1024)
        block[:: 4096] = b"\1" * len(block[:: 4096])  # touch every page
        del block

    _, grew = peak_rss_growth_kb(allocate_and_free)
    assert grew > 150 * 1024


@pytest.mark.parametrize("max_pixels", [MAX_PIXELS, 10**12])
def test_png_bomb_is_refused_from_its_header(no_pixel_decoding, max_pixels):
    # 50000x50000 declared in a ~200-byte file: 2.5 G pixels once decoded. With max_pixels
    # raised past PIL's own limit, PIL's DecompressionBombError still refuses it.
    data = CORPUS["png_bomb_50000x50000"][0]
    assert len(data) < 1024
    err, peak_growth_kb = peak_rss_growth_kb(lambda: refusal(data, max_pixels=max_pixels))
    assert (err.status, err.code) == (413, "too_many_pixels")
    assert peak_growth_kb < 100 * 1024


def test_own_pixel_limit_applies_before_decoding(no_pixel_decoding):
    row = b"\x00" + bytes(1000 // 8)
    data = png_bytes(1000, 1000, row * 4, bit_depth=1)  # 1 M pixels declared, 4 rows carried
    err = refusal(data, max_pixels=999_999)
    assert (err.status, err.code) == (413, "too_many_pixels")
    assert "1000x1000" in str(err)


def test_pil_bomb_warning_becomes_a_refusal_and_filters_are_restored(monkeypatch):
    # Between MAX_IMAGE_PIXELS and twice that PIL only *warns*; that must refuse too, even
    # when our own max_pixels would allow the image.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    filters_before = list(warnings.filters)
    err = refusal(encode(solid("RGB", RED, (40, 40)), "PNG"), max_pixels=10**6)
    assert (err.status, err.code) == (413, "too_many_pixels")
    assert "1,000" in str(err)
    assert warnings.filters == filters_before


def test_memory_error_while_decoding_is_a_413(monkeypatch):
    def out_of_memory(self):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", out_of_memory)
    err = refusal(encode(solid("RGB", RED), "PNG"))
    assert (err.status, err.code) == (413, "image_too_large")


def test_truncated_images_are_not_silently_padded():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    for name in ("png_truncated", "jpeg_truncated", "gif_truncated"):
        assert refusal(CORPUS[name][0]).status == 400


def test_refuses_to_run_if_pil_pads_truncated_images(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode(CORPUS["png_truncated"][0])


@pytest.mark.parametrize(("size", "ok"), [((100, 1), True), ((101, 1), False), ((1, 101), False)])
def test_aspect_ratio_limit(size, ok):
    data = encode(solid("RGB", RED, size), "PNG")
    if ok:
        assert decode(data).shape == (3, 64, 64)
    else:
        err = refusal(data)
        assert (err.status, err.code) == (422, "invalid_image_dimensions")


# --- orientation and colour modes -----------------------------------------------------------


def red_left_blue_right(size=(64, 64)) -> Image.Image:
    img = solid("RGB", RED, size)
    img.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return img


def jpeg_with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_rotate_180():
    x = decode_pixels(jpeg_with_orientation(red_left_blue_right(), 3))
    assert_color(x[:, :, :6], BLUE, tol=8)
    assert_color(x[:, :, -6:], RED, tol=8)


def test_exif_orientation_rotate_90_clockwise():
    x = decode_pixels(jpeg_with_orientation(red_left_blue_right((64, 32)), 6))
    assert_color(x[:, :6, :], RED, tol=8)  # the left half is now on top
    assert_color(x[:, -6:, :], BLUE, tol=8)


@pytest.mark.parametrize(
    ("img", "expected"),
    [
        (solid("RGBA", (0, 0, 0, 0)), WHITE),
        (solid("RGBA", (255, 0, 0, 255)), RED),
        (solid("RGBA", (255, 0, 0, 128)), (255, 127, 127)),
        (solid("LA", (0, 0)), WHITE),
        (solid("LA", (0, 255)), (0, 0, 0)),
    ],
)
def test_alpha_is_composited_onto_white(img, expected):
    assert_color(decode_pixels(encode(img, "PNG")), expected)


def test_transparent_palette_entry_becomes_white():
    img = solid("P", 0)
    img.putpalette([0, 0, 0, 255, 0, 0])
    img.paste(1, (0, 0, 16, 8))  # top half red, bottom half index 0 = transparent black
    for fmt in ("PNG", "GIF"):
        x = decode_pixels(encode(img, fmt, transparency=0))
        assert_color(x[:, :6, :], RED)
        assert_color(x[:, -6:, :], WHITE)


def test_transparent_rgb_colour_becomes_white():
    data = encode(solid("RGB", (0, 0, 0)), "PNG", transparency=(0, 0, 0))  # a tRNS chunk
    assert_color(decode_pixels(data), WHITE)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [("L", 77, (77, 77, 77)), ("1", 1, WHITE), ("1", 0, (0, 0, 0))],
)
def test_grayscale(mode, value, expected):
    assert_color(decode_pixels(encode(solid(mode, value), "PNG")), expected)


def test_cmyk_jpeg():
    cmyk = solid("CMYK", (0, 255, 255, 0))  # red
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert_color(decode_pixels(data), cmyk.convert("RGB").getpixel((0, 0)), tol=3)


@pytest.mark.parametrize(("level", "expected"), [(0, 0), (256, 1), (32768, 128), (65535, 255)])
def test_16bit_grayscale_png_is_scaled_not_clipped(level, expected):
    data = encode(solid("I;16", level), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert_color(decode_pixels(data), (expected,) * 3, tol=0)


def test_16bit_grayscale_transparent_level_becomes_white():
    # Built with numpy: PIL's paste() of an integer into an "I;16" image writes the wrong level.
    levels = np.full((16, 16), 32768, dtype=np.uint16)
    levels[:8] = 1000
    img = Image.fromarray(levels)
    assert img.mode == "I;16"
    x = decode_pixels(encode(img, "PNG", transparency=32768))
    assert_color(x[:, :6, :], (3, 3, 3), tol=0)  # 1000 >> 8
    assert_color(x[:, -6:, :], WHITE, tol=0)


def test_16bit_rgb_png():
    # PIL opens 16-bit RGB as 8-bit "RGB" itself (high byte); check it stays mid-gray.
    row = b"\x00" + struct.pack(">3H", 32768, 32768, 32768) * 16
    data = png_bytes(16, 16, row * 16, bit_depth=16, color_type=2)
    assert_color(decode_pixels(data), (128, 128, 128), tol=0)


def test_to_rgb_scales_32bit_integer_mode_as_16bit():
    img = Image.new("I", (3, 1))
    img.putdata([-5, 32768, 70_000])  # out-of-range levels are clipped to 0..65535 first
    rgb = to_rgb(img)
    assert [rgb.getpixel((i, 0)) for i in range(3)] == [(0, 0, 0), (128, 128, 128), WHITE]


def test_to_rgb_refuses_float_images():
    with pytest.raises(ImageError) as caught:
        to_rgb(solid("F", 0.5))
    assert (caught.value.status, caught.value.code) == (422, "unsupported_image_mode")


# --- the JPEG draft path --------------------------------------------------------------------


@pytest.fixture
def resized_sizes(monkeypatch) -> list[tuple[int, int]]:
    """Sizes of the decoded images that decode_image hands to the shared resize."""
    sizes = []

    def spy(img, image_size, *args):
        sizes.append(img.size)
        return pil_to_uint8(img, image_size, *args)

    monkeypatch.setattr(preprocessing, "pil_to_uint8", spy)
    return sizes


def test_large_jpeg_is_decoded_at_reduced_scale(resized_sizes):
    gradient = Image.linear_gradient("L").resize((4000, 3000))
    upside_down = gradient.transpose(Image.Transpose.ROTATE_180)
    photo = Image.merge("RGB", [gradient, upside_down, solid("L", 100, gradient.size)])
    data = encode(photo, "JPEG", quality=90)

    x = decode_pixels(data, image_size=64)
    # libjpeg decoded at 1/8 scale (the largest that keeps both sides >= 64).
    assert resized_sizes == [(500, 375)]
    # ...and still agrees with a full-resolution decode (libjpeg's scaled IDCT is not
    # bit-identical to decode-then-resize; 1 level apart here, allow a little for other builds).
    full = pil_to_uint8(Image.open(io.BytesIO(data)).convert("RGB"), 64)
    assert (x - full.float()).abs().max().item() <= 4


def test_multi_picture_jpeg_uses_first_picture_and_draft(resized_sizes):
    # Many phones write MPO (a JPEG with extra pictures appended); PIL opens it as a JPEG.
    first, second = solid("RGB", RED, (1024, 768)), solid("RGB", BLUE, (1024, 768))
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert_color(decode_pixels(data, image_size=64), RED, tol=3)
    assert resized_sizes == [(128, 96)]


# --- concurrency ----------------------------------------------------------------------------


def test_concurrent_decoding_matches_sequential():
    inputs = [
        encode(noise_rgb(64, 48), "PNG"),
        jpeg_with_orientation(red_left_blue_right(), 3),
        CORPUS["png_bomb_10000x10000"][0],
        CORPUS["png_truncated"][0],
        CORPUS["tiff"][0],
    ] * 20

    def outcome(data):
        try:
            return decode(data)
        except ImageError as e:
            return (e.status, e.code)

    filters_before = list(warnings.filters)
    expected = [outcome(d) for d in inputs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(outcome, inputs))
    for a, b in zip(got, expected):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    assert warnings.filters == filters_before


def test_defer_above_skips_the_decode_of_a_larger_image_but_not_its_checks():
    from app.pipeline.preprocessing import decode_pixels
    from tests.conftest import png_bytes as png

    small, large = png(size=(32, 32)), png(size=(33, 32))
    assert decode_pixels(small, image_size=16, max_pixels=MAX_PIXELS, defer_above=32 * 32).shape == (3, 16, 16)
    assert decode_pixels(large, image_size=16, max_pixels=MAX_PIXELS, defer_above=32 * 32) is None
    assert torch.equal(decode_pixels(large, image_size=16, max_pixels=MAX_PIXELS),
                       decode_pixels(large, image_size=16, max_pixels=MAX_PIXELS, defer_above=33 * 32))
    # What the header alone refuses is refused either way, never deferred.
    with pytest.raises(ImageError) as info:
        decode_pixels(large, image_size=16, max_pixels=32 * 32, defer_above=16)
    assert info.value.code == "too_many_pixels"
    with pytest.raises(ImageError) as info:
        decode_pixels(b"not an image", image_size=16, max_pixels=MAX_PIXELS, defer_above=16)
    assert info.value.code == "invalid_image"
