"""pix2tex: image of a printed formula -> LaTeX."""
__version__ = "0.2.0"
