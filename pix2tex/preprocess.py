"""Real user images -> what the model was trained on: dark ink on white, tightly cropped, sized.

Training images are rendered formulas: grayscale, black ink on a white page, cropped to the ink
and padded with white to multiples of `patch_size`. A user's image can be anything (a screenshot
in dark mode, a transparent PNG, a palette GIF, a 16-bit scan, a phone JPEG), so `preprocess`:

1. opens it safely (`open_image`): any source (path, bytes, file object, PIL image, numpy
   array), refusing undecodable files and images with more than `max_pixels` pixels *before*
   decoding them (decompression bombs); big JPEGs are decoded already downscaled;
2. makes it grayscale (`to_gray`): alpha composited on white (or, when the ink lives only in the
   alpha channel, the alpha itself), 16-bit and float images scaled to 8 bit;
3. inverts a dark background, crops to the ink, and stretches the contrast so the background is
   pure white and the darkest ink black (`crop_to_ink`);
4. scales the crop to fit `max_height x max_width` (keeping the aspect ratio) and up-scales tiny
   crops to `min_height`, then centres it on white, `margin` px at least around the ink, padded to
   multiples of `patch_size` (`fit_and_pad`), as the renderer lays out training images.

A blank image has no ink: `preprocess` returns None and the caller's answer is an empty string.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000  # ~7000 x 7000; a grayscale decode of this is 50 MB


class ImageError(ValueError):
    """An input that is not a usable image; the message says which input and why."""


class ImageTooLarge(ImageError):
    """An image (or upload) over the size limits; the message gives the limit to raise."""


@dataclass
class Geometry:
    """The model's image geometry (from the config keys of the same names)."""
    max_height: int = 192
    max_width: int = 672
    min_height: int = 32
    min_width: int = 32
    patch_size: int = 16

    @classmethod
    def from_config(cls, cfg) -> "Geometry":
        return cls(**{k: int(cfg[k]) for k in ("max_height", "max_width", "min_height",
                                                  "min_width", "patch_size")})


# --- 1. open -------------------------------------------------------------------------------------

def _name(source) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else type(source).__name__


