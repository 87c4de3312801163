"""Decoding an image file into the 8-bit RGB image DETR's transforms expect, for every mode PIL opens.

DETR does ``Image.open(path).convert("RGB")``. That is right for 8-bit images but PIL clips wider
samples to 0..255, so a 16-bit grayscale PNG becomes all white and a float image nearly black. Here
each mode has a rule, and a value no rule covers fails with one line naming the file (never a silently
saturated image):

=====================  ==========================================================================
mode                   rule (v: a stored sample; alpha channels are dropped, as DETR does)
=====================  ==========================================================================
RGB                    as stored
L, 1                   gray g -> (g, g, g); 1-bit pixels are 0 or 255
P, PA                  each pixel's palette colour; palette transparency and PA's alpha dropped
LA, La                 the gray channel -> (g, g, g) (La is premultiplied: un-premultiplied first)
RGBA, RGBX             R, G, B as stored
RGBa                   R, G, B un-premultiplied by alpha (PIL's RGBa -> RGBA)
CMYK                   R = round((255 - C) (255 - K) / 255), same for G (M) and B (Y); ICC profiles
                       are ignored, as DETR does (Adobe's inverted CMYK JPEGs are undone by PIL)
YCbCr, HSV, LAB        PIL's conversion to RGB (JPEG's full-range YCbCr; LAB as PIL decodes it)
I;16, I;16B/L/N        16-bit gray v -> round(v * 255 / 65535): the full 16-bit range maps to 0..255
I                      32-bit integer gray with the sample depth of the file: 16 bits for PNG and
                       PGM/PPM (PIL already scaled a PGM's maxval to 16 bits), TIFF's BitsPerSample
                       otherwise; v -> round(v * 255 / (2^bits - 1)). Negative values, values beyond
                       the depth, or a format of unknown depth fail.
F                      32-bit float gray in [0, 1]: v -> round(v * 255); NaN, inf or values outside
                       [0, 1] fail (the range of a float image is a convention; [0, 1] is torchvision's)
=====================  ==========================================================================

EXIF orientation is ignored, as in DETR: pixels stay as stored, so boxes annotated on the stored
pixels stay right. Multi-frame files give their first frame.
"""
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# modes whose PIL conversion to RGB is exact by the rules above
_PIL_CONVERTS = {"RGB", "L", "1", "P", "PA", "LA", "RGBA", "RGBX", "RGBa", "YCbCr", "HSV", "LAB"}
_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N"}
# bits per sample of mode "I" images, by format (PIL decodes these formats to "I" from 16-bit samples)
_I_DEPTH_BY_FORMAT = {"PNG": 16, "PPM": 16}
_TIFF_BITS_PER_SAMPLE = 258


class ImageDecodeError(Exception):
    """The file is not an image PIL can read, or its values fit no rule; the message names the file."""


def load_rgb(path) -> Image.Image:
    """The image at ``path`` as an 8-bit RGB PIL image, by the rules of the module docstring."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except ImageDecodeError as e:
        raise ImageDecodeError(f"cannot read image {path}: {e}") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"cannot read image {path}: {e}") from e


def to_rgb(im: Image.Image) -> Image.Image:
    """An opened (loaded) image as 8-bit RGB; ImageDecodeError when its mode or values fit no rule."""
    mode = im.mode
    if mode == "La":
        im, mode = im.convert("LA"), "LA"
    if mode in _PIL_CONVERTS:
        return im.convert("RGB")
    if mode == "CMYK":
        cmyk = np.asarray(im, dtype=np.float64)
        white = 255.0 - cmyk[..., 3:4]
        return _from_array(np.rint((255.0 - cmyk[..., :3]) * white / 255.0))
    if mode in _SIXTEEN_BIT:
        return _gray(np.asarray(im).astype(np.float64), bits=16, mode=mode)
    if mode == "I":
        return _gray(np.asarray(im).astype(np.float64), bits=_depth_of_i(im), mode=mode)
    if mode == "F":
        values = np.asarray(im, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise ImageDecodeError(f"float image (mode F) with values in [{np.nanmin(values):g}, "
                                   f"{np.nanmax(values):g}]; float images must hold values in [0, 1]")
        return _from_array(np.rint(values * 255.0)[..., None].repeat(3, axis=-1))
    raise ImageDecodeError(f"image mode {mode!r} has no conversion to RGB; convert the file to 8-bit RGB")


def _depth_of_i(im: Image.Image) -> int:
    if im.format in _I_DEPTH_BY_FORMAT:
        return _I_DEPTH_BY_FORMAT[im.format]
    if im.format == "TIFF":
        bits = im.tag_v2.get(_TIFF_BITS_PER_SAMPLE)
        bits = bits[0] if isinstance(bits, tuple) else bits
        if bits:
            return int(bits)
    raise ImageDecodeError(f"32-bit integer image (mode I) from {im.format or 'an unknown format'}: the sample "
                           f"depth is unknown; convert the file to 8- or 16-bit")


def _gray(values: np.ndarray, bits: int, mode: str) -> Image.Image:
    top = 2.0 ** bits - 1
    if values.size and (values.min() < 0 or values.max() > top):
        raise ImageDecodeError(f"{bits}-bit image (mode {mode}) with values in [{int(values.min())}, "
                               f"{int(values.max())}] outside [0, {int(top)}]")
    return _from_array(np.rint(values * 255.0 / top)[..., None].repeat(3, axis=-1))


def _from_array(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray(rgb.astype(np.uint8))  # (H, W, 3) uint8 -> mode RGB
