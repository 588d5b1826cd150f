"""Make tests/fixtures/latex_ocr/tiny_*: a LaTeX-OCR (pix2tex 0.1.4) model of a tiny config, its
weights file as LaTeX-OCR writes one (a bare state dict), and its outputs on a fixed input.

Runs in the peer venv (../shared/peer/setup_venv.sh), from outside this repository so that its
`pix2tex` is LaTeX-OCR's:

    cd /tmp && NO_ALBUMENTATIONS_UPDATE=1 ~/.cache/peer-pix2tex/bin/python \\
        /path/to/repo/scripts/make_latex_ocr_fixture.py /path/to/repo/tests/fixtures/latex_ocr
"""
import os
import sys

import torch
import yaml
from munch import Munch

from pix2tex.models import get_model  # LaTeX-OCR's

out = sys.argv[1]
config = {  # LaTeX-OCR config keys; small enough to commit (about 0.75 MB of weights)
    "encoder_structure": "hybrid", "backbone_layers": [1], "channels": 1, "max_height": 32,
    "max_width": 64, "min_height": 32, "min_width": 32, "patch_size": 8, "dim": 32,
    "encoder_depth": 1, "heads": 2, "num_layers": 1, "num_tokens": 40, "max_seq_len": 32,
    "pad_token": 0, "bos_token": 1, "eos_token": 2,
    "decoder_args": {"attn_on_attn": True, "cross_attend": True, "ff_glu": True,
                     "rel_pos_bias": False, "use_scalenorm": False},
}
torch.manual_seed(0)
model = get_model(Munch(config, device="cpu", wandb=False)).eval()
with torch.no_grad():  # random weights would leave the biases at zero: make every one count
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.05)
gen = torch.Generator().manual_seed(1)
images = torch.randn(2, 1, 32, 64, generator=gen)
tgt = torch.tensor([[1, 5, 9, 12, 7], [1, 30, 4, 4, 22]])
with torch.no_grad():
    memory = model.encoder(images)
    logits = model.decoder.net(tgt, context=memory)
os.makedirs(out, exist_ok=True)
torch.save(model.state_dict(), os.path.join(out, "tiny_weights.pth"))
torch.save({"images": images, "tgt": tgt, "memory": memory, "logits": logits},
           os.path.join(out, "tiny_outputs.pth"))
with open(os.path.join(out, "tiny_config.yaml"), "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)
print(f"wrote {out}/tiny_weights.pth, tiny_outputs.pth, tiny_config.yaml: "
      f"{sum(p.numel() for p in model.parameters())} parameters, torch {torch.__version__}")
