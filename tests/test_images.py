"""Every image mode PIL opens loads with the pixel values of its rule (datasets/images.py), through the COCO loader,
or fails with one line naming the file. Expected values come from plain formulas written here."""
import colorsys
import json

import numpy as np
import pytest
from PIL import Image

from datasets.coco import CocoDetection
from datasets.images import ImageDecodeError, load_rgb, to_rgb
from util.errors import UserError

H, W = 3, 4
rng = np.random.default_rng(0)


def gray3(g):
    return np.repeat(np.asarray(g, dtype=np.uint8)[..., None], 3, axis=-1)


def _rgb():
    a = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    return Image.fromarray(a), a


def _gray():
    g = rng.integers(0, 256, (H, W), dtype=np.uint8)
    return Image.fromarray(g), gray3(g)


def _bilevel():
    bits = rng.integers(0, 2, (H, W)).astype(bool)
    return Image.fromarray(bits), gray3(np.where(bits, 255, 0))


def _palette(transparency):
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 256, (H, W), dtype=np.uint8)
    im = Image.frombytes("P", (W, H), index.tobytes())
    im.putpalette(palette.flatten().tolist())
    if transparency:
        im.info["transparency"] = int(index[0, 0])  # that pixel is transparent: its colour still counts
    return im, palette[index]


def _gray_alpha():
    la = rng.integers(0, 256, (H, W, 2), dtype=np.uint8)
    la[0, 0, 1] = 0  # fully transparent pixel keeps its gray value
    return Image.frombytes("LA", (W, H), la.tobytes()), gray3(la[..., 0])


def _rgba():
    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    rgba[0, :, 3] = 0
    return Image.fromarray(rgba), rgba[..., :3]


def _cmyk():
    cmyk = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    cmyk[0, 0] = (255, 0, 0, 0)  # pure cyan
    cmyk[0, 1] = (0, 0, 0, 255)  # black
    c = cmyk.astype(np.int64)
    expected = [[[round((255 - c[i, j, k]) * (255 - c[i, j, 3]) / 255) for k in range(3)] for j in range(W)]
                for i in range(H)]
    return Image.frombytes("CMYK", (W, H), cmyk.tobytes()), np.array(expected, dtype=np.uint8)


def _ycbcr():
    ycc = rng.integers(16, 240, (H, W, 3), dtype=np.uint8).astype(np.float64)
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 128, ycc[..., 2] - 128
    rgb = np.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], -1)  # JPEG (JFIF)
    return Image.frombytes("YCbCr", (W, H), ycc.astype(np.uint8).tobytes()), np.clip(np.rint(rgb), 0, 255)


def _sixteen(mode):
    v = rng.integers(0, 65536, (H, W)).astype(np.uint16)
    v[0, :4] = (0, 257, 65535, 128)
    expected = gray3([[round(int(x) / 257) for x in row] for row in v])
    dtype = {"I;16": "<u2", "I;16B": ">u2"}[mode]
    return Image.frombytes(mode, (W, H), v.astype(dtype).tobytes()), expected


def _int32():
    v = rng.integers(0, 2**31, (H, W)).astype(np.int32)
    v[0, :3] = (0, 70000, 2**31 - 1)
    expected = gray3([[round(int(x) * 255 / (2**32 - 1)) for x in row] for row in v])
    return Image.fromarray(v), expected


def _float():
    v = rng.random((H, W)).astype(np.float32)
    v[0, :3] = (0.0, 1.0, 0.25)
    return Image.fromarray(v), gray3([[round(float(x) * 255) for x in row] for row in v])


def _pgm_12bit(path):
    """A 12-bit PGM (maxval 4095): PIL stretches it to 16 bits (mode I); the rule gives v * 255 / 4095."""
    v = rng.integers(0, 4096, (H, W)).astype(np.uint16)
    v[0, :3] = (0, 4095, 2048)
    path.write_bytes(f"P5\n{W} {H}\n4095\n".encode() + v.astype(">u2").tobytes())
    return gray3([[round(int(x) * 255 / 4095) for x in row] for row in v])


# (case, file suffix, save options, maker, mode PIL opens the file in)
FILE_CASES = [
    ("rgb", ".png", {}, _rgb, "RGB"),
    ("gray", ".png", {}, _gray, "L"),
    ("bilevel", ".png", {}, _bilevel, "1"),
    ("palette", ".png", {}, lambda: _palette(False), "P"),
    ("palette_transparency", ".png", {}, lambda: _palette(True), "P"),
    ("palette_gif", ".gif", {}, lambda: _palette(True), "P"),
    ("gray_alpha", ".png", {}, _gray_alpha, "LA"),
    ("rgba", ".png", {}, _rgba, "RGBA"),
    ("cmyk", ".tiff", {}, _cmyk, "CMYK"),
    ("ycbcr", ".tiff", {}, _ycbcr, "YCbCr"),
    ("gray16_png", ".png", {}, lambda: _sixteen("I;16"), "I;16"),
    ("gray16_tiff_big_endian", ".tiff", {}, lambda: _sixteen("I;16B"), "I;16B"),
    ("gray32_tiff", ".tiff", {}, _int32, "I"),
    ("float_tiff", ".tiff", {}, _float, "F"),
]


def _load_through_coco(folder, name, size):
    """The raw image the COCO loader yields for one file (no transforms)."""
    ann = folder / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": name, "width": size[0], "height": size[1]}],
                               "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    image, _ = CocoDetection(folder, ann, transforms=None)[0]
    return image


