"""Hostile image uploads, generated in code, with the HTTP status each must get.

Shared by the preprocessing unit tests and the API tests (which send the same bytes over
HTTP). Deterministic and small: the whole corpus builds in a few milliseconds and no entry is
over 16 KB, so the statuses hold for any ``max_bytes`` of at least 16 KB and any
``max_pixels`` of at least 5,000. The bombs declare more than twice PIL's default
``Image.MAX_IMAGE_PIXELS``, so they are refused (413) even if ``max_pixels`` is set higher.
"""

from __future__ import annotations

import io
import random
import struct
import zlib

from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(tag: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, tag, body, CRC-32 of tag + body."""
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))


def png_bytes(
    width: int,
    height: int,
    scanlines: bytes,
    *,
    bit_depth: int = 8,
    color_type: int = 0,
    extra_chunks: bytes = b"",
) -> bytes:
    """A PNG written by hand, so that it may declare any size whatever the data holds.

    ``scanlines`` is the raw (filter byte + pixels) data for as many rows as the caller wants
    to pay for; ``color_type`` 0 is grayscale, 2 is RGB; ``extra_chunks`` go before IDAT.
    """
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", header)
        + extra_chunks
        + png_chunk(b"IDAT", zlib.compress(scanlines))
        + png_chunk(b"IEND", b"")
    )


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def _noise_image() -> Image.Image:
    # Noise does not compress, so cutting the file in half lands inside the pixel data.
    return Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))


def _bit_bomb_png(side: int) -> bytes:
    """A 1-bit ``side``×``side`` PNG carrying only 16 rows of data: a few hundred bytes that
    would need ``side``² bytes of memory once decoded (PIL stores "1" images a byte a pixel)."""
    row = b"\x00" + bytes((side + 7) // 8)  # filter byte + packed bits
    return png_bytes(side, side, row * 16, bit_depth=1)


def _patched(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    """``data`` with ``values`` packed over it at ``offset`` (e.g. to forge a header's size)."""
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def _webp_bomb() -> bytes:
    # A lossless WebP's VP8L header holds (width-1, height-1) as two 14-bit fields right after
    # the 0x2f signature byte; forge the maximum, 16384×16384.
    data = encode(Image.new("RGB", (4, 4)), "WEBP", lossless=True)
    offset = data.index(b"VP8L") + 8 + 1  # chunk tag, chunk size, signature byte
    (bits,) = struct.unpack_from("<I", data, offset)
    forged = (bits & ~0xFFFFFFF) | 16383 | (16383 << 14)
    return _patched(data, offset, "<I", forged)


def _bad_ihdr_crc_png() -> bytes:
    data = encode(Image.new("RGB", (8, 8), (10, 20, 30)), "PNG")
    crc_offset = len(PNG_SIGNATURE) + 8 + 13  # length + tag, then the 13-byte IHDR body
    (crc,) = struct.unpack_from(">I", data, crc_offset)
    return _patched(data, crc_offset, ">I", crc ^ 0xFFFFFFFF)


def _text_chunk_bomb_png() -> bytes:
    # A zTXt chunk of 2 KB that inflates to 2 MB of metadata, past PIL's MAX_TEXT_CHUNK (1 MB).
    ztxt = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(bytes(2 << 20), 9))
    return png_bytes(4, 4, (b"\x00" + bytes(4)) * 4, extra_chunks=ztxt)


def hostile_corpus() -> dict[str, tuple[bytes, int]]:
    """name -> (upload bytes, HTTP status the service must answer)."""
    noise_png = encode(_noise_image(), "PNG")
    noise_jpeg = encode(_noise_image(), "JPEG", quality=90)
    noise_gif = encode(_noise_image(), "GIF")
    noise_webp = encode(_noise_image(), "WEBP")
    tiny_gif = encode(Image.new("P", (2, 2)), "GIF")
    tiny_bmp = encode(Image.new("RGB", (2, 2)), "BMP")
    return {
        # 400: not an image, or a broken one.
        "empty": (b"", 400),
        "random_bytes": (random.Random(1234).randbytes(2048), 400),
        "text": (b"What colour is the shape?\n" * 40, 400),
        "html": (b"<!doctype html><html><body><img src=x></body></html>", 400),
        "png_signature_only": (PNG_SIGNATURE, 400),
        "png_truncated": (noise_png[: len(noise_png) // 2], 400),
        "png_bad_ihdr_crc": (_bad_ihdr_crc_png(), 400),
        "png_zero_width": (png_bytes(0, 16, b"\x00" * 16), 400),
        "png_text_chunk_bomb": (_text_chunk_bomb_png(), 400),
        "jpeg_truncated": (noise_jpeg[: len(noise_jpeg) // 2], 400),
        "jpeg_header_only": (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", 400),
        "gif_truncated": (noise_gif[: len(noise_gif) // 2], 400),
        "webp_truncated": (noise_webp[: len(noise_webp) // 2], 400),
        # 413: declares far more pixels than it carries (decompression bombs).
        "png_bomb_50000x50000": (_bit_bomb_png(50_000), 413),
        # Between PIL's warning and error thresholds: exercises the warning-as-error path.
        "png_bomb_10000x10000": (_bit_bomb_png(10_000), 413),
        "gif_bomb_65535x65535": (_patched(tiny_gif, 6, "<HH", 65535, 65535), 413),
        "bmp_bomb_100000x100000": (_patched(tiny_bmp, 18, "<ii", 100_000, 100_000), 413),
        "webp_bomb_16384x16384": (_webp_bomb(), 413),
        # 415: a recognised image or document format that is not accepted.
        "tiff": (encode(Image.new("RGB", (4, 4)), "TIFF"), 415),
        "pdf_header": (b"%PDF-1.7\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", 415),
        "svg": (
            b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="64" '
            b'height="64"><rect width="64" height="64" fill="red"/></svg>\n',
            415,
        ),
        "heic_header": (struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00mif1heic", 415),
        # 422: decodable, but no sensible square model input can be made from it.
        "png_5000x1_strip": (png_bytes(5000, 1, b"\x00" + bytes(5000)), 422),
    }
