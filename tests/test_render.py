"""dataset_tools.render with the real latex + dvipng."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from dataset_tools.render import (available_fonts, choose_style, prepare_for_tex, read_formulas,
                                  render_formulas)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = [r"x ^ { 2 } + y ^ { 2 } = z ^ { 2 }", r"\frac { a + b } { c } \sqrt { d }",
        r"\sum _ { i = 1 } ^ { n } i = \frac { n ( n + 1 ) } { 2 }", r"\alpha \beta \gamma"]
ONE_STYLE = dict(dpi=(150, 150), fonts=["cm"], progress=False)


def load(path):
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im)


@pytest.mark.parametrize("raw, tex", [
    (r"a \hspace { 2 c m } b", r"a \hspace {2cm} b"),
    (r"\hspace * { - 0 . 5 c m } x", r"\hspace * {-0.5cm} x"),
    (r"\vspace { 1 m m } x", r"\vspace {1mm} x"),
    (r"\kern - 0 . 1 e m x", r"\kern -0.1em x"),
    (r"\mkern 3 m u x", r"\mkern 3mu x"),
    (r"\hskip 3 p t p l u s 1 f i l x", r"\hskip 3ptplus1fil x"),
    (r"a \\ [ 2 p t ] b", r"a \\ [2pt] b"),
    (r"\rule [ - 1 p t ] { 2 c m } { 0 . 4 p t }", r"\rule [-1pt] {2cm} {0.4pt}"),
    (r"x = 1 . \ ", r"x = 1 ."),
    (r"x \ y \ ", r"x \ y"),
    (r"\mathrm { c m } \hspace { 1 e m } c m", r"\mathrm { c m } \hspace {1em} c m"),
    (r"\kern \fill x", r"\kern \fill x"),
])
def test_prepare_for_tex(raw, tex):
    assert prepare_for_tex(raw) == tex


def test_prepare_for_tex_leaves_ordinary_formulas_alone(shared_data):
    lines = read_formulas(str(shared_data / "im2latex_val.norm.txt"))[:300]
    plain = [f for f in lines if not any(c in f for c in (r"\hspace", r"\vspace", r"\kern", "\\\\"))
             and not f.rstrip().endswith(" \\")]
    assert len(plain) > 200
    assert all(prepare_for_tex(f) == " ".join(f.split()) for f in plain)


def test_good_formulas_render_tight_and_padded(tmp_path):
    for patch in (16, 32):
        res = render_formulas(GOOD, tmp_path / f"p{patch}", patch_size=patch, margin=2, **ONE_STYLE)
        assert res.rejected == {} and sorted(res.rendered) == list(range(len(GOOD)))
        for i, path in res.rendered.items():
            assert os.path.basename(path) == f"{i:07d}.png"
            a = load(path)
            H, W = a.shape
            assert H % patch == 0 and W % patch == 0
            assert a[0, 0] == 255 and a.min() < 64  # dark ink on white
            rows = np.flatnonzero((a < 255).any(1))
            cols = np.flatnonzero((a < 255).any(0))
            h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
            # tight: the canvas is the smallest patch multiple around ink + margins
            assert H - h - 4 < patch and W - w - 4 < patch
            assert min(rows[0], cols[0], H - 1 - rows[-1], W - 1 - cols[-1]) >= 2
    assert not [n for n in os.listdir(tmp_path / "p16") if not n.endswith(".png")]  # no temp files


def test_bad_formulas_rejected_with_index_and_neighbours_render(tmp_path):
    formulas = GOOD + [r"\frac { a } { b } \undefinedmacro"] + GOOD + [r"\frac { a"] + GOOD + [""]
    bad = {len(GOOD): "Undefined control sequence", 2 * len(GOOD) + 1: "File ended",
           3 * len(GOOD) + 2: "empty formula"}
    rejects = tmp_path / "rejects.txt"
    res = render_formulas(formulas, tmp_path / "img", rejects_path=rejects, **ONE_STYLE)
    assert set(res.rejected) == set(bad)
    for i, why in bad.items():
        assert why in res.rejected[i]
    assert set(res.rendered) == set(range(len(formulas))) - set(bad)
    lines = rejects.read_text(encoding="utf-8").splitlines()
    assert [int(line.split("\t")[0]) for line in lines] == sorted(bad)
    index, reason, formula = lines[0].split("\t")
    assert "Undefined control sequence" in reason and "\\undefinedmacro" in reason
    assert formula == formulas[int(index)]


def test_several_pages_dvipng_cannot_draw_in_one_batch(tmp_path):
    """Computer Modern has no glyph for \\textcircled's circle or \\copyright: dvipng --picky
    draws neither page. Each one gets its own reject and the pages around them render (a batch
    with two such pages used to stop the whole render with a KeyError)."""
    bad = [r"\textcircled { a } ^ { 2 }", r"{ \large { \copyright _ { 2 } } }"]
    res = render_formulas(GOOD + bad + GOOD, tmp_path / "img", **ONE_STYLE)
    assert set(res.rejected) == {len(GOOD), len(GOOD) + 1}
    assert all("unable to draw glyph" in why for why in res.rejected.values())
    assert set(res.rendered) == set(range(2 * len(GOOD) + 2)) - set(res.rejected)


def test_errors_that_break_tex_state_do_not_change_neighbours(tmp_path):
    # an unclosed environment, an unclosed \left, a runaway argument, an extra brace: each one
    # is rejected, and every formula after it looks exactly as it does when drawn alone
    bad = {1: r"\begin{array} { c } a", 3: r"\left( x", 5: r"\frac { a", 7: r"x } y"}
    formulas = [GOOD[i // 2 % len(GOOD)] if i not in bad else bad[i] for i in range(9)]
    res = render_formulas(formulas, tmp_path / "batch", **ONE_STYLE)
    assert set(res.rejected) == set(bad)
    assert "File ended" in res.rejected[5] and "Extra }" in res.rejected[7]
    for i in set(range(9)) - set(bad):
        alone = render_formulas([formulas[i]], tmp_path / f"alone{i}", **ONE_STYLE)
        assert np.array_equal(load(res.rendered[i]), load(alone.rendered[0])), i


def test_hostile_payloads_are_contained(tmp_path):
    marker = tmp_path / "pwned"
    leak = tmp_path / "leak.png"
    Image.new("L", (40, 40), 0).save(leak)  # an image dvipng could be tricked into embedding
    hostile = [r"\input{/etc/passwd}", r"\input /etc/passwd", r"\input{../../../../etc/passwd}",
               rf"\write18{{touch {marker}1}} x", rf"\immediate\write18{{touch {marker}2}} x",
               rf"x \special{{PSfile={leak} llx=0 lly=0 urx=40 ury=40 rwi=400}}",
               rf"x \csname special\endcsname{{PSfile={leak}}}"]
    res = render_formulas(GOOD[:1] + hostile, tmp_path / "img", **ONE_STYLE)
    assert 0 in res.rendered
    for i in (1, 2, 3):  # paranoid openin: the file is not found, nothing is read
        assert "not found" in res.rejected[i] or "can't find" in res.rejected[i]
    for i in (6, 7):
        assert "special" in res.rejected[i]
    assert not list(tmp_path.glob("pwned*"))  # \write18 never ran
    for i in (4, 5):  # rendered harmlessly: just the "x"
        a = load(res.rendered[i])
        assert a.shape[1] <= 32 and a.shape[0] <= 32


def test_infinite_loop_times_out(tmp_path):
    t0 = time.perf_counter()
    res = render_formulas([GOOD[0], r"\def\x{\x}\x", GOOD[1]], tmp_path, timeout=2, **ONE_STYLE)
    assert res.rejected == {1: "timeout"}
    assert set(res.rendered) == {0, 2}
    assert time.perf_counter() - t0 < 30


def test_a_formula_that_grows_memory_without_bound_is_rejected(tmp_path):
    # every expansion appends an atom: TeX's main memory fills, latex stops with "capacity
    # exceeded" under its memory limit, and the formulas beside it still render
    res = render_formulas([GOOD[0], r"\def\x{x\x}\x", GOOD[1]], tmp_path, timeout=20, **ONE_STYLE)
    assert set(res.rendered) == {0, 2}
    assert set(res.rejected) == {1} and "capacity exceeded" in res.rejected[1].lower(), res.rejected


def test_resume_skips_existing_images(tmp_path):
    first = render_formulas(GOOD, tmp_path, **ONE_STYLE)
    kept = first.rendered[1]
    os.utime(kept, (1, 1))  # a marker: re-drawing it would change the mtime
    os.remove(first.rendered[2])
    again = render_formulas(GOOD, tmp_path, **ONE_STYLE)
    assert again.skipped == len(GOOD) - 1
    assert sorted(again.rendered) == list(range(len(GOOD))) and again.rejected == {}
    assert os.stat(kept).st_mtime == 1
    assert os.path.exists(first.rendered[2])


def test_style_is_deterministic_per_seed_and_index(tmp_path):
    fonts = available_fonts()
    assert fonts[0] == "cm" and {"mathptmx", "mathpazo"} <= set(fonts)
    draws = [choose_style(i, 7, (110, 180), fonts) for i in range(200)]
    assert draws == [choose_style(i, 7, (110, 180), fonts) for i in range(200)]
    assert draws != [choose_style(i, 8, (110, 180), fonts) for i in range(200)]
    assert {f for f, _ in draws} == set(fonts) and all(110 <= d <= 180 for _, d in draws)
    a = render_formulas(GOOD, tmp_path / "a", seed=7, progress=False)
    b = render_formulas(GOOD, tmp_path / "b", seed=7, progress=False)
    for i in range(len(GOOD)):  # same seed: the same pixels
        assert np.array_equal(load(a.rendered[i]), load(b.rendered[i]))
    with pytest.raises(ValueError, match="not available"):
        render_formulas(GOOD, tmp_path / "c", fonts=["nosuchfont"], progress=False)


def test_each_formula_in_its_own_font_without_fallback(tmp_path):
    """font_each (render-and-compare draws a page's candidates in the page's font): every formula
    in the font asked for; one that fails in it is rejected, not drawn in Computer Modern."""
    formulas = [GOOD[0], GOOD[0], r"\jmath + x"]
    res = render_formulas(formulas, tmp_path, dpi=150, font_each=["cm", "mathptmx", "mathptmx"],
                          progress=False)
    assert sorted(res.rendered) == [0, 1] and list(res.rejected) == [2]
    assert not np.array_equal(load(res.rendered[0]), load(res.rendered[1]))  # another font
    with pytest.raises(ValueError, match="nosuchfont"):
        render_formulas(GOOD[:1], tmp_path / "x", font_each=["nosuchfont"], progress=False)


def test_scale_augmentation_draws_a_share_far_from_the_training_dpi():
    fonts = available_fonts()
    plain = [choose_style(i, 7, (95, 140), fonts) for i in range(2000)]
    # the other formulas keep the draws they had without scale augmentation
    assert [choose_style(i, 7, (95, 140), fonts, scale_dpi=(55, 460), scale_share=0.0)
            for i in range(2000)] == plain
    drawn = [choose_style(i, 7, (95, 140), fonts, scale_dpi=(55, 460), scale_share=0.4)
             for i in range(2000)]
    moved = [d for (f, d), (f0, d0) in zip(drawn, plain) if d != d0]
    assert all(f == f0 for (f, _), (f0, _) in zip(drawn, plain))
    assert 0.3 < len(moved) / len(drawn) < 0.45
    assert all(55 <= d <= 460 and (d - 55) % 5 == 0 for d in moved)
    # log-uniform: about as many between 2x and 4x the training scale as between 1x and 2x
    twice = sum(230 <= d <= 460 for d in moved)
    once = sum(115 <= d < 230 for d in moved)
    assert 0.75 < twice / once < 1.33, (once, twice)
    assert sum(d < 100 for d in moved) > 0.15 * len(moved)  # and below the training dpi
    with pytest.raises(ValueError, match="scale_share"):
        render_formulas(GOOD, "unused", scale_share=0.4, progress=False)


def test_scale_augmented_renders_come_out_at_the_training_glyph_size(tmp_path):
    """A formula drawn at 0.5x-4x the training resolution with scale augmentation comes out near
    the size of its 115-dpi render, as prediction's preprocessing would hand it to the model."""
    from pix2tex.preprocess import glyph_height

    formulas = GOOD + [r"a _ { i j } = \int _ { 0 } ^ { 1 } f ( x ) \, d x + \log y"]
    base = render_formulas(formulas, tmp_path / "base", dpi=115, fonts=["cm"], progress=False)
    for dpi in (60, 230, 460):
        plain = render_formulas(formulas, tmp_path / f"plain{dpi}", dpi=dpi, fonts=["cm"],
                                progress=False)
        scaled = render_formulas(formulas, tmp_path / f"scaled{dpi}", dpi=dpi, fonts=["cm"],
                                 scale_dpi=(dpi, dpi), scale_share=1.0, progress=False)
        assert scaled.rejected == {} and len(scaled.rendered) == len(formulas)
        ratios, unscaled = [], []
        for i, path in scaled.rendered.items():
            a = load(path)
            assert a.shape[0] % 16 == 0 and a.shape[1] % 16 == 0 and a[0, 0] == 255 and a.min() < 128
            want = glyph_height(load(base.rendered[i]))
            ratios.append(glyph_height(a) / want)
            unscaled.append(glyph_height(load(plain.rendered[i])) / want)
        assert 0.75 <= np.median(ratios) <= 1.33, (dpi, ratios)
        assert abs(np.log(np.median(unscaled) / (dpi / 115))) < 0.25, (dpi, unscaled)  # not a no-op


