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
4. estimates the glyph scale (median height of the ink's connected components, against the
   training renders') and resizes a crop drawn much larger or smaller than the training images,
   e.g. a screenshot at device scale 2 or a PDF at 300% zoom (`normalize_scale`);
5. scales the crop to fit `max_height x max_width` (keeping the aspect ratio) and up-scales tiny
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
# The model's input normalization, (x / 255 - MEAN) / STD: LaTeX-OCR's grayscale statistics of
# rendered formulas on a 0..1 scale. Here, not in dataset.transforms, so reading needs no torch.
MEAN = 0.7931
STD = 0.1738


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


# --- 4. glyph scale -------------------------------------------------------------------------------

# Median height (px) of a formula's glyphs in the training renders: TeX at 115 dpi, the middle of
# the renderer's 100-130 dpi (the median over fonts and im2latex val formulas: bench/glyph_scale.py).
TRAIN_GLYPH_HEIGHT = 10.0
INK_LEVEL = 192  # gray below this is ink: faint anti-aliased strokes still join their glyph
# An estimate within this band of the training scale leaves the image as it is (a resize only
# blurs). Outside it the crop is brought to 1.0; the estimate of one formula is off by up to
# ~20% (a formula of x-height letters reads small), which stays within the scales the model
# trains on (95-140 dpi renders).
SCALE_BAND = (0.9, 1.1)
ESTIMATE_PIXELS = 2_000_000  # larger crops are measured on a box-filtered smaller copy


def _components(ink: np.ndarray) -> np.ndarray:
    """Bounding boxes [n, 4] (top, left, bottom, right; exclusive) of the 8-connected components
    of a boolean image, labelled over its horizontal runs (union-find), numpy and Python only."""
    h, w = ink.shape
    edges = np.diff(np.pad(ink, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = np.nonzero(edges == 1)
    ends = np.nonzero(edges == -1)[1]  # exclusive; same row-major order as the starts
    n = len(starts)
    if n == 0:
        return np.zeros((0, 4), np.int64)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first = np.searchsorted(rows, np.arange(h + 1))
    s, e = starts.tolist(), ends.tolist()
    for r in range(1, h):
        i, i_end, j, j_end = first[r - 1], first[r], first[r], first[r + 1]
        while i < i_end and j < j_end:
            if s[j] <= e[i] and s[i] <= e[j]:  # touching or diagonal neighbours: one glyph
                a, b = find(i), find(j)
                if a != b:
                    parent[b] = a
            if e[i] < e[j]:
                i += 1
            else:
                j += 1
    roots = np.fromiter((find(i) for i in range(n)), np.int64, n)
    labels, inverse = np.unique(roots, return_inverse=True)
    boxes = np.empty((len(labels), 4), np.int64)
    boxes[:, 0:2] = np.iinfo(np.int64).max
    boxes[:, 2:4] = -1
    np.minimum.at(boxes[:, 0], inverse, rows)
    np.minimum.at(boxes[:, 1], inverse, starts)
    np.maximum.at(boxes[:, 2], inverse, rows + 1)
    np.maximum.at(boxes[:, 3], inverse, ends)
    return boxes


def glyph_height(crop: np.ndarray) -> float | None:
    """Median height in px of the glyphs of a dark-on-white crop (None: too few to tell).

    Glyphs are the connected components of the ink; dots and specks (under 2 px, or under a
    tenth of the tallest component's height: JPEG noise) and horizontal bars (fraction bars,
    minus signs, overlines: wider than 4x their height) are left out, so what remains are
    letters, digits and symbols, whose median height follows the font size times the
    resolution. Needs at least two glyphs."""
    factor = 1
    if crop.size > ESTIMATE_PIXELS:
        factor = math.ceil(math.sqrt(crop.size / ESTIMATE_PIXELS))
        small = Image.fromarray(crop).reduce(factor)
        crop = np.asarray(small)
    boxes = _components(crop < INK_LEVEL)
    if len(boxes) == 0:
        return None
    heights = boxes[:, 2] - boxes[:, 0]
    widths = boxes[:, 3] - boxes[:, 1]
    keep = (heights >= 2) & (widths <= 4 * heights) & (heights >= 0.1 * heights.max())
    if keep.sum() < 2:
        return None
    return float(np.median(heights[keep])) * factor


def estimate_scale(crop: np.ndarray) -> float | None:
    """How much larger than the training renders the crop's glyphs are (1.0: like a 115-dpi TeX
    render; 2.0: a HiDPI screenshot), or None when the crop has too few glyphs to tell."""
    height = glyph_height(crop)
    return None if height is None else height / TRAIN_GLYPH_HEIGHT


def normalize_scale(crop: np.ndarray, band: tuple[float, float] = SCALE_BAND) -> np.ndarray:
    """Resize a crop whose glyph scale is outside `band` to the training scale (antialiased
    downscaling, bicubic upscaling); crops within the band, or with too few glyphs to tell,
    are returned as they are."""
    scale = estimate_scale(crop)
    if scale is None or band[0] <= scale <= band[1]:
        return crop
    h, w = crop.shape
    size = (max(1, round(w / scale)), max(1, round(h / scale)))
    img = Image.fromarray(crop)
    if scale > 1:
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    else:
        img = img.resize(size, Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


# --- 5. size --------------------------------------------------------------------------------------

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
               margin: int = 2, scale: bool = True, keep_crop: bool = False):
    """Any image source -> uint8 HxW page ready for the model, or None when it holds no ink.
    `scale`: bring glyphs of another size (a HiDPI screenshot, a zoomed PDF) to the training
    renders' size first (`normalize_scale`). keep_crop: return (page, crop), the crop being the
    image's ink before any resizing (dark on white; None with a None page): render-and-compare
    draws candidates at the image's own scale and compares them with it (pix2tex.verify)."""
    geo = geo or Geometry()
    gray = to_gray(open_image(source, max_pixels))
    crop = crop_to_ink(gray)
    if crop is None:
        return (None, None) if keep_crop else None
    page = fit_and_pad(normalize_scale(crop) if scale else crop, geo, margin)
    return (page, crop) if keep_crop else page


def normalize(pages: np.ndarray) -> np.ndarray:
    """uint8 pages [B, H, W] -> the model's float32 input [B, 1, H, W]."""
    return ((pages.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]
