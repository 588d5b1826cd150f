"""Stopping a running decode: greedy/sampling and beam search ask `should_stop` once per step and
raise DecodeCancelled when it says so (a real, small, untrained model; min_len = max_len makes
every decode exactly max_len steps long)."""
from pathlib import Path

import pytest
import torch

from pix2tex.cancel import DecodeCancelled
from pix2tex.config import load_config
from pix2tex.models import get_model

REPO = Path(__file__).resolve().parent.parent
STEPS = 20


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only waits at barriers
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    cfg = load_config(REPO / "settings" / "config-tiny.yaml", [
        "num_tokens=40", "max_height=64", "max_width=128", "max_seq_len=48", "dim=64",
        "num_layers=2", "heads=4", "encoder_heads=4"])
    torch.manual_seed(0)
    return get_model(cfg).eval()


class StopAfter:
    """A should_stop that says True from its k-th call on (None: never), counting its calls."""

    def __init__(self, k: int | None = None):
        self.k, self.calls = k, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.k is not None and self.calls >= self.k


def generate(model, beam_width, should_stop=None):
    images = torch.randn(2, 1, 32, 64, generator=torch.Generator().manual_seed(0))
    return model.generate(images, max_len=STEPS, min_len=STEPS, beam_width=beam_width,
                          precision="fp32", should_stop=should_stop)


@pytest.mark.parametrize("beam_width", [1, 3])  # models/generate.sample, beam_search
@pytest.mark.parametrize("k", [1, 5])
def test_decoding_stops_at_the_step_it_is_told(model, beam_width, k):
    stop = StopAfter(k)
    with pytest.raises(DecodeCancelled):
        generate(model, beam_width, stop)
    assert stop.calls == k  # asked before each step, and no step after the first True


@pytest.mark.parametrize("beam_width", [1, 3])
def test_a_hook_that_never_fires_is_asked_once_per_step_and_changes_nothing(model, beam_width):
    stop = StopAfter()
    out = generate(model, beam_width, stop)
    assert stop.calls == STEPS and out.shape == (2, STEPS)
    assert torch.equal(out, generate(model, beam_width))