def test_real_formulas_render(shared_data, tmp_path):
    formulas = read_formulas(str(shared_data / "im2latex_val.norm.txt"))[:150]
    res = render_formulas(formulas, tmp_path, workers=2, progress=False)
    assert len(res.rendered) + len(res.rejected) == len(formulas)
    assert res.failure_rate < 0.03, res.rejected
    for path in list(res.rendered.values())[:20]:
        a = load(path)
        assert a.shape[0] % 16 == 0 and a.shape[1] % 16 == 0 and a.min() < 128


def test_batch_renders_real_formulas_exactly_as_alone(shared_data, tmp_path):
    # arXiv formulas with paper macros (\ket, ...) fail in the middle of a batch; the batch must
    # reject the same ones and draw the others pixel for pixel as latex runs of their own do
    formulas = read_formulas(str(shared_data / "arxiv_display.norm.txt"))[5160:5200]
    batch = render_formulas(formulas, tmp_path / "batch", workers=2, **ONE_STYLE)
    alone = render_formulas(formulas, tmp_path / "alone", workers=2, batch_size=1, **ONE_STYLE)
    assert batch.timings["latex_runs"] < 5 and alone.timings["latex_runs"] == len(formulas)
    assert len(batch.rejected) >= 2 and set(batch.rejected) == set(alone.rejected)
    for i in batch.rendered:
        assert np.array_equal(load(batch.rendered[i]), load(alone.rendered[i])), i


