"""The onnxruntime greedy loop without an export: a scripted decoder step whose logits put PAD or
BOS first at every step, checked against the rule written out and against models/generate.sample.
(Decoding real exported graphs, equal to PyTorch's: tests/test_export.py.)"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pix2tex.cancel import DecodeCancelled
from pix2tex.models.generate import sample
from pix2tex.onnx_model import greedy

REPO = Path(__file__).resolve().parent.parent
PAD, BOS, EOS = 0, 1, 2
CACHE = {"layers": 1, "heads": 1, "head_dim": 1}
STEPS = 7


def scripted_logits(ends, seed=0, vocab=9) -> np.ndarray:
    """Logits [rows, STEPS, V]: PAD scores highest at even steps, BOS at odd ones; after them, row
    r's EOS at step ends[r] (None: never) and random other tokens elsewhere."""
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(len(ends), STEPS, vocab)).astype(np.float32)
    table[:, :, EOS] = -8.0
    table[:, 0::2, PAD] = 10.0
    table[:, 1::2, BOS] = 10.0
    for row, end in enumerate(ends):
        if end is not None:
            table[row, end, EOS] = 8.0
    return table


def onnx_step(table: np.ndarray):
    """decoder_step.onnx's stand-in: the logits of (original row, position). The row rides in
    cross_k (rows leave the batch at their EOS), the position is the cache length, as in the graph."""
    def grow(cache):
        return np.concatenate([cache, np.zeros(cache.shape[:3] + (1,) + cache.shape[4:], np.float32)], 3)

    def step(feeds):
        rows = feeds["cross_k"][0, :, 0, 0, 0].astype(np.int64)
        assert len(feeds["tokens"]) == len(rows)
        return table[rows, feeds["self_k"].shape[3]], grow(feeds["self_k"]), grow(feeds["self_v"])
    return step


class ScriptedState:
    """The same table behind models/generate's state interface (step, select)."""

    def __init__(self, table: np.ndarray):
        self.table, self.rows, self.t = torch.from_numpy(table), torch.arange(len(table)), 0

    def step(self, tokens):
        self.t += 1
        return self.table[self.rows, self.t - 1].clone()

    def select(self, keep):
        self.rows = self.rows[keep]


def onnx_greedy(table: np.ndarray, max_len: int, should_stop=None, logprob: bool = False):
    rows = np.arange(len(table), dtype=np.float32).reshape(1, -1, 1, 1, 1)
    ids, lp = greedy(onnx_step(table), rows, rows.copy(), CACHE, max_len, BOS, EOS, PAD,
                     should_stop=should_stop)
    return (ids, lp) if logprob else ids


def written_out(table: np.ndarray, max_len: int) -> np.ndarray:
    """The rule by hand: per row, the best id other than PAD and BOS until EOS, then PAD."""
    out = np.full((len(table), max_len), PAD)
    length = 0
    for r in range(len(table)):
        for t in range(max_len):
            scores = table[r, t].copy()
            scores[[PAD, BOS]] = -np.inf
            out[r, t] = scores.argmax()
            length = max(length, t + 1)
            if out[r, t] == EOS:
                break
    return out[:, :length]


@pytest.mark.parametrize("ends", [[1, 3, 5, None], [2, 2, 4, 0], [0]])
@pytest.mark.parametrize("max_len", [STEPS, 3])
def test_greedy_never_outputs_pad_or_bos_where_they_score_highest(ends, max_len):
    table = scripted_logits(ends)
    assert set(table.argmax(-1).ravel().tolist()) == {PAD, BOS}  # unmasked, only these would win
    ids = onnx_greedy(table, max_len)
    np.testing.assert_array_equal(ids, written_out(table, max_len))
    assert BOS not in ids
    for row, end in zip(ids, ends):
        body = row if end is None or end >= max_len else row[:end]
        assert PAD not in body
        if end is not None and end < max_len:
            assert row[end] == EOS and (row[end + 1:] == PAD).all()


@pytest.mark.parametrize("seed", range(3))
def test_greedy_ids_and_logprobs_equal_generate_sample(seed):
    """One rule for both backends: the numpy loop and the torch sampler at temperature 0, and
    the same sequence log-probability (the answer's confidence), which is the sum written out."""
    for ends in ([1, 3, 5, None], [2, 2, 4, 0]):
        table = scripted_logits(ends, seed)
        want, want_lp = sample(ScriptedState(table), len(table), STEPS, BOS, EOS, PAD,
                               return_logprob=True)
        ids, lp = onnx_greedy(table, STEPS, logprob=True)
        np.testing.assert_array_equal(ids, want.numpy())
        np.testing.assert_allclose(lp, want_lp.numpy(), rtol=1e-5, atol=1e-6)  # float32 torch
        by_hand = []
        for r, row in enumerate(ids):
            total = 0.0
            for t, token in enumerate(row):
                if token == PAD:
                    break
                scores = table[r, t].astype(np.float64)
                scores[[PAD, BOS]] = -np.inf
                total += scores[token] - np.log(np.exp(scores - scores.max()).sum()) - scores.max()
            by_hand.append(total)
        np.testing.assert_allclose(lp, by_hand, rtol=1e-5, atol=1e-6)
        assert (lp < 0).all()


class StopAfter:
    """A should_stop that says True from its k-th call on (None: never), counting its calls."""

    def __init__(self, k=None):
        self.k, self.calls = k, 0

    def __call__(self):
        self.calls += 1
        return self.k is not None and self.calls >= self.k


@pytest.mark.parametrize("k", [1, 4])
def test_greedy_stops_at_the_step_it_is_told(k):
    table = scripted_logits([None, None])  # rows that never end: STEPS steps
    stop = StopAfter(k)
    with pytest.raises(DecodeCancelled):
        onnx_greedy(table, STEPS, stop)
    assert stop.calls == k  # asked before each step, and no step after the first True
    never = StopAfter()
    np.testing.assert_array_equal(onnx_greedy(table, STEPS, never), onnx_greedy(table, STEPS))
    assert never.calls == STEPS


def test_does_not_import_torch():
    code = "import sys, pix2tex.onnx_model; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
