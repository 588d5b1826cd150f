"""CPU training keeps freed memory in malloc's heap: large tensors stop coming from fresh mmaps.

Each case runs in its own Python process (malloc settings are per process and cannot be undone)."""
import json
import os
import subprocess
import sys

from conftest import REPO

# Allocate a 64 MB tensor and report how much of it came from mmap (glibc's mallinfo2.hblkhd),
# after CPU training's runtime set-up.
PROBE = r"""
import ctypes, json, sys
import torch
from pix2tex.config import load_config
from pix2tex.train import setup_runtime

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
setup_runtime(load_config(sys.argv[1], ["device=cpu", "precision=fp32"]))
before = libc.mallinfo2().hblkhd
x = torch.ones(16 * 2**20)
mmapped = libc.mallinfo2().hblkhd - before
print(json.dumps({"mmapped": mmapped, "heap": libc.mallinfo2().arena}))
"""


def probe(keep: str) -> dict:
    env = dict(os.environ, PIX2TEX_KEEP_FREED_MEMORY=keep, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "settings" / "config-tiny.yaml")],
                         env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_cpu_training_serves_large_tensors_from_the_heap():
    kept = probe("1")
    assert kept["mmapped"] == 0
    assert kept["heap"] >= 64 * 2**20  # the tensor lives in the heap


def test_keep_freed_memory_can_be_turned_off():
    assert probe("0")["mmapped"] >= 64 * 2**20  # glibc's default: a block this big is an mmap
