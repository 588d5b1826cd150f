"""ONNX export: the graphs, onnxruntime decoding equal to PyTorch's greedy decoding, the CLI."""
import copy
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from pix2tex.export import export_decoder_step, export_encoder, encoder_graph
from pix2tex.onnx_model import OnnxModel
from pix2tex.predict import LatexOCR, main as predict_main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def formulas(tiny_model):
    """Rendered formulas: the 8 the model memorized and the validation ones it has never seen."""
    return list(tiny_model.images) + sorted(Path(tiny_model.data.val_images).glob("*.png"))


@pytest.fixture(scope="module")
def exported(tiny_model, formulas, tmp_path_factory):
    """The export CLI run once: it writes the folder and decodes a few images with both backends."""
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    proc = subprocess.run([sys.executable, "-m", "pix2tex.export", "--onnx", "--checkpoint",
                           str(tiny_model.checkpoint), "--out", str(out), "--check",
                           *map(str, formulas[:4])], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out, proc


@pytest.fixture(scope="module")
def torch_ocr(tiny_model):
    return LatexOCR(checkpoint=tiny_model.checkpoint, device="cpu", precision="fp32", threads=1)


@pytest.fixture(scope="module")
def onnx_ocr(exported):
    return LatexOCR(checkpoint=exported[0], backend="onnx", threads=1)


def test_cli_writes_the_folder_and_checks_it(exported, formulas):
    out, proc = exported
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("same: ") == 4 and "DIFFERENT" not in proc.stdout
    for name in ("encoder.onnx", "decoder_step.onnx", "tokenizer.json", "pix2tex_onnx.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "pix2tex_onnx.json").read_text())
    assert meta["cache"] == {"layers": 2, "heads": 4, "head_dim": 64}  # x-transformers' dim_head
    assert meta["config"]["encoder_structure"] == "vit"


def test_greedy_ids_equal_pytorch_on_rendered_formulas(torch_ocr, onnx_ocr, formulas):
    """Batches of one size as the API forms them; ids compared token for token."""
    groups = defaultdict(list)
    for path in formulas:
        page = torch_ocr.preprocess(path)
        groups[page.shape].append(page)
    from pix2tex.dataset.transforms import MEAN, STD

    lengths, texts = [], set()
    for pages in groups.values():
        x = ((np.stack(pages).astype(np.float32) / 255 - MEAN) / STD)[:, None]
        ids_torch = torch_ocr.model.generate(torch.from_numpy(x), precision="fp32").numpy()
        ids_onnx = onnx_ocr.model.generate(x)
        np.testing.assert_array_equal(ids_onnx, ids_torch)
        lengths += [int((row != 0).sum()) for row in ids_torch]
        texts |= set(torch_ocr.tokenizer.decode_batch(ids_torch.tolist()))
    # Non-trivial decoding: rows end at different steps (rows leave the batch mid-way), many
    # tokens each, different formulas.
    # (Unseen validation images may decode short: the median row, not every row, is long.)
    assert len(set(lengths)) >= 3 and sorted(lengths)[len(lengths) // 2] >= 5 and len(texts) >= 3
    assert max(len(g) for g in groups.values()) >= 2  # some batches hold several images


def test_mixed_sizes_decode_as_one_batch_with_the_ids_of_single_images(torch_ocr, onnx_ocr, formulas):
    from pix2tex.preprocess import normalize

    pages = [torch_ocr.preprocess(path) for path in formulas[:16]]
    assert len({p.shape for p in pages}) >= 3 and onnx_ocr.model.masks_memory
    together = onnx_ocr.model.generate_sizes([normalize(p[None])[0] for p in pages])
    for page, ids in zip(pages, together):
        alone = torch_ocr.model.generate(torch.from_numpy(normalize(page[None])),
                                         precision="fp32")[0].numpy()
        np.testing.assert_array_equal(ids[:len(alone)], alone)
        assert (ids[len(alone):] == 0).all()


def test_pad_and_bos_are_never_output_even_where_they_score_highest(torch_ocr, exported, formulas,
                                                                    tmp_path):
    """A copy of the model whose logits put PAD and BOS far ahead at every step: both backends
    mask them alike, so they decode the unbiased model's ids, token for token."""
    from pix2tex.dataset.transforms import MEAN, STD

    model = copy.deepcopy(torch_ocr.model)
    head = model.decoder.net.to_logits  # no bias of its own: give it one
    biased = torch.nn.Linear(head.in_features, head.out_features)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[[model.pad, model.bos]] = 1e4
    model.decoder.net.to_logits = biased
    folder = tmp_path / "biased"
    shutil.copytree(exported[0], folder)  # the encoder is unchanged: export the step only
    export_decoder_step(model, torch_ocr.cfg, str(folder / "decoder_step.onnx"))
    onnx = OnnxModel(folder, threads=1)

    groups = defaultdict(list)
    for path in formulas:
        page = torch_ocr.preprocess(path)
        groups[page.shape].append(page)
    pages = max(groups.values(), key=len)
    x = ((np.stack(pages).astype(np.float32) / 255 - MEAN) / STD)[:, None]
    # the exported graph carries the bias: unmasked, its first step would output PAD or BOS
    cross_k, cross_v = onnx.encoder.run(None, {"images": x})
    c = onnx.meta["cache"]
    empty = np.zeros((c["layers"], len(pages), c["heads"], 0, c["head_dim"]), np.float32)
    logits = onnx.step.run(None, {"tokens": np.full(len(pages), model.bos, np.int64),
                                  "cross_k": cross_k, "cross_v": cross_v, "self_k": empty,
                                  "self_v": empty,
                                  "cross_mask": np.zeros(cross_k.shape[1:4:2], np.float32)})[0]
    assert set(logits.argmax(-1).tolist()) <= {model.pad, model.bos}
    with torch.no_grad():
        want = torch_ocr.model.generate(torch.from_numpy(x), precision="fp32").numpy()
        biased_torch = model.generate(torch.from_numpy(x), precision="fp32").numpy()
    np.testing.assert_array_equal(biased_torch, want)
    np.testing.assert_array_equal(onnx.generate(x), want)
    assert (want != model.pad).sum(1).min() >= 1 and model.bos not in want


def test_same_latex_through_the_api_and_the_cli(torch_ocr, onnx_ocr, formulas, exported, capsys):
    assert onnx_ocr.batch(formulas) == torch_ocr.batch(formulas)
    code = predict_main([str(formulas[0]), "--backend", "onnx", "--checkpoint", str(exported[0])])
    assert code == 0
    assert capsys.readouterr().out == torch_ocr(formulas[0]) + "\n"


def test_graph_outputs_match_pytorch(torch_ocr, onnx_ocr, exported):
    """Encoder outputs and one decoder step with a non-empty cache, numerically."""
    from pix2tex.export import decoder_step_graph

    model = torch_ocr.model
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 16, 16), (3, 1, 32, 112), (2, 1, 64, 256)]:  # smallest .. largest
        x = rng.normal(size=shape).astype(np.float32)
        with torch.no_grad():
            want = encoder_graph(model)(torch.from_numpy(x))
        got = onnx_ocr.model.encoder.run(None, {"images": x})
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=1e-4)
    step, layers = decoder_step_graph(model)
    ck, cv = (t.numpy() for t in want)
    past = rng.normal(size=(layers, 2, 4, 7, 64)).astype(np.float32)
    tokens = np.array([5, 17])
    mask = np.zeros((2, ck.shape[3]), np.float32)
    mask[1, ck.shape[3] // 2:] = -np.inf  # the second row's memory padded: its second half masked
    with torch.no_grad():
        want = step(torch.from_numpy(tokens), torch.from_numpy(ck), torch.from_numpy(cv),
                    torch.from_numpy(past), torch.from_numpy(past), torch.from_numpy(mask))
    got = onnx_ocr.model.step.run(None, {"tokens": tokens, "cross_k": ck, "cross_v": cv,
                                         "self_k": past, "self_v": past, "cross_mask": mask})
    assert got[1].shape == (layers, 2, 4, 8, 64)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-4, rtol=1e-4)


