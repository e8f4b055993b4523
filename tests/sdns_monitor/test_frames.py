"""Tests of sdns_monitor.frames: decoding untrusted frame bytes and arrays into uint8 frames."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, features

from sdns_monitor.errors import FrameError
from sdns_monitor.frames import decode_bytes, from_array, from_pil
from sdns_monitor.preprocess import prepare_uint8

RNG = np.random.default_rng(1234)

needs_webp = pytest.mark.skipif(not features.check("webp"), reason="Pillow built without WebP")


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def random_uint8(shape: tuple[int, ...]) -> np.ndarray:
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height RGB pixels, with a few bytes of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


# --- lossless round trips --------------------------------------------------------------------


def test_png_grayscale_round_trip_is_exact() -> None:
    pixels = random_uint8((13, 17))
    out = decode_bytes(encode(Image.fromarray(pixels), "PNG"))
    assert out.shape == (1, 13, 17, 1)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, ..., 0], pixels)


@pytest.mark.parametrize("channels", [3, 4])
def test_png_rgb_and_rgba_round_trip_is_exact(channels: int) -> None:
    pixels = random_uint8((9, 11, channels))
    out = decode_bytes(encode(Image.fromarray(pixels), "PNG"))
    assert out.shape == (1, 9, 11, channels)
    np.testing.assert_array_equal(out[0], pixels)


def test_png_16bit_is_scaled_to_8bit_by_the_high_byte() -> None:
    pixels = RNG.integers(0, 65536, size=(6, 7), dtype=np.uint16)
    image = Image.fromarray(pixels)
    assert image.mode.startswith("I;16")
    out = decode_bytes(encode(image, "PNG"))
    assert out.shape == (1, 6, 7, 1)
    np.testing.assert_array_equal(out[0, ..., 0], (pixels >> 8).astype(np.uint8))


def test_palette_png_without_transparency_becomes_rgb() -> None:
    image = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="P")
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    out = decode_bytes(encode(image, "PNG"))
    assert out.shape == (1, 2, 2, 3)
    np.testing.assert_array_equal(out[0, 0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 0, 1], [0, 0, 255])


def test_palette_png_with_transparency_becomes_rgba() -> None:
    image = Image.fromarray(np.array([[0, 1], [1, 0]], dtype=np.uint8), mode="P")
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    out = decode_bytes(encode(image, "PNG", transparency=1))
    assert out.shape == (1, 2, 2, 4)
    np.testing.assert_array_equal(out[0, 0, 0], [255, 0, 0, 255])
    assert out[0, 0, 1, 3] == 0  # index 1 is the transparent one


@needs_webp
@pytest.mark.parametrize("channels", [3, 4])
def test_lossless_webp_round_trip_is_exact(channels: int) -> None:
    pixels = random_uint8((10, 12, channels))
    data = encode(Image.fromarray(pixels), "WEBP", lossless=True, exact=True)
    out = decode_bytes(data)
    assert out.shape == (1, 10, 12, channels)
    np.testing.assert_array_equal(out[0], pixels)


# --- lossy formats: shape, dtype and approximate values ---------------------------------------


def test_jpeg_rgb_decodes_to_close_values() -> None:
    pixels = np.full((16, 24, 3), (200, 40, 90), dtype=np.uint8)
    out = decode_bytes(encode(Image.fromarray(pixels), "JPEG", quality=95))
    assert out.shape == (1, 16, 24, 3)
    assert out.dtype == np.uint8
    assert np.abs(out[0].astype(int) - pixels).max() <= 4


def test_jpeg_grayscale_keeps_one_channel() -> None:
    pixels = np.full((8, 8), 123, dtype=np.uint8)
    out = decode_bytes(encode(Image.fromarray(pixels), "JPEG", quality=95))
    assert out.shape == (1, 8, 8, 1)
    assert np.abs(out.astype(int) - 123).max() <= 2


def test_cmyk_jpeg_becomes_rgb() -> None:
    red_in_cmyk = (0, 255, 255, 0)
    data = encode(Image.new("CMYK", (16, 16), red_in_cmyk), "JPEG", quality=95)
    out = decode_bytes(data)
    assert out.shape == (1, 16, 16, 3)
    assert np.abs(out[0].astype(int) - [255, 0, 0]).max() <= 8


def test_jpeg_exif_orientation_is_applied() -> None:
    # 40 wide, 20 high, red square in the top-left corner; Orientation 6 = rotate 90° clockwise
    # to display, so the decoded frame is 40 high, 20 wide with the red square top-right.
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_bytes(encode(image, "JPEG", quality=95, exif=exif))
    assert out.shape == (1, 40, 20, 3)
    top_right = out[0, 2:8, 12:18].reshape(-1, 3).mean(axis=0)
    top_left = out[0, 2:8, 2:8].reshape(-1, 3).mean(axis=0)
    assert top_right[0] > 200 and top_right[2] < 60
    assert top_left[2] > 200 and top_left[0] < 60


def test_animated_gif_uses_the_first_frame() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (8, 6), c) for c in colours]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    with Image.open(io.BytesIO(data)) as written:
        assert getattr(written, "n_frames", 1) == 3
    out = decode_bytes(data)
    assert out.shape == (1, 6, 8, 3)
    np.testing.assert_array_equal(out[0].reshape(-1, 3), np.tile([255, 0, 0], (48, 1)))


# --- content-type is a hint only --------------------------------------------------------------


def test_wrong_content_type_still_decodes() -> None:
    pixels = random_uint8((5, 5, 3))
    png = encode(Image.fromarray(pixels), "PNG")
    np.testing.assert_array_equal(decode_bytes(png, "image/jpeg")[0], pixels)
    np.testing.assert_array_equal(decode_bytes(npy_bytes(pixels), "image/png")[0], pixels)


def test_unrecognised_bytes_mention_the_content_type_hint() -> None:
    with pytest.raises(FrameError, match=r"unrecognised.*image/png"):
        decode_bytes(b"hello, this is not an image", "image/png")


# --- .npy payloads ----------------------------------------------------------------------------


def test_npy_single_frame() -> None:
    pixels = random_uint8((7, 9))
    out = decode_bytes(npy_bytes(pixels))
    assert out.shape == (1, 7, 9, 1)
    np.testing.assert_array_equal(out[0, ..., 0], pixels)


def test_npy_float_batch_in_unit_range() -> None:
    batch = RNG.random((4, 6, 5, 3)).astype(np.float32)
    out = decode_bytes(npy_bytes(batch), "application/x-npy")
    assert out.shape == (4, 6, 5, 3)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.rint(batch * 255).astype(np.uint8))


def test_npy_fortran_order_and_big_endian_are_read_correctly() -> None:
    pixels = RNG.integers(0, 65536, size=(2, 4, 3, 1)).astype(">u2")
    out = decode_bytes(npy_bytes(np.asfortranarray(pixels)))
    np.testing.assert_array_equal(out, (pixels.astype(np.uint16) >> 8).astype(np.uint8))


_EXECUTED: list[str] = []


def _record_execution() -> str:
    _EXECUTED.append("pickle payload ran")
    return "boom"


class _Payload:
    """Unpickling this calls _record_execution: the test checks that it never happens."""

    def __reduce__(self) -> tuple[object, tuple[()]]:
        return _record_execution, ()


def test_npy_object_array_is_refused_without_unpickling() -> None:
    data = npy_bytes(np.array([[_Payload()]], dtype=object), allow_pickle=True)
    _EXECUTED.clear()
    with pytest.raises(FrameError, match="dtype"):
        decode_bytes(data)
    assert _EXECUTED == []


def test_npy_with_huge_claimed_shape_and_short_data_is_refused_quickly() -> None:
    # Header claims a 1 x 5000 x 5000 x 3 float64 batch (600 MB); the message has 16 bytes.
    header = npy_bytes(np.zeros((1, 1, 1, 3)))
    claimed = header.replace(b"(1, 1, 1, 3)", b"(1, 5000, 5000, 3)")
    assert claimed != header
    start = time.perf_counter()
    with pytest.raises(FrameError, match="truncated"):
        decode_bytes(claimed)
    assert time.perf_counter() - start < 1.0


def test_npy_over_max_pixels_is_refused() -> None:
    with pytest.raises(FrameError, match="max_pixels"):
        decode_bytes(npy_bytes(np.zeros((3, 10, 10, 1), np.uint8)), max_pixels=299)
    assert decode_bytes(npy_bytes(np.zeros((3, 10, 10, 1), np.uint8)), max_pixels=300).shape == (
        3,
        10,
        10,
        1,
    )


def test_npy_complex_is_refused() -> None:
    with pytest.raises(FrameError, match="dtype"):
        decode_bytes(npy_bytes(np.zeros((4, 4), dtype=np.complex64)))


def test_npz_archive_is_refused() -> None:
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((4, 4), np.uint8))
    with pytest.raises(FrameError, match="unrecognised"):
        decode_bytes(buf.getvalue())


# --- bad bytes --------------------------------------------------------------------------------


def test_empty_bytes_are_refused() -> None:
    with pytest.raises(FrameError, match="empty"):
        decode_bytes(b"")


def test_random_bytes_are_refused() -> None:
    with pytest.raises(FrameError):
        decode_bytes(RNG.bytes(4096))


@pytest.mark.parametrize(
    ("fmt", "magic"),
    [("PNG", b"\x89PNG\r\n\x1a\n"), ("JPEG", b"\xff\xd8\xff\xe0"), ("GIF", b"GIF89a")],
)
def test_random_bytes_behind_a_valid_magic_are_refused(fmt: str, magic: bytes) -> None:
    # The reason names the sniffed format (corrupt data, or a garbage header claiming a size).
    with pytest.raises(FrameError, match=rf"{fmt} image") as info:
        decode_bytes(magic + np.random.default_rng(5).bytes(2048))
    assert "0x" not in str(info.value)  # no object addresses: equal faults, equal reasons


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image_is_refused(fmt: str) -> None:
    data = encode(Image.fromarray(random_uint8((64, 64, 3))), fmt)
    with pytest.raises(FrameError, match=f"cannot decode {fmt} image.*truncated") as info:
        decode_bytes(data[: len(data) // 2])
    assert "\n" not in str(info.value)


def test_truncated_npy_is_refused() -> None:
    data = npy_bytes(random_uint8((16, 16, 3)))
    with pytest.raises(FrameError, match="truncated"):
        decode_bytes(data[:-10])


def test_png_claiming_huge_size_is_refused_before_decoding() -> None:
    # 100000 x 100000 x 3 would be 30 GB; refusing from the header is instant.
    start = time.perf_counter()
    with pytest.raises(FrameError, match="PNG image too large") as info:
        decode_bytes(png_header_only(100_000, 100_000))
    assert time.perf_counter() - start < 1.0
    assert "\n" not in str(info.value)


def test_png_over_max_pixels_is_refused_by_our_own_limit() -> None:
    # 8500 x 8500 = 72 M pixels: above the 64 M default, below PIL's own bomb limits.
    start = time.perf_counter()
    with pytest.raises(FrameError, match="max_pixels"):
        decode_bytes(png_header_only(8500, 8500))
    assert time.perf_counter() - start < 1.0
    small = encode(Image.fromarray(random_uint8((20, 20))), "PNG")
    with pytest.raises(FrameError, match="max_pixels=399"):
        decode_bytes(small, max_pixels=399)
    assert decode_bytes(small, max_pixels=400).shape == (1, 20, 20, 1)


def _seed_payloads() -> list[bytes]:
    rgb = Image.fromarray(random_uint8((12, 10, 3)))
    seeds = [
        encode(rgb, "PNG"),
        encode(rgb.convert("P"), "PNG", transparency=3),
        encode(rgb, "JPEG"),
        encode(rgb.convert("CMYK"), "JPEG"),
        encode(rgb, "GIF"),
        npy_bytes(random_uint8((2, 4, 4, 3))),
        npy_bytes(RNG.random((4, 4))),
    ]
    if features.check("webp"):
        seeds.append(encode(rgb, "WEBP", lossless=True))
    return seeds


_SEEDS = _seed_payloads()


@st.composite
def _mutated_payloads(draw: st.DrawFn) -> bytes:
    """A valid payload with a few bytes overwritten and maybe cut short: reaches the parsers,
    which random bytes (rejected at the magic check) would not."""
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) if draw(st.booleans()) else bytes(data)


_PAYLOADS = st.one_of(st.binary(max_size=512), _mutated_payloads())
_CONTENT_TYPES = st.none() | st.sampled_from(["image/png", "image/jpeg", "application/x-npy"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=_PAYLOADS, content_type=_CONTENT_TYPES)
def test_arbitrary_bytes_decode_or_raise_frame_error(data: bytes, content_type: str | None) -> None:
    _decodes_or_refuses(data, content_type)


@pytest.mark.slow
@settings(max_examples=20_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=_PAYLOADS, content_type=_CONTENT_TYPES)
def test_decoder_fuzzing_long_run(data: bytes, content_type: str | None) -> None:
    """The same property, 100 times longer (`make test-slow`; a few minutes)."""
    _decodes_or_refuses(data, content_type)


def _decodes_or_refuses(data: bytes, content_type: str | None) -> None:
    try:
        out = decode_bytes(data, content_type)
    except FrameError as exc:
        assert "\n" not in str(exc)
        return
    assert out.dtype == np.uint8
    assert out.ndim == 4 and out.shape[-1] in (1, 3, 4)
    assert min(out.shape) >= 1


# --- from_array: layout rule ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((5, 6), (1, 5, 6, 1)),
        ((5, 6, 1), (1, 5, 6, 1)),
        ((5, 6, 3), (1, 5, 6, 3)),
        ((5, 6, 4), (1, 5, 6, 4)),
        ((2, 5, 6, 3), (2, 5, 6, 3)),
        ((1, 5, 6, 1), (1, 5, 6, 1)),
    ],
)
def test_from_array_accepts_the_contract_layouts(
    shape: tuple[int, ...], expected: tuple[int, ...]
) -> None:
    pixels = random_uint8(shape)
    out = from_array(pixels)
    assert out.shape == expected
    np.testing.assert_array_equal(out.reshape(shape), pixels)


@pytest.mark.parametrize(
    "shape", [(3, 28, 28), (2, 3, 4, 5, 6), (7,), (2, 28, 28, 2), (28, 28, 5), (2, 3, 28, 28)]
)
def test_from_array_refuses_ambiguous_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(FrameError, match="ambiguous shape"):
        from_array(np.zeros(shape, dtype=np.uint8))


def test_ambiguous_npy_is_refused_by_decode_bytes() -> None:
    with pytest.raises(FrameError, match="ambiguous shape"):
        decode_bytes(npy_bytes(np.zeros((3, 28, 28), dtype=np.uint8)))


@pytest.mark.parametrize("shape", [(0, 5), (5, 0, 3), (0, 4, 4, 3)])
def test_from_array_refuses_empty_arrays(shape: tuple[int, ...]) -> None:
    with pytest.raises(FrameError, match="empty"):
        from_array(np.zeros(shape, dtype=np.uint8))


# --- from_array: dtype rules ------------------------------------------------------------------


def test_bool_becomes_0_and_255() -> None:
    out = from_array(np.array([[True, False]]))
    np.testing.assert_array_equal(out[0, ..., 0], [[255, 0]])


def test_uint16_keeps_the_high_byte() -> None:
    out = from_array(np.array([[0, 255, 256, 65535]], dtype=np.uint16))
    np.testing.assert_array_equal(out[0, ..., 0], [[0, 0, 1, 255]])


def test_other_integers_in_0_255_are_kept_and_out_of_range_refused() -> None:
    np.testing.assert_array_equal(from_array(np.array([[0, 7, 255]]))[0, ..., 0], [[0, 7, 255]])
    with pytest.raises(FrameError, match=r"outside 0\.\.255"):
        from_array(np.array([[0, 256]], dtype=np.int32))
    with pytest.raises(FrameError, match=r"outside 0\.\.255"):
        from_array(np.array([[-1, 3]], dtype=np.int8))


def test_float_unit_range_is_scaled_and_0_255_range_rounded() -> None:
    unit = from_array(np.array([[0.0, 0.5, 1.0]], dtype=np.float16))
    np.testing.assert_array_equal(unit[0, ..., 0], [[0, 128, 255]])
    wide = from_array(np.array([[0.0, 2.4, 254.6]], dtype=np.float64))
    np.testing.assert_array_equal(wide[0, ..., 0], [[0, 2, 255]])


@pytest.mark.parametrize("bad", [[[0.0, 256.0]], [[-0.1, 0.5]]])
def test_float_out_of_range_is_refused(bad: list[list[float]]) -> None:
    with pytest.raises(FrameError, match=r"\[0, 1\] or \[0, 255\]"):
        from_array(np.array(bad, dtype=np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_floats_are_refused(bad: float) -> None:
    array = np.full((4, 4, 3), 0.5, dtype=np.float32)
    array[1, 2, 0] = bad
    with pytest.raises(FrameError, match="NaN or infinite"):
        from_array(array)
    with pytest.raises(FrameError, match="NaN or infinite"):
        decode_bytes(npy_bytes(array))


@pytest.mark.parametrize("dtype", [np.complex128, object, "U3", [("r", "u1"), ("g", "u1")]])
def test_non_pixel_dtypes_are_refused(dtype: object) -> None:
    with pytest.raises(FrameError, match="dtype"):
        from_array(np.zeros((4, 4), dtype=dtype))  # type: ignore[call-overload]


# --- from_pil: modes --------------------------------------------------------------------------


def test_pil_mode_1_becomes_gray_0_255() -> None:
    image = Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).convert("1")
    np.testing.assert_array_equal(from_pil(image)[0, ..., 0], [[0, 255]])


def test_pil_mode_la_becomes_rgba() -> None:
    image = Image.merge("LA", [Image.new("L", (2, 1), 90), Image.new("L", (2, 1), 30)])
    out = from_pil(image)
    assert out.shape == (1, 1, 2, 4)
    np.testing.assert_array_equal(out[0, 0, 0], [90, 90, 90, 30])


def test_pil_mode_i_is_scaled_by_16_bit_range() -> None:
    image = Image.fromarray(np.array([[0, 256, 65535, 70000, -5]], dtype=np.int32), mode="I")
    np.testing.assert_array_equal(from_pil(image)[0, ..., 0], [[0, 1, 255, 255, 0]])


def test_pil_mode_f_follows_the_float_rule() -> None:
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    np.testing.assert_array_equal(from_pil(image)[0, ..., 0], [[0, 128, 255]])
    with pytest.raises(FrameError):
        from_pil(Image.fromarray(np.array([[0.0, 300.0]], dtype=np.float32), mode="F"))


def test_pil_rgb_is_one_frame_batch() -> None:
    pixels = random_uint8((3, 4, 3))
    out = from_pil(Image.fromarray(pixels))
    assert out.shape == (1, 3, 4, 3) and out.flags.c_contiguous
    np.testing.assert_array_equal(out[0], pixels)


# --- resource bounds of hostile input ------------------------------------------------------


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_an_npy_of_many_tiny_frames_is_refused_from_its_header() -> None:
    payload = _npy_bytes(np.zeros((20_000, 1, 1, 1), np.uint8))  # 20 KB, 20,000 frames
    with pytest.raises(
        FrameError, match="holds 20000 frames, more than max_frames_per_message=256"
    ):
        decode_bytes(payload, max_frames=256)
    assert decode_bytes(payload).shape == (20_000, 1, 1, 1)  # the library's own default: no cap


def test_a_small_png_claiming_a_huge_image_is_refused_before_decoding() -> None:
    buf = io.BytesIO()
    Image.new("RGBA", (8000, 8000)).save(buf, "PNG")  # about 250 KB, 256 MB decoded
    data = buf.getvalue()
    assert len(data) < 300_000
    with pytest.raises(FrameError, match="8000 x 8000 pixels exceeds max_pixels=8294400"):
        decode_bytes(data, max_pixels=3840 * 2160)


def _jpeg(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_a_jpeg_decodes_at_the_smallest_dct_scale_the_model_input_allows() -> None:
    data = _jpeg(1920, 1080)
    assert decode_bytes(data).shape == (1, 1080, 1920, 3)
    assert decode_bytes(data, min_size=64).shape == (1, 135, 240, 3)  # 1/8: 135 >= 2 x 64
    assert decode_bytes(data, min_size=100).shape == (1, 270, 480, 3)  # 1/4
    assert decode_bytes(data, min_size=600).shape == (1, 1080, 1920, 3)  # no scale allows it
    # Once resized to the model's input, reduced and full decoding agree closely.
    full = prepare_uint8(decode_bytes(data), 64, 3).astype(int)
    reduced = prepare_uint8(decode_bytes(data, min_size=64), 64, 3).astype(int)
    assert np.abs(full - reduced).mean() < 1.0


def test_the_pixel_cap_of_a_jpeg_applies_at_the_size_it_decodes_at() -> None:
    data = _jpeg(4096, 4096)  # 16.8 M pixels: over a 4K frame's 8.3 M
    with pytest.raises(FrameError, match="exceeds max_pixels"):
        decode_bytes(data, max_pixels=3840 * 2160)
    assert decode_bytes(data, max_pixels=3840 * 2160, min_size=64).shape == (1, 512, 512, 3)
