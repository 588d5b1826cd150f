"""Image encoders (hybrid, vit, resnet), the transformer decoder and the Model that joins them."""
from pix2tex.extras import require

require("train", __name__)  # first: without the train extra, say what to install
from .model import Model, get_model, resolve_device

__all__ = ["Model", "get_model", "resolve_device"]
