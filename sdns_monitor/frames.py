"""Turn one input (encoded image bytes, a numpy array or a PIL image) into uint8 frames.

Every function returns a uint8 N x H x W x C array with C in 1, 3, 4, the layout that
`preprocess` expects, or raises `FrameError` with a one-line reason that ends up in the
dead-letter record. Inputs come from the network, so nothing here trusts them:

- The format is sniffed from magic bytes; the `content-type` header is only a hint, because
  producers get it wrong and a valid image must still decode.
- `.npy` payloads are read with `allow_pickle=False` after their header has been checked, so an
  object array is refused before any of its bytes are unpickled.
- Image dimensions are checked against `max_pixels` from the header, before pixel data is
  decoded, so a small file that claims to be 100000 x 100000 never allocates; an `.npy`
  batch's frame count against `max_frames`, before its data is read.
- With `min_size` (the model's input side), a JPEG is decoded at the smallest of PIL's DCT
  scales (1/2, 1/4, 1/8: `Image.draft`) that keeps both sides at least twice `min_size`, and
  the pixel cap applies to that size: a 4K frame for a 64 px model decodes at 1/8, in a
  fraction of the time and memory, and the resize to the model's input does the rest.
- Truncated images are errors (PIL's `LOAD_TRUNCATED_IMAGES` is left off): a half-received
  frame would otherwise be scored as a grey-bottomed image and raise a false alarm.

Array layout (DESIGN.md, Contracts -> Frames): H x W or H x W x C (C in 1, 3, 4) is one frame,
N x H x W x C is a batch of N frames; any other shape is refused as ambiguous, never guessed.

Example:
    >>> frames = decode_bytes(message.value, headers.get("content-type"))
    >>> frames.shape  # (1, 480, 640, 3) for a JPEG
"""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sdns_monitor.errors import FrameError

__all__ = ["DEFAULT_MAX_PIXELS", "decode_bytes", "from_array", "from_pil"]

DEFAULT_MAX_PIXELS = 64_000_000
"""Largest frame (width x height, summed over a batch) that `decode_bytes` accepts."""

_CHANNELS = (1, 3, 4)

# Magic bytes of the formats we accept. GIF is not named in the contract but is accepted
# because cameras and test tools emit it; its first frame is used.
_NPY_MAGIC = b"\x93NUMPY"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_GIF_MAGICS = (b"GIF87a", b"GIF89a")

# Exceptions PIL's parsers raise on malformed input. Anything in this list means "bad frame".
_PIL_ERRORS: tuple[type[BaseException], ...] = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    IndexError,
    KeyError,
    TypeError,
)

# PIL modes that np.asarray turns directly into an array we can use, with their channels.
_DIRECT_MODES = {"L": 1, "RGB": 3, "RGBA": 4}
# Modes that PIL converts faithfully to RGB or RGBA.
_TO_RGB = frozenset({"CMYK", "YCbCr", "LAB", "HSV", "RGBX"})
_TO_RGBA = frozenset({"LA", "PA", "RGBa"})


def decode_bytes(
    data: bytes,
    content_type: str | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int | None = None,
    min_size: int | None = None,
) -> np.ndarray:
    """Decode encoded image bytes (JPEG, PNG, WebP, GIF) or an `.npy` array to uint8 frames.

    Returns a uint8 N x H x W x C array, C in 1, 3, 4: N = 1 for an image file, N >= 1 for an
    `.npy` batch. The format is sniffed from the bytes; `content_type` (the message's
    `content-type` header) is used only to make the error message more helpful.

    `max_frames` caps the frames of an `.npy` batch; `min_size` lets a JPEG decode at reduced
    size (see the module docstring).

    Raises:
        FrameError: empty, unrecognised, truncated or corrupt bytes; a frame larger than
            `max_pixels`; an `.npy` array of a refused dtype, an ambiguous shape or more than
            `max_frames` frames.
    """
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    data = bytes(data) if not isinstance(data, bytes) else data
    if not data:
        raise FrameError("empty message value: send JPEG, PNG, WebP or .npy bytes")
    if data.startswith(_NPY_MAGIC):
        return _decode_npy(data, max_pixels, max_frames)
    fmt = _sniff_image(data)
    if fmt is None:
        hint = f" (content-type says {content_type!r})" if content_type else ""
        raise FrameError(
            f"unrecognised frame format{hint}, first bytes {data[:8]!r}: "
            "send JPEG, PNG, WebP or .npy bytes"
        )
    return _decode_image(data, fmt, max_pixels, min_size)


