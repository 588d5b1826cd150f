"""pix2tex: image of a printed formula -> LaTeX."""
__version__ = "0.2.0"


def __getattr__(name):
    # `from pix2tex import LatexOCR` without making `import pix2tex` load torch.
    if name == "LatexOCR":
        from pix2tex.predict import LatexOCR
        return LatexOCR
    raise AttributeError(f"module 'pix2tex' has no attribute {name!r}")