def test_cli_writes_rejects_beside_the_folder(tmp_path):
    src = tmp_path / "f.txt"
    src.write_text("\n".join(GOOD + [r"\badmacro x"] + GOOD) + "\n", encoding="utf-8")
    out = tmp_path / "images"
    proc = subprocess.run([sys.executable, "-m", "dataset_tools.render", str(src), "-o", str(out),
                           "--workers", "2", "--batch-size", "3", "--fonts", "cm,mathptmx"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "rejected 1" in proc.stdout
    assert len(list(out.glob("*.png"))) == 2 * len(GOOD)
    line = (tmp_path / "images.rejects.txt").read_text(encoding="utf-8").strip()
    assert line.startswith(f"{len(GOOD)}\t") and line.endswith("\t\\badmacro x")


def test_does_not_import_torch():
    code = "import sys, dataset_tools.render; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_tex_search_paths_in_the_environment_are_ignored(tmp_path, monkeypatch):
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "amsmath.sty").write_text("\\errmessage{a look-alike amsmath}\n")
    monkeypatch.setenv("TEXINPUTS", f"{evil}//:")
    monkeypatch.setenv("TEXMFHOME", str(evil))
    monkeypatch.setenv("KPSE_DOT", str(evil))
    res = render_formulas(GOOD[:2], tmp_path / "img", **ONE_STYLE)
    assert res.rejected == {} and sorted(res.rendered) == [0, 1]
