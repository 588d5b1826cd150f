"""The PAD/BOS mask shared by the torch decoders and the ONNX loop, on both kinds of array."""
import numpy as np
import pytest
import torch

from pix2tex.special_tokens import mask_pad_bos


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_mask_pad_bos_in_place_and_eos_stays(kind):
    def logits():
        x = np.arange(12, dtype=np.float32)[::-1].reshape(2, 6).copy()  # id 0 scores highest
        return x if kind == "numpy" else torch.from_numpy(x)

    x = logits()
    assert mask_pad_bos(x, bos=1, eos=2, pad=0) is x
    row = np.asarray(x[0])
    assert np.isneginf(row[[0, 1]]).all() and np.isfinite(row[2:]).all()
    assert x.argmax(-1).tolist() == [2, 2]
    # an EOS that is also PAD (or BOS) keeps its logit: rows must still be able to end
    x = mask_pad_bos(logits(), bos=1, eos=0, pad=0)
    assert np.isneginf(np.asarray(x[:, 1])).all() and x.argmax(-1).tolist() == [0, 0]
