"""Preprocessing of real user images, on synthetic images whose right answer is known."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pix2tex.preprocess import (Geometry, ImageError, ImageTooLarge, background_is_dark, crop_to_ink,
                                fit_and_pad, open_image, preprocess, to_gray)

GEO = Geometry(max_height=64, max_width=256, min_height=32, min_width=32, patch_size=16)
MARGIN = 2


def ink_image(w=120, h=40, box=(30, 10, 90, 25), ink=0, paper=255, mode="L", filled=False):
    """A page with one filled box and thin lines: the 'formula' whose bounding box is `box`."""
    img = Image.new("L", (w, h), paper)
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = box
    if filled:  # thin lines fade away when the image is downscaled a lot
        d.rectangle((x0, y0, x1 - 1, y1 - 1), fill=ink)
    d.rectangle((x0, y0, x0 + (x1 - x0) // 2, y1 - 1), fill=ink)
    d.line((x0, y1 - 1, x1 - 1, y1 - 1), fill=ink, width=1)
    d.line((x1 - 1, y0, x1 - 1, y1 - 1), fill=ink, width=1)
    return img.convert(mode)


def ink_box(page: np.ndarray, level: int = 128):
    """(x0, y0, x1, y1) of the pixels darker than `level`."""
    ys, xs = np.nonzero(page < level)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def raw_png(width: int, height: int, bit_depth: int, row: bytes) -> bytes:
    """A valid grayscale PNG of `height` identical rows, compressed as a stream (never held whole)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    comp, parts = zlib.compressobj(9), []
    block = (b"\x00" + row) * 200
    for _ in range(height // 200):
        parts.append(comp.compress(block))
    parts.append(comp.compress((b"\x00" + row) * (height % 200)) + comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
            + chunk(b"IEND", b""))


# --- the happy path: crop, margin, pad ---------------------------------------------------------

def test_crop_margin_and_patch_multiples():
    page = preprocess(ink_image(), GEO, margin=MARGIN)
    assert page.dtype == np.uint8 and page.ndim == 2
    assert page.shape[0] % 16 == 0 and page.shape[1] % 16 == 0
    assert page.shape[0] >= GEO.min_height and page.shape[1] >= GEO.min_width
    x0, y0, x1, y1 = ink_box(page)
    H, W = page.shape
    assert (x0, y0) == ((W - (x1 - x0)) // 2, (H - (y1 - y0)) // 2)  # centred, as rendered
    assert min(x0, y0, W - x1, H - y1) >= MARGIN  # the margin is kept
    assert W - (x1 - x0) - 2 * MARGIN < 16 and H - (y1 - y0) - 2 * MARGIN < 16  # tightly cropped
    assert x1 - x0 == pytest.approx(4 * (y1 - y0), rel=0.05)  # the 60x15 box keeps its aspect
    assert page[0].min() == 255 and page[:, 0].min() == 255  # the margin is white
    assert page.min() == 0 and page.max() == 255  # contrast stretched to full range


def test_short_crop_upscaled_to_min_height():
    page = preprocess(ink_image(box=(30, 10, 90, 25)), GEO, margin=MARGIN)
    x0, y0, x1, y1 = ink_box(page)
    assert y1 - y0 == GEO.min_height - 2 * MARGIN  # 15 px tall -> 28 px
    assert x1 - x0 == pytest.approx(60 * 28 / 15, abs=2)


def test_large_image_downscaled_keeping_aspect():
    img = ink_image(w=3000, h=600, box=(100, 100, 2100, 400), filled=True)  # 2000x300 box, aspect 6.67
    page = preprocess(img, GEO, margin=MARGIN)
    assert page.shape[0] <= GEO.max_height and page.shape[1] <= GEO.max_width
    x0, y0, x1, y1 = ink_box(page)
    assert x1 - x0 == pytest.approx(GEO.max_width - 2 * MARGIN, abs=1)  # width is the limit
    assert (x1 - x0) / (y1 - y0) == pytest.approx(2000 / 300, rel=0.05)


def test_tall_image_limited_by_height():
    img = ink_image(w=400, h=1000, box=(100, 100, 200, 900), filled=True)
    page = preprocess(img, GEO, margin=MARGIN)
    x0, y0, x1, y1 = ink_box(page)
    assert y1 - y0 == pytest.approx(GEO.max_height - 2 * MARGIN, abs=1)
    assert page.shape[0] == GEO.max_height


def test_fit_and_pad_never_exceeds_max():
    for h, w in [(1, 1), (1, 5000), (5000, 1), (63, 255), (64, 256), (500, 500)]:
        page = fit_and_pad(np.zeros((h, w), np.uint8), GEO, MARGIN)
        assert page.shape[0] <= GEO.max_height and page.shape[1] <= GEO.max_width, (h, w)
        assert page.shape[0] % 16 == 0 and page.shape[1] % 16 == 0


# --- modes ------------------------------------------------------------------------------------

def reference():
    return preprocess(ink_image(), GEO, margin=MARGIN)


@pytest.mark.parametrize("mode", ["L", "RGB", "1", "CMYK", "P", "LA", "RGBA", "I", "F"])
def test_every_mode_gives_the_same_page(mode):
    page = preprocess(ink_image(mode=mode), GEO, margin=MARGIN)
    assert page.shape == reference().shape
    assert np.abs(page.astype(int) - reference()).max() <= 2


def test_16_bit_grayscale():
    a = np.asarray(ink_image(), dtype=np.uint16) * 257  # 0..65535
    img = Image.fromarray(a)
    assert img.mode in ("I;16", "I")
    page = preprocess(png_bytes(img), GEO, margin=MARGIN)  # round trip through a 16-bit PNG
    assert np.abs(page.astype(int) - reference()).max() <= 2


def test_colored_ink_on_colored_paper():
    a = np.zeros((40, 120, 3), np.uint8)
    a[:] = (250, 245, 200)  # yellowish paper
    mask = np.asarray(ink_image()) < 128
    a[mask] = (20, 20, 160)  # dark blue ink
    page = preprocess(a, GEO, margin=MARGIN)
    assert np.array_equal(page < 128, reference() < 128)


def test_transparent_background_dark_ink():
    rgba = np.zeros((40, 120, 4), np.uint8)  # fully transparent black page
    mask = np.asarray(ink_image()) < 128
    rgba[mask] = (0, 0, 0, 255)
    page = preprocess(png_bytes(Image.fromarray(rgba, "RGBA")), GEO, margin=MARGIN)
    assert np.array_equal(page < 128, reference() < 128)


def test_transparent_background_white_ink():
    """Dark-mode exports: white glyphs on transparency. Composited on white they vanish; the
    shape is in alpha."""
    rgba = np.zeros((40, 120, 4), np.uint8)
    rgba[..., :3] = 255
    mask = np.asarray(ink_image()) < 128
    rgba[mask, 3] = 255
    page = preprocess(Image.fromarray(rgba, "RGBA"), GEO, margin=MARGIN)
    assert np.array_equal(page < 128, reference() < 128)


def test_palette_with_transparency():
    img = ink_image().convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    white = img.getpixel((0, 0))
    img.info["transparency"] = white
    page = preprocess(png_bytes(img), GEO, margin=MARGIN)
    assert np.array_equal(page < 128, reference() < 128)


def test_dark_background_is_inverted():
    dark = ink_image(ink=235, paper=30, mode="RGB")  # light-gray text on a dark theme
    assert background_is_dark(to_gray(dark))
    page = preprocess(dark, GEO, margin=MARGIN)
    assert np.array_equal(page < 128, reference() < 128)
    assert page.min() == 0 and page.max() == 255


def test_numpy_inputs():
    a = np.asarray(ink_image())
    for arr in (a, a[..., None], a.astype(np.float32) / 255.0, a.astype(np.uint16) * 257,
                np.stack([a, a, a], axis=-1)):
        page = preprocess(arr, GEO, margin=MARGIN)
        assert np.abs(page.astype(int) - reference()).max() <= 2, arr.dtype
    with pytest.raises(ImageError, match="shape"):
        preprocess(np.zeros((2, 3, 4, 5)), GEO)
    with pytest.raises(ImageError, match="NaN"):
        preprocess(np.full((5, 5), np.nan), GEO)


def test_path_bytes_and_file_object(tmp_path):
    data = png_bytes(ink_image())
    path = tmp_path / "f.png"
    path.write_bytes(data)
    for src in (path, str(path), data, bytearray(data), io.BytesIO(data)):
        assert np.array_equal(preprocess(src, GEO, margin=MARGIN), reference())


def test_exif_orientation_applied():
    img = ink_image().rotate(90, expand=True)  # stored rotated; EXIF says rotate back
    exif = Image.Exif()
    exif[0x0112] = 8  # orientation: rotate 90 CW to display
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", exif=exif, quality=95)
    page = preprocess(buf.getvalue(), GEO, margin=MARGIN)
    assert page.shape == reference().shape


# --- no ink -------------------------------------------------------------------------------------

def test_blank_images_have_no_ink():
    assert preprocess(Image.new("L", (200, 100), 255), GEO) is None
    assert preprocess(Image.new("RGB", (200, 100), (20, 20, 20)), GEO) is None  # blank dark page
    rng = np.random.default_rng(0)
    noisy = np.clip(245 + rng.normal(0, 3, (100, 200)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="JPEG", quality=60)
    assert preprocess(buf.getvalue(), GEO) is None  # JPEG noise on white is not ink
    assert crop_to_ink(np.full((10, 10), 128, np.uint8)) is None


def test_one_by_one_images():
    assert preprocess(Image.new("L", (1, 1), 255), GEO) is None
    assert preprocess(Image.new("L", (1, 1), 0), GEO) is None  # one pixel: no contrast, no ink
    img = Image.new("L", (3, 1), 255)
    img.putpixel((1, 0), 0)  # a single ink pixel grows into a valid page
    page = preprocess(img, GEO, margin=MARGIN)
    assert page.shape == (32, 32) and page.min() == 0


# --- bad input ----------------------------------------------------------------------------------

def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        preprocess(path, GEO)
    with pytest.raises(ImageError, match="empty"):
        preprocess(b"", GEO)


def test_text_file_named_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("\\frac{a}{b} is not a picture\n")
    with pytest.raises(ImageError, match="notes.png: not an image"):
        preprocess(path, GEO)


def test_truncated_png(tmp_path):
    data = png_bytes(ink_image(w=300, h=200).convert("RGB"))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.png: image data is truncated"):
        preprocess(path, GEO)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        preprocess(tmp_path / "nope.png", GEO)


def test_huge_image_rejected_before_decoding():
    data = raw_png(20000, 20000, 8, b"\xff" * 20000)  # a real 20000x20000 white PNG, ~0.5 MB
    assert len(data) < 2_000_000
    with pytest.raises(ImageTooLarge, match="400000000 pixels"):
        open_image(data)  # past Pillow's bomb limit: refused at open
    data = raw_png(10000, 10000, 8, b"\xff" * 10000)  # past our limit only: refused from the header
    with pytest.raises(ImageTooLarge, match="10000x10000 = 100.0 megapixels, more than the limit of 50.0"):
        open_image(data)


def test_decompression_bomb_rejected():
    # 1-bit 40000x40000: 200 KB on disk, 1.6 GB as 8-bit pixels. Past Pillow's own bomb limit.
    data = raw_png(40000, 40000, 1, b"\x00" * 5000)
    assert len(data) < 1_000_000
    for limit in (10**7, 10**12):  # Pillow's backstop even when our own limit is off
        with pytest.raises(ImageTooLarge, match="1600000000 pixels.*decompression bomb"):
            open_image(data, max_pixels=limit)


def test_big_jpeg_decoded_downscaled():
    img = ink_image(w=2400, h=800, box=(200, 200, 2200, 600), filled=True).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    opened = open_image(buf.getvalue(), max_pixels=400_000)  # 1.92 MP > limit: drafted at 1/4
    assert opened.size[0] * opened.size[1] <= 400_000
    assert opened.size[0] / opened.size[1] == pytest.approx(3.0, rel=0.01)
    page = preprocess(buf.getvalue(), GEO, max_pixels=400_000)
    assert page is not None and page.shape[1] == GEO.max_width
    png = png_bytes(img)  # a PNG cannot be decoded small: refused instead
    with pytest.raises(ImageTooLarge):
        open_image(png, max_pixels=400_000)


def test_unsupported_source_type():
    with pytest.raises(ImageError, match="cannot read an image from a int"):
        preprocess(42, GEO)


# --- glyph scale: screenshots at device scale 2, PDFs at 300% zoom ------------------------------

@pytest.fixture(scope="module")
def renders_by_dpi(tmp_path_factory, shared_data):
    """Eight im2latex val formulas rendered by TeX at 115 dpi (the training scale), 0.75x, 1.5x, 2x,
    3x and 4x."""
    from dataset_tools.render import read_formulas, render_formulas

    formulas = read_formulas(str(shared_data / "im2latex_val.norm.txt"))[40:48]
    out = {}
    for dpi in (86, 115, 173, 230, 345, 460):
        res = render_formulas(formulas, tmp_path_factory.mktemp(f"dpi{dpi}"), dpi=dpi, fonts=["cm"],
                              workers=2, progress=False)
        out[dpi] = {i: Image.open(p).convert("L") for i, p in res.rendered.items()}
    return out


def test_glyph_scale_follows_the_resolution(renders_by_dpi):
    """The estimate is the resolution over 115 dpi: per formula within -40%/+50% (a formula of
    x-height letters reads small), and the median over
    these eight formulas within 15% (bench/glyph_scale.py: within 7% over 300), 0.75x to 4x."""
    from pix2tex.preprocess import estimate_scale

    for dpi, images in renders_by_dpi.items():
        ratios = [estimate_scale(crop_to_ink(np.asarray(img))) / (dpi / 115) for img in images.values()]
        assert all(0.6 <= r <= 1.5 for r in ratios), (dpi, ratios)
        assert 0.85 <= np.median(ratios) <= 1.15, (dpi, ratios)


def test_hidpi_renders_reach_the_model_at_the_training_size(renders_by_dpi):
    """A formula at 1.5x-4x comes out of preprocess at about the size its 115-dpi render comes out
    at (without scale normalization it would be 1.5-4x as large); a 115-dpi render estimated
    within the band passes as it is."""
    from pix2tex.preprocess import SCALE_BAND, estimate_scale, glyph_height

    geo = Geometry(max_height=400, max_width=2000, min_height=16, min_width=16, patch_size=16)
    base = renders_by_dpi[115]
    in_band = [img for img in base.values()
               if SCALE_BAND[0] <= estimate_scale(crop_to_ink(np.asarray(img))) <= SCALE_BAND[1]]
    assert len(in_band) >= 3
    for img in in_band:
        assert np.array_equal(preprocess(img, geo), preprocess(img, geo, scale=False))
    for dpi in (173, 230, 345, 460):
        grown, ratios = [], []
        for i, img in renders_by_dpi[dpi].items():
            want = glyph_height(crop_to_ink(preprocess(base[i], geo)))
            got = glyph_height(crop_to_ink(preprocess(img, geo)))
            unscaled = glyph_height(crop_to_ink(preprocess(img, geo, scale=False)))
            assert 0.6 * want <= got <= 1.5 * want, (dpi, i, got, want)
            ratios.append(got / want)
            grown.append(unscaled / got)
        assert 0.85 <= np.median(ratios) <= 1.15, (dpi, ratios)
        assert np.median(grown) >= 0.85 * dpi / 115  # what the model saw before


def test_scale_needs_glyphs():
    """Too few glyphs to tell (one box): the crop is left at its size, as before."""
    from pix2tex.preprocess import estimate_scale, normalize_scale

    crop = crop_to_ink(np.asarray(ink_image()))
    assert estimate_scale(crop) is None
    assert normalize_scale(crop) is crop