def from_array(array: np.ndarray) -> np.ndarray:
    """Turn a numpy array into uint8 N x H x W x C frames, following the layout contract.

    Layout: H x W and H x W x C (C in 1, 3, 4) are one frame; N x H x W x C is a batch. Any
    other shape (e.g. channels-first 3 x 28 x 28) raises FrameError, never a guess.

    Values by dtype:
        - uint8: kept as is.
        - bool: False -> 0, True -> 255.
        - uint16: scaled by the 16-bit range (v >> 8), as 16-bit PNGs are.
        - other integers: must already lie in 0..255; anything else is refused, since there is
          no range to scale by that would not be a guess.
        - floats: must be finite and >= 0; with max <= 1 they are taken as [0, 1] and scaled
          by 255, with max <= 255 as [0, 255]; both are rounded to the nearest integer. Note
          that a [0, 255] image whose brightest pixel is <= 1 is read as [0, 1].
        - complex, object, string, structured, datetime: refused.

    Returns a C-contiguous uint8 array; for contiguous uint8 input it is a view of the input
    (no copy), so copy it before writing to it.
    """
    array = np.asarray(array)
    n, h, w, c = _layout(array.shape)
    pixels = _to_uint8(array)
    return np.ascontiguousarray(pixels.reshape(n, h, w, c))


def from_pil(image: Image.Image) -> np.ndarray:
    """Turn a PIL image into a uint8 1 x H x W x C array (C in 1, 3, 4).

    The EXIF orientation is applied, so a phone picture comes out the way it is displayed.
    Modes: L -> 1 channel; RGB -> 3; RGBA -> 4; 1 -> L (0/255); LA, PA -> RGBA; P (palette) ->
    RGBA if it has transparency, else RGB; CMYK, YCbCr, LAB, HSV -> RGB; I;16* -> L by v >> 8;
    I (32-bit) -> L by clipping to 0..65535 and v >> 8 (PIL uses I for 16-bit data); F -> by the
    float rule of `from_array`. Of an animated image only the current (normally first) frame is
    used.

    Raises:
        FrameError: the image cannot be decoded or has a mode that has no 8-bit equivalent.
    """
    if image.width <= 0 or image.height <= 0:
        raise FrameError(f"empty {image.width} x {image.height} image: send a non-empty frame")
    try:
        # exif_transpose returns a transposed copy; a corrupt EXIF block is a bad frame.
        oriented = ImageOps.exif_transpose(image)
        oriented = image if oriented is None else oriented
        frame = _pil_to_array(oriented)
    except FrameError:
        raise
    except _PIL_ERRORS as exc:
        raise FrameError(f"cannot convert image to pixels: {_one_line(exc)}") from exc
    return np.ascontiguousarray(frame[None])


def _sniff_image(data: bytes) -> str | None:
    """PIL name of the image format the magic bytes announce, or None.

    Image.open is then allowed that one plugin only: the rarely used decoders (and their bugs)
    stay away from untrusted bytes, and PIL does not try every plugin in turn.
    """
    if data.startswith(_PNG_MAGIC):
        return "PNG"
    if data.startswith(_JPEG_MAGIC):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(_GIF_MAGICS):
        return "GIF"
    return None


def _decode_image(data: bytes, fmt: str, max_pixels: int, min_size: int | None) -> np.ndarray:
    """Open with PIL (header only), check the size, then decode the pixels."""
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as image:
            if fmt == "JPEG" and min_size is not None:
                # The DCT scale that keeps both sides >= 2 x min_size (or none at all).
                image.draft(image.mode, (2 * min_size, 2 * min_size))
            # Image.open has parsed the header only; refuse large frames before load().
            width, height = image.size
            if width * height > max_pixels:
                raise FrameError(
                    f"{fmt} image of {width} x {height} pixels exceeds max_pixels={max_pixels}: "
                    "send a smaller frame or raise max_pixels"
                )
            image.load()
            return from_pil(image)
    except FrameError:
        raise
    except Image.DecompressionBombError as exc:
        # PIL's own limit, hit inside Image.open when the header claims a gigantic image.
        raise FrameError(
            f"{fmt} image too large to decode ({_one_line(exc)}): send a smaller frame"
        ) from exc
    except UnidentifiedImageError as exc:
        # Its message holds the BytesIO's address, which would make every reason unique.
        raise FrameError(
            f"cannot decode {fmt} image: corrupt header: send a complete, valid {fmt} file"
        ) from exc
    except _PIL_ERRORS as exc:
        raise FrameError(
            f"cannot decode {fmt} image ({_one_line(exc)}): send a complete, valid {fmt} file"
        ) from exc


