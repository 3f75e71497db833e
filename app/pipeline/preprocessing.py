"""Untrusted upload bytes -> the model's input tensor.

Every byte here is hostile until proven otherwise. The steps run in an order chosen so that
the expensive or dangerous work happens only after the cheap checks have passed:

1. byte-level checks (empty, over ``max_bytes``);
2. a lazy ``Image.open`` restricted to the allowed formats: it parses the header only;
3. the pixel budget, checked on the size the header *declares*, before any pixel is decoded
   (a 50 KB PNG can declare 2.5 G pixels);
4. the full decode (``img.load()``), inside the ``try`` so that corrupt or truncated data
   becomes an :class:`ImageError` instead of a 500;
5. EXIF orientation, any mode -> RGB, then the one transform shared with training
   (:func:`models.transforms.pil_to_uint8` and :func:`models.transforms.normalize`), with the
   resize filter and JPEG draft choice of the checkpoint's :class:`~models.transforms.ImageTransform`.

Thread-safe: the only process-wide state touched is the warnings filter, under a lock.
"""

from __future__ import annotations

import io
import struct
import threading
import warnings
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from models.transforms import ImageTransform, normalize, pil_to_uint8

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")
_ALLOWED_NAMES = "PNG, JPEG, WebP, BMP or GIF"

# Squashing a 100:1 strip into a square leaves nothing a question could be asked about; such
# inputs are far more likely crafted than photographed (phone panoramas stay under ~10:1).
MAX_ASPECT_RATIO = 100

# What PIL may raise while identifying or decoding hostile bytes. Anything else (AttributeError,
# RuntimeError...) would be a bug in our code and is left to surface as a 500.
_DECODE_ERRORS = (
    OSError,  # includes UnidentifiedImageError, "image file is truncated", "broken data stream"
    ValueError,
    SyntaxError,  # PIL's plugins use it for "not a valid file of this format"
    struct.error,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ArithmeticError,  # ZeroDivisionError, OverflowError
)

# Modes PIL converts to RGB faithfully with a plain ``convert("RGB")``.
_PLAIN_MODES = frozenset({"1", "L", "P", "RGB", "CMYK", "YCbCr"})
# High-depth grayscale: ``convert()`` *clips* these to 255 instead of scaling them, so a
# mid-gray 16-bit pixel (32768) would come out white. "I" is included because older Pillow
# releases open 16-bit grayscale PNGs as "I".
_DEEP_GRAY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_WHITE = (255, 255, 255)

