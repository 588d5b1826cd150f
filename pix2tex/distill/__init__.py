"""Knowledge distillation of a trained teacher into a small, fast student.

`losses` (the masked KD losses), `teacher` (loading the frozen teacher, the digest that names its
weights), `main` (Distiller, the training run, teacher-vs-student comparison, `python -m
pix2tex.distill`), `pseudo_labels` (the teacher's beam outputs as a dataset, for sequence-level KD:
`python -m pix2tex.distill.pseudo_labels`, and the check that a label set fits the teacher).
"""
from pix2tex.extras import require

require("train", __name__)  # first: without the train extra, say what to install