def open_image(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A decoded PIL image (first frame, EXIF orientation applied) from a path, bytes, file
    object, PIL image or numpy array. Raises ImageError / ImageTooLarge with a clear reason."""
    if isinstance(source, Image.Image):
        return _check_pixels(source, max_pixels, "image")
    if isinstance(source, np.ndarray):
        return _from_array(source, max_pixels)
    name = _name(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("empty input (0 bytes): not an image")
        fp = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        if not os.path.isfile(source):
            raise ImageError(f"{name}: no such file")
        if os.path.getsize(source) == 0:
            raise ImageError(f"{name}: empty file (0 bytes): not an image")
        fp = source
    elif hasattr(source, "read"):
        fp = source
    else:
        raise ImageError(f"cannot read an image from a {type(source).__name__}; pass a path, bytes, "
                         f"a file object, a PIL image or a numpy array")
    try:
        # Our pixel limit is checked below from the header. Pillow's own bomb check (it raises
        # at twice its MAX_IMAGE_PIXELS, ~179 MP) stays as a backstop; its warning is noise here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{name}: refused, too many pixels ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not an image Pillow can read (PNG, JPEG, GIF, BMP, TIFF, WebP, ...)") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot be read ({e})") from None
    w, h = img.size
    if w * h > max_pixels and img.format == "JPEG":
        # JPEG can decode at 1/2, 1/4 or 1/8 scale: huge photos come in small, never decoded whole.
        r = next((r for r in (2, 4, 8) if math.ceil(w / r) * math.ceil(h / r) <= max_pixels), 8)
        img.draft("L", (math.ceil(w / r), math.ceil(h / r)))
    img = _check_pixels(img, max_pixels, name)
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        raise ImageError(f"{name}: image data is truncated or corrupt ({e})") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block is no reason to refuse the pixels
        pass
    return img


def _check_pixels(img: Image.Image, max_pixels: int, name: str) -> Image.Image:
    w, h = img.size
    if w * h > max_pixels:
        raise ImageTooLarge(f"{name}: image is {w}x{h} = {w * h / 1e6:.1f} megapixels, more than the "
                            f"limit of {max_pixels / 1e6:.1f} (crop or downscale it, or raise max_pixels)")
    if w == 0 or h == 0:
        raise ImageError(f"{name}: image has no pixels ({w}x{h})")
    return img


def _from_array(a: np.ndarray, max_pixels: int) -> Image.Image:
    """HxW, HxWx1, HxWx3 or HxWx4 arrays of uint8, uint16 or floats (0..1 or 0..255)."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageError(f"numpy image must be HxW, HxWx3 or HxWx4, got shape {a.shape}")
    if a.shape[0] * a.shape[1] > max_pixels:
        raise ImageTooLarge(f"array image is {a.shape[1]}x{a.shape[0]}, more than the limit of "
                            f"{max_pixels / 1e6:.1f} megapixels")
    if a.size == 0:
        raise ImageError(f"numpy image has no pixels (shape {a.shape})")
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ImageError("numpy image contains NaN or infinite values")
        top = 1.0 if a.max() <= 1.0 else (255.0 if a.max() <= 255.0 else 65535.0)
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


# --- 2. grayscale ---------------------------------------------------------------------------------

def to_gray(img: Image.Image) -> np.ndarray:
    """uint8 HxW array: the image on a white page. Transparent pixels become white; when the ink
    is drawn only through alpha (e.g. white or colored glyphs on a transparent page), alpha is
    the ink."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        if hi <= lo:
            return np.full(a.shape, 255, np.uint8)
        return np.round((a - lo) / (hi - lo) * 255.0).astype(np.uint8)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    elif img.mode == "LA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        rgba = img.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), dtype=np.float32) / 255.0
        gray = np.asarray(rgba.convert("L"), dtype=np.float32)
        on_white = gray * alpha + 255.0 * (1.0 - alpha)
        if alpha.min() < 0.5 and _contrast(on_white) < 24 and alpha.max() - alpha.min() > 0.1:
            on_white = 255.0 * (1.0 - alpha)  # light ink on transparency: the shape is in alpha
        return np.round(on_white).astype(np.uint8)
    return np.asarray(img.convert("L"), dtype=np.uint8)


# --- 3. invert, crop, contrast -------------------------------------------------------------------

def _sample(gray: np.ndarray, n: int = 250_000) -> np.ndarray:
    step = max(1, int(math.sqrt(gray.size / n)))
    return gray[::step, ::step]


def _contrast(gray: np.ndarray) -> float:
    s = _sample(gray)
    return float(np.median(s)) - float(s.min())


def background_is_dark(gray: np.ndarray) -> bool:
    """Most of a formula image is background, so its median is the background's level."""
    return float(np.median(_sample(gray))) < 128


def crop_to_ink(gray: np.ndarray, min_contrast: float = 24.0, margin: int = 0) -> np.ndarray | None:
    """Dark-on-white uint8 crop around the ink (plus `margin` source pixels), contrast stretched so
    background is 255 and the darkest ink 0. A dark background is inverted first. None when the
    image has no ink (blank, or differences smaller than `min_contrast` gray levels: noise)."""
    if background_is_dark(gray):
        gray = 255 - gray
    s = _sample(gray)
    bg, ink = float(np.median(s)), float(gray.min())
    if bg - ink < min_contrast:
        return None
    mask = gray < bg - 0.3 * (bg - ink)  # anti-aliased edges are within the margin added below
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, bottom = max(0, rows[0] - margin), min(gray.shape[0], rows[-1] + 1 + margin)
    left, right = max(0, cols[0] - margin), min(gray.shape[1], cols[-1] + 1 + margin)
    crop = gray[top:bottom, left:right].astype(np.float32)
    crop = np.clip((crop - ink) / (bg - ink), 0.0, 1.0) * 255.0
    return np.round(crop).astype(np.uint8)


# --- 4. size --------------------------------------------------------------------------------------

def fit_and_pad(crop: np.ndarray, geo: Geometry, margin: int = 2) -> np.ndarray:
    """Scale `crop` to fit inside max_height x max_width less the margin (aspect kept), up-scale it
    when shorter than min_height as far as the maximum sizes allow, then centre it on a white page
    (at least `margin` px around it, at least min_height x min_width) whose sides are multiples of
    patch_size: the layout of the rendered training images (dataset_tools/render.py)."""
    h, w = crop.shape
    room_h, room_w = geo.max_height - 2 * margin, geo.max_width - 2 * margin
    scale = min(1.0, room_h / h, room_w / w)
    if h * scale < geo.min_height - 2 * margin:  # tiny crops grow to min_height while they fit
        scale = min((geo.min_height - 2 * margin) / h, room_h / h, room_w / w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    new_w, new_h = min(new_w, room_w), min(new_h, room_h)
    img = Image.fromarray(crop)
    if (new_w, new_h) != (w, h):
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        img = img.resize((new_w, new_h), resample, reducing_gap=3.0 if scale < 1 else None)
    p = geo.patch_size
    page_h = max(geo.min_height, math.ceil((new_h + 2 * margin) / p) * p)
    page_w = max(geo.min_width, math.ceil((new_w + 2 * margin) / p) * p)
    page_h, page_w = math.ceil(page_h / p) * p, math.ceil(page_w / p) * p  # min_* may not divide
    page = Image.new("L", (page_w, page_h), 255)
    page.paste(img, ((page_w - new_w) // 2, (page_h - new_h) // 2))  # centred, as rendered
    return np.asarray(page, dtype=np.uint8)


def preprocess(source, geo: Geometry | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
               margin: int = 2) -> np.ndarray | None:
    """Any image source -> uint8 HxW page ready for the model, or None when it holds no ink."""
    geo = geo or Geometry()
    gray = to_gray(open_image(source, max_pixels))
    crop = crop_to_ink(gray)
    if crop is None:
        return None
    return fit_and_pad(crop, geo, margin)