def _decode_npy(data: bytes, max_pixels: int, max_frames: int | None) -> np.ndarray:
    """Read an .npy payload: check the header (dtype, shape, length) before the data."""
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _fortran_order, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _fortran_order, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            # Version 3 only exists for non-latin-1 field names, i.e. structured dtypes.
            raise FrameError(f".npy format version {version} is not supported: save with np.save")
    except FrameError:
        raise
    except Exception as exc:
        # The header is at most a few KB of Python-literal text that numpy tokenizes and
        # literal_evals; whatever that parser raises (tokenize.TokenError, RecursionError,
        # ValueError, ...), the header is corrupt.
        raise FrameError(f"corrupt .npy header: {_one_line(exc)}") from exc

    _check_dtype(dtype)
    n, h, w, _ = _layout(tuple(shape))
    if max_frames is not None and n > max_frames:
        raise FrameError(
            f".npy array of shape {tuple(shape)} holds {n} frames, more than "
            f"max_frames_per_message={max_frames}: send fewer frames per message"
        )
    if n * h * w > max_pixels:
        raise FrameError(
            f".npy array of shape {tuple(shape)} holds {n * h * w} pixels, more than "
            f"max_pixels={max_pixels}: send fewer or smaller frames, or raise max_pixels"
        )
    expected = math.prod(shape) * dtype.itemsize
    available = len(data) - fp.tell()
    if available < expected:
        raise FrameError(
            f"truncated .npy: header promises {expected} data bytes, message has {available}"
        )
    try:
        # The header has been checked, so np.load allocates no more than the message holds;
        # allow_pickle=False is the second line of defence against object arrays.
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise FrameError(f"cannot read .npy: {_one_line(exc)}") from exc
    return from_array(array)


def _layout(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """N, H, W, C of an array shape under the layout contract, or FrameError."""
    if len(shape) == 2:
        n, h, w, c = 1, shape[0], shape[1], 1
    elif len(shape) == 3 and shape[2] in _CHANNELS:
        n, h, w, c = 1, shape[0], shape[1], shape[2]
    elif len(shape) == 4 and shape[3] in _CHANNELS:
        n, h, w, c = shape
    else:
        raise FrameError(
            f"ambiguous shape {shape}: send H x W, H x W x C or N x H x W x C with C in "
            "1, 3, 4 (channels last; transpose channels-first arrays)"
        )
    if min(n, h, w) <= 0:
        raise FrameError(f"empty array of shape {shape}: every dimension must be at least 1")
    return n, h, w, c


def _check_dtype(dtype: np.dtype) -> None:
    """Refuse dtypes that do not hold pixel values (before any data is read)."""
    if dtype.hasobject or dtype.fields is not None or dtype.kind not in "biuf":
        raise FrameError(
            f"unsupported array dtype {dtype}: send uint8, uint16, bool, integer or float pixels"
        )


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Pixel values of any accepted dtype as uint8, by the rules in `from_array`."""
    _check_dtype(array.dtype)
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        return array
    if kind == "b":
        return array.astype(np.uint8) * np.uint8(255)
    if kind == "u" and array.dtype.itemsize == 2:
        return (array >> 8).astype(np.uint8)
    if kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise FrameError(
                f"{array.dtype} pixel values span {low}..{high}, outside 0..255: send uint8, "
                "or uint16 for 16-bit data"
            )
        return array.astype(np.uint8)
    # Floats. Work in float32 unless the input is wider, so float16 does not lose 0.5 steps.
    values = array.astype(np.float64 if array.dtype.itemsize > 4 else np.float32)
    if not np.isfinite(values).all():
        raise FrameError("array holds NaN or infinite values: send finite pixel values")
    low_f, high_f = float(values.min()), float(values.max())
    if low_f < 0.0 or high_f > 255.0:
        raise FrameError(
            f"float pixel values span {low_f:g}..{high_f:g}: send values in [0, 1] or [0, 255]"
        )
    scale = 255.0 if high_f <= 1.0 else 1.0
    return np.rint(np.multiply(values, scale)).astype(np.uint8)


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """H x W x C uint8 pixels of a PIL image, by the mode rules in `from_pil`."""
    mode = image.mode
    if mode == "1":
        image, mode = image.convert("L"), "L"
    elif mode == "P":
        mode = "RGBA" if _has_transparency(image) else "RGB"
        image = image.convert(mode)
    elif mode in _TO_RGBA:
        image, mode = image.convert("RGBA"), "RGBA"
    elif mode in _TO_RGB:
        image, mode = image.convert("RGB"), "RGB"

    if mode in _DIRECT_MODES:
        pixels = np.asarray(image, dtype=np.uint8)
        return pixels.reshape(pixels.shape[0], pixels.shape[1], _DIRECT_MODES[mode])
    if mode.startswith("I;16"):
        # np.asarray honours the byte order of I;16B / I;16L; the uint16 rule then applies.
        return _to_uint8(np.asarray(image).astype(np.uint16))[..., None]
    if mode == "I":
        # PIL opens 16-bit grayscale as mode I in some versions: scale by the 16-bit range.
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        return (values >> 8).astype(np.uint8)[..., None]
    if mode == "F":
        return _to_uint8(np.asarray(image, dtype=np.float32))[..., None]
    raise FrameError(f"unsupported image mode {mode!r}: send 8-bit grayscale, RGB or RGBA")


def _has_transparency(image: Image.Image) -> bool:
    """Whether a palette image carries transparency (tRNS chunk or an RGBA palette)."""
    has = getattr(image, "has_transparency_data", None)
    if has is not None:  # Pillow >= 10.1
        return bool(has)
    return "transparency" in image.info


def _one_line(exc: BaseException) -> str:
    """An exception as one short line, for dead-letter headers and log lines."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]