@pytest.mark.parametrize("case, suffix, options, make, mode", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_every_file_mode_loads_with_its_rule(tmp_path, case, suffix, options, make, mode):
    image, expected = make()
    path = tmp_path / f"{case}{suffix}"
    image.save(path, **options)
    with Image.open(path) as stored:
        assert stored.mode == mode  # the file really is in the mode under test
    loaded = _load_through_coco(tmp_path, path.name, (W, H))
    assert loaded.mode == "RGB" and loaded.size == (W, H)
    # YCbCr: PIL's fixed-point conversion may differ from the float formula by one level
    tolerance = 1 if case == "ycbcr" else 0
    assert np.abs(np.asarray(loaded).astype(int) - np.asarray(expected).astype(int)).max() <= tolerance


@pytest.mark.quick
def test_12_bit_pgm_is_scaled_by_its_maxval(tmp_path):
    expected = _pgm_12bit(tmp_path / "deep.pgm")
    with Image.open(tmp_path / "deep.pgm") as stored:
        assert stored.mode == "I"
    assert np.array_equal(np.asarray(_load_through_coco(tmp_path, "deep.pgm", (W, H))), expected)


def test_lab_keeps_neutral_grays(tmp_path):
    """LAB goes through PIL's (littleCMS) conversion; a neutral L ramp must come out as the sRGB gray of L*."""
    lightness = np.linspace(0, 255, W * H).round().astype(np.uint8).reshape(H, W)
    lab = np.stack([lightness, np.zeros_like(lightness), np.zeros_like(lightness)], -1)
    path = tmp_path / "lab.tiff"
    Image.frombytes("LAB", (W, H), lab.tobytes()).save(path)

    def srgb_gray(l8):
        t = (l8 * 100 / 255 + 16) / 116
        y = t ** 3 if t ** 3 > 216 / 24389 else (116 * t - 16) / (24389 / 27)
        return 255 * (12.92 * y if y <= 0.0031308 else 1.055 * y ** (1 / 2.4) - 0.055)

    loaded = np.asarray(_load_through_coco(tmp_path, "lab.tiff", (W, H))).astype(float)
    expected = np.vectorize(srgb_gray)(lightness.astype(float))
    assert np.abs(loaded - expected[..., None]).max() <= 2


@pytest.mark.parametrize("mode", ["RGBa", "La", "PA", "RGBX", "HSV"])
def test_modes_without_a_file_format_convert_by_their_rule(mode):
    """Modes PIL only makes in memory (or from exotic files): their rule applied to known values."""
    if mode == "RGBa":  # premultiplied: colour / alpha
        raw, expected = [100, 50, 20, 128, 10, 20, 30, 255], [[round(100 * 255 / 128), round(50 * 255 / 128),
                                                               round(20 * 255 / 128)], [10, 20, 30]]
    elif mode == "La":
        raw, expected = [100, 128, 7, 255], [[round(100 * 255 / 128)] * 3, [7] * 3]
    elif mode == "PA":
        raw, expected = [1, 0, 0, 255], [[200, 100, 50], [10, 20, 30]]
    elif mode == "RGBX":
        raw, expected = [1, 2, 3, 0, 4, 5, 6, 99], [[1, 2, 3], [4, 5, 6]]
    else:
        raw = [0, 255, 255, 85, 128, 200]
        expected = [[round(255 * c) for c in colorsys.hsv_to_rgb(h / 255, s / 255, v / 255)]
                    for h, s, v in (raw[:3], raw[3:])]
    im = Image.frombytes(mode, (2, 1), bytes(raw))
    if mode == "PA":
        im.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    out = np.asarray(to_rgb(im)).astype(int)[0]
    assert np.abs(out - np.array(expected)).max() <= 1  # PIL's integer arithmetic rounds either way


def test_exif_orientation_is_ignored_as_in_detr(tmp_path):
    image, expected = _rgb()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rotated.png", exif=exif)
    with Image.open(tmp_path / "rotated.png") as stored:
        assert stored.getexif()[0x0112] == 6
    loaded = _load_through_coco(tmp_path, "rotated.png", (W, H))
    assert loaded.size == (W, H) and np.array_equal(np.asarray(loaded), expected)


@pytest.mark.parametrize("values, message", [
    ([[0.0, 2.0]], "float image (mode F) with values in [0, 2]; float images must hold values in [0, 1]"),
    ([[0.5, float("nan")]], "float image (mode F) with values in [0.5, 0.5]; float images must hold values in [0, 1]"),
    ([[-1.0, 0.0]], "float image (mode F) with values in [-1, 0]; float images must hold values in [0, 1]"),
])
@pytest.mark.quick
def test_float_image_out_of_range_fails_naming_the_file(tmp_path, values, message):
    path = tmp_path / "bad.tiff"
    Image.fromarray(np.array(values, dtype=np.float32)).save(path)
    with pytest.raises(UserError) as info:
        _load_through_coco(tmp_path, "bad.tiff", (2, 1))
    assert str(info.value) == f"cannot read image {path}: {message}; fix or remove it, or pass --skip_bad_images"


def test_negative_32_bit_and_unknown_depth_fail_naming_the_file(tmp_path):
    path = tmp_path / "signed.tiff"
    Image.fromarray(np.array([[-5, 7]], dtype=np.int32)).save(path)
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(path)
    assert str(info.value) == (f"cannot read image {path}: 32-bit image (mode I) with values in [-5, 7] outside "
                               f"[0, 4294967295]")
    with pytest.raises(ImageDecodeError) as info:
        to_rgb(Image.new("I", (2, 2)))
    assert str(info.value) == ("32-bit integer image (mode I) from an unknown format: the sample depth is unknown; "
                               "convert the file to 8- or 16-bit")


def test_garbage_file_fails_naming_the_file(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageDecodeError) as info:
        load_rgb(path)
    assert str(info.value).startswith(f"cannot read image {path}: ")
    assert "\n" not in str(info.value)