# Uploads we recognise but refuse (415 rather than 400), by their leading bytes. PIL can open
# some of these (TIFF, PSD, ICO...) and not others (PDF, HEIF), so PIL cannot name them all.
_REFUSED_SIGNATURES: tuple[tuple[str, tuple[bytes, ...]], ...] = (
    ("TIFF", (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")),
    ("PDF", (b"%PDF-",)),
    ("PostScript", (b"%!PS", b"\xc5\xd0\xd3\xc6")),
    ("Photoshop", (b"8BPS",)),
    ("ICO", (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00")),
    ("JPEG 2000", (b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")),
    ("JPEG XL", (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")),
)
# ISO-BMFF "ftyp" brands of HEIF/HEIC (iPhone photos) and AVIF.
_HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}
)

# warnings.catch_warnings() swaps the process-wide filter list; two threads interleaving it can
# restore each other's state and leave the filter changed for good. Held only around the
# header parse (microseconds), never around the decode.
_WARNINGS_LOCK = threading.Lock()


class ImageError(ValueError):
    """Bad image input. ``status`` is the HTTP status (400, 413, 415 or 422), ``code`` a short
    snake_case machine code, ``str(e)`` a human message safe to show a client (no paths, no
    tracebacks; the underlying PIL error, if any, is kept as ``__cause__`` for server logs)."""

    def __init__(self, message: str, *, code: str, status: int = 422):
        super().__init__(message)
        self.code = code
        self.status = status


def decode_image(
    data: bytes,
    *,
    image_size: int | None = None,
    mean: Sequence[float],
    std: Sequence[float],
    max_pixels: int,
    max_bytes: int | None = None,
    transform: ImageTransform | None = None,
) -> torch.Tensor:
    """Untrusted image bytes -> float32 ``[3, image_size, image_size]`` normalised tensor:
    :func:`decode_pixels`, then the model's normalisation."""
    return normalize(decode_pixels(data, image_size=image_size, max_pixels=max_pixels,
                                   max_bytes=max_bytes, transform=transform), mean, std)


def decode_pixels(
    data: bytes,
    *,
    image_size: int | None = None,
    max_pixels: int,
    max_bytes: int | None = None,
    transform: ImageTransform | None = None,
    defer_above: int | None = None,
) -> torch.Tensor | None:
    """Untrusted image bytes -> uint8 ``[3, image_size, image_size]`` RGB pixels.

    ``defer_above``: if the image's header declares more pixels than this (and no more than
    ``max_pixels``), return None without decoding it: the caller decodes small images where it
    stands and hands large ones to a thread.

    ``transform`` (the checkpoint's, ``model.cfg.image.transform``) says how to resize; given
    only ``image_size``, the project's default transform at that size is used.

    What the service's decode threads run: the float normalisation is left to the predictor,
    which does it once per batch on the device (a quarter of the bytes to copy to a GPU, and
    no torch kernels -- with their OpenMP threads -- competing with the forward pass on CPU).

    Accepts PNG, JPEG, WebP, BMP and GIF (first frame). Raises :class:`ImageError` for every
    input it refuses; its ``status``/``code`` say why (see the module's checks above).
    """
    if transform is None:
        if image_size is None:
            raise TypeError("decode_pixels needs image_size or transform")
        transform = ImageTransform(image_size)
    elif image_size is not None and image_size != transform.image_size:
        raise ValueError(f"image_size {image_size} differs from the transform's {transform.image_size}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Some module in this process flipped PIL's global "pad truncated files with grey"
        # switch; cut-off uploads would then be answered as if they were whole images.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on; refusing to decode")
    if not data:
        raise ImageError("the image is empty (0 bytes)", code="empty_image", status=400)
    if max_bytes is not None and len(data) > max_bytes:
        raise ImageError(
            f"the image is {len(data):,} bytes; the limit is {max_bytes:,}",
            code="image_too_large",
            status=413,
        )
    try:
        rgb = _decode_rgb(data, transform=transform, max_pixels=max_pixels, defer_above=defer_above)
        if rgb is None:
            return None
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL's own limit, checked inside Image.open before ours can run.
        pil_limit = Image.MAX_IMAGE_PIXELS or max_pixels
        limit = min(max_pixels, pil_limit)
        raise _too_many_pixels(f"the image has more than {limit:,} pixels") from e
    except MemoryError as e:
        raise ImageError(
            "the image needs more memory to decode than the server allows",
            code="image_too_large",
            status=413,
        ) from e
    except _DECODE_ERRORS as e:
        raise ImageError(
            "the image data is corrupt or truncated", code="invalid_image", status=400
        ) from e
    return pil_to_uint8(rgb, transform.image_size, transform.resample, transform.reducing_gap)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded PIL image -> mode "RGB".

    Transparency (alpha channel, transparent palette entry, tRNS colour) is composited onto
    white rather than dropped, so transparent pixels do not turn into whatever colour the
    encoder left under them (often black). 16-bit grayscale is scaled to 8 bits by keeping the
    high byte, as PIL itself does for 16-bit RGB PNGs. Modes with no faithful mapping
    (e.g. "F", floats of unknown range) raise ImageError 422.
    """
    if img.mode in _DEEP_GRAY_MODES:
        img = _deep_gray_to_8bit(img)
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, _WHITE)
        rgb.paste(rgba, mask=rgba)  # alpha blend: rgba * a + white * (1 - a)
        return rgb
    if img.mode not in _PLAIN_MODES:
        raise ImageError(
            f"pixel format {img.mode!r} is not supported",
            code="unsupported_image_mode",
            status=422,
        )
    return img if img.mode == "RGB" else img.convert("RGB")


def _decode_rgb(data: bytes, *, transform: ImageTransform, max_pixels: int,
                defer_above: int | None = None) -> Image.Image | None:
    img = _open(data)  # header only: no pixel has been decoded yet
    width, height = img.size
    if width * height > max_pixels:
        raise _too_many_pixels(
            f"the image is {width}x{height} = {width * height:,} pixels; "
            f"the limit is {max_pixels:,}"
        )
    if defer_above is not None and width * height > defer_above:
        return None
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):  # also catches a 0 side
        raise ImageError(
            f"the image is {width}x{height}; sides more than {MAX_ASPECT_RATIO}:1 apart "
            "cannot be resized to a square model input",
            code="invalid_image_dimensions",
            status=422,
        )
    # JPEG (and MPO, as many phones write): let libjpeg decode at 1/2, 1/4 or 1/8 scale (never
    # below image_size), so a 12 MP photo costs a fraction of the memory and time and is
    # resized down anyway -- unless the checkpoint's transform asks for full decodes.
    transform.draft(img)
    img.load()  # the full decode: corrupt or truncated data raises here
    ImageOps.exif_transpose(img, in_place=True)
    return to_rgb(img)


def _open(data: bytes) -> ImageFile.ImageFile:
    """Identify ``data`` among the allowed formats, parsing the header only."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        # Image.open warns (rather than raises) between MAX_IMAGE_PIXELS and twice that.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except Image.UnidentifiedImageError as e:
            refused = _refused_format_name(data)
            if refused is None:
                raise ImageError(
                    f"the data is not a valid image (send {_ALLOWED_NAMES})",
                    code="invalid_image",
                    status=400,
                ) from e
            raise ImageError(
                f"{refused} files are not supported (send {_ALLOWED_NAMES})",
                code="unsupported_image_format",
                status=415,
            ) from e


def _refused_format_name(data: bytes) -> str | None:
    """Name of a recognised but refused format that ``data`` starts like, else None."""
    for name, signatures in _REFUSED_SIGNATURES:
        if data.startswith(signatures):
            return name
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "HEIF or AVIF"
    # SVG is XML text: look for the root element near the start, past any XML declaration,
    # comments or doctype.
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<") and b"<svg" in head:
        return "SVG"
    return None


def _deep_gray_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (or "I") grayscale -> "L", or "LA" if a transparent level is declared."""
    levels = np.asarray(img)
    gray = (np.clip(levels, 0, 65535) >> 8).astype(np.uint8)
    transparent_level = img.info.get("transparency")
    if transparent_level is None:
        return Image.fromarray(gray)
    # Match the transparent level at full depth: after scaling, 256 levels share each byte.
    alpha = np.where(levels == transparent_level, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([gray, alpha], axis=-1))


def _too_many_pixels(message: str) -> ImageError:
    return ImageError(message, code="too_many_pixels", status=413)
