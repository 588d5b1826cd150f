"""Image encoders (hybrid, vit, resnet), the transformer decoder and the Model that joins them."""
from .model import Model, get_model, resolve_device

__all__ = ["Model", "get_model", "resolve_device"]