def test_hybrid_encoder_exports_with_any_size(tmp_path):
    """The default encoder (ResNetV2 with 'same' padded, strided convs and pooling + ViT): fixed
    pads in the graph give the same output as the dynamic ones at every size."""
    import onnxruntime as ort

    from pix2tex.config import load_config
    from pix2tex.models import get_model

    torch.manual_seed(0)
    cfg = load_config(None, ["max_height=64", "max_width=128", "dim=32", "encoder_depth=1",
                             "num_layers=1", "heads=2", "backbone_layers=[1,1,1]", "num_tokens=50",
                             "max_seq_len=16"])
    model = get_model(cfg).eval()
    export_encoder(model, cfg, str(tmp_path / "encoder.onnx"))
    session = ort.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    weights = model.decoder._weights("fp32")
    rng = np.random.default_rng(1)
    for shape in [(1, 1, 16, 16), (3, 1, 48, 80), (2, 1, 64, 128)]:
        x = rng.normal(size=shape).astype(np.float32)
        with torch.no_grad():  # the training modules: StdConv2dSame with dynamic padding
            want = model.decoder.cross_kv(model.encode(torch.from_numpy(x)), weights)
        got = session.run(None, {"images": x})
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w.numpy(), atol=2e-4, rtol=1e-3)


def test_onnx_backend_limits(onnx_ocr, formulas, tmp_path):
    with pytest.raises(ValueError, match="greedily only"):
        onnx_ocr(formulas[0], beam_width=3)
    with pytest.raises(FileNotFoundError, match="not an ONNX export"):
        OnnxModel(tmp_path)
