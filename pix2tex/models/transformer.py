"""LaTeX-OCR's module of the decoder (`pix2tex.models.transformer`), for code written against it.

`CustomARWrapper` is the x-transformers `AutoregressiveWrapper` subclass whose `generate()`
LaTeX-OCR calls; `Model.decoder` is one (a `LatexDecoder`). `get_decoder(args)` builds the
decoder a config describes. `top_k` and `top_p` are x-transformers' filters, as LaTeX-OCR
imported them here. The primary names are in `pix2tex.models.decoder`.
"""
from x_transformers.autoregressive_wrapper import top_k, top_p

from .decoder import CustomARWrapper, LatexDecoder, get_decoder

__all__ = ["CustomARWrapper", "LatexDecoder", "get_decoder", "top_k", "top_p"]
