"""Autoregressive decoding over a KV-cached decoder state: greedy / sampling, and beam search.

A state (decoder.LeanState or decoder.XTransformersState) has `step(tokens [B]) -> logits [B, V]`
and `select(rows)`. Both decoders return token ids [B, L] without BOS: each row ends with its EOS
and is padded with PAD after it (a row that reached max_len has no EOS); L is the longest row.
Both ask `should_stop()` (if given) before each step and raise pix2tex.cancel.DecodeCancelled when
it says True. With `return_logprob` they also return each row's sequence log-probability [B]: the
sum over its tokens (EOS included) of log p under the model (temperature 1, PAD and BOS excluded),
the answer's `confidence`.
"""
from __future__ import annotations

from typing import Callable

import torch

from pix2tex.cancel import stop_if_asked
from pix2tex.special_tokens import mask_pad_bos


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits with everything outside the top-k and outside the top-p nucleus set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def sample(state, batch: int, max_len: int, bos: int, eos: int, pad: int, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, min_len: int = 0, device=None,
           generator: torch.Generator | None = None, first: torch.Tensor | None = None,
           should_stop: Callable[[], bool] | None = None, return_logprob: bool = False):
    """Greedy (temperature 0) or sampled decoding from BOS (or from the tokens `first` [B], the
    last of a longer start). A row leaves the batch at its EOS, so the remaining rows decode
    with less work."""
    out = torch.full((batch, max_len), pad, dtype=torch.long, device=device)
    rows = torch.arange(batch, device=device)  # original row of each active row
    tokens = torch.full((batch,), bos, dtype=torch.long, device=device) if first is None \
        else first.to(device=device, dtype=torch.long)
    logprob = torch.zeros(batch, device=device)
    length = 0
    for t in range(max_len):
        stop_if_asked(should_stop)
        logits = mask_pad_bos(state.step(tokens), bos, eos, pad)  # as the ONNX loop does
        if t < min_len:
            logits[:, eos] = float("-inf")
        tokens = next_tokens(logits, temperature, top_k, top_p, generator)
        out[rows, t] = tokens
        if return_logprob:
            logprob[rows] += logits.log_softmax(dim=-1).gather(1, tokens[:, None])[:, 0]
        length = t + 1
        done = tokens == eos
        if bool(done.any()):
            keep = (~done).nonzero()[:, 0]
            if keep.numel() == 0:
                break
            state.select(keep)
            rows, tokens = rows[keep], tokens[keep]
    return (out[:, :length], logprob) if return_logprob else out[:, :length]


def beam_search(state, batch: int, beam_width: int, max_len: int, bos: int, eos: int, pad: int,
                length_penalty: float = 1.0, min_len: int = 0, device=None,
                should_stop: Callable[[], bool] | None = None, return_logprob: bool = False,
                return_beams: bool = False):
    """Batched beam search; `state` holds batch*beam_width rows (image-major).

    A hypothesis is scored by sum(log p) / length**length_penalty (length counts EOS). Each step
    takes the best 2k continuations per image: EOS among the top k finish a hypothesis, the best k
    others stay alive (so width 1 is greedy). An image is done once it has k finished hypotheses
    and its best live beam scores below its worst finished one at the current length.
    return_beams: (ids [B, k, L], log-probabilities [B, k]) of each image's k best hypotheses,
    best first (-inf where an image has fewer).
    """
    k = beam_width
    neg_inf = float("-inf")
    # An image leaves the batch once it is done (its rows leave the state, so the others decode
    # with less work); its finished hypotheses are final then and are kept here.
    out_fin_seqs = torch.full((batch, k, max_len), pad, dtype=torch.long, device=device)
    out_fin_scores = torch.full((batch, k), neg_inf, device=device)
    out_fin_len = torch.zeros(batch, k, dtype=torch.long, device=device)
    img = torch.arange(batch, device=device)  # the image of each image still in the batch
    n = batch
    seqs = torch.full((n, k, max_len), pad, dtype=torch.long, device=device)
    scores = torch.zeros(n, k, device=device)
    scores[:, 1:] = neg_inf  # all beams start identical: expand only the first at step 0
    fin_seqs = torch.full((n, k, max_len), pad, dtype=torch.long, device=device)
    fin_scores = torch.full((n, k), neg_inf, device=device)
    fin_len = torch.zeros(n, k, dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    tokens = torch.full((n * k,), bos, dtype=torch.long, device=device)
    offsets = (torch.arange(n, device=device) * k)[:, None]
    for t in range(max_len):
        stop_if_asked(should_stop)
        logits = mask_pad_bos(state.step(tokens), bos, eos, pad)
        logp = logits.log_softmax(dim=-1)  # [n*k, V]
        if t < min_len:
            logp[:, eos] = neg_inf
        V = logp.shape[-1]
        cand = (scores[:, :, None] + logp.view(n, k, V)).view(n, k * V)
        cand_scores, cand_idx = cand.topk(2 * k, dim=-1)  # [n, 2k]
        parent, token = cand_idx // V, cand_idx % V
        length = t + 1
        # finished: EOS among the top k candidates, scored with the length penalty
        is_eos = token == eos
        finishing = is_eos & (torch.arange(2 * k, device=device) < k)
        new_fin = torch.where(finishing, cand_scores / length ** length_penalty,
                              torch.full_like(cand_scores, neg_inf))
        if bool(finishing.any()):
            new_seqs = seqs.gather(1, parent[:, :, None].expand(-1, -1, max_len)).clone()
            new_seqs[:, :, t] = token
            all_scores = torch.cat([fin_scores, new_fin], dim=1)
            fin_scores, best = all_scores.topk(k, dim=1)
            fin_seqs = torch.cat([fin_seqs, new_seqs], 1).gather(
                1, best[:, :, None].expand(-1, -1, max_len))
            fin_len = torch.cat([fin_len, torch.full_like(new_fin, length, dtype=torch.long)],
                                1).gather(1, best)
        # alive: the best k non-EOS candidates (there are at least k: each beam has one EOS)
        rank = torch.where(is_eos, 2 * k, 0) + torch.arange(2 * k, device=device)
        keep = rank.argsort(dim=1)[:, :k]
        scores = cand_scores.gather(1, keep)
        parent, token = parent.gather(1, keep), token.gather(1, keep)
        seqs = seqs.gather(1, parent[:, :, None].expand(-1, -1, max_len))
        seqs[:, :, t] = token
        # an image is done when no live beam can beat its worst finished one
        best_alive = scores[:, 0] / length ** length_penalty
        done = (fin_scores[:, -1] > neg_inf) & (best_alive <= fin_scores[:, -1])
        if bool(done.all()) or t == max_len - 1:
            break
        rows = parent + offsets  # [n, k]: each new beam's parent row in the state
        if bool(done.any()):
            gone, alive = done.nonzero()[:, 0], (~done).nonzero()[:, 0]
            out_fin_seqs[img[gone]] = fin_seqs[gone]
            out_fin_scores[img[gone]] = fin_scores[gone]
            out_fin_len[img[gone]] = fin_len[gone]
            img, seqs, scores, token = img[alive], seqs[alive], scores[alive], token[alive]
            fin_seqs, fin_scores, fin_len = fin_seqs[alive], fin_scores[alive], fin_len[alive]
            state.select(rows[alive].flatten())
            n = len(alive)
            offsets = (torch.arange(n, device=device) * k)[:, None]
        else:
            state.select(rows.flatten(), cross=False)
        tokens = token.flatten()
    out_fin_seqs[img], out_fin_scores[img], out_fin_len[img] = fin_seqs, fin_scores, fin_len
    # images without k finished hypotheses: their live beams compete too (no EOS, max length)
    live_scores = torch.full((batch, k), neg_inf, device=device)
    live_scores[img] = torch.where(done[:, None], torch.full_like(scores, neg_inf),
                                   scores / length ** length_penalty)
    live_seqs = torch.full((batch, k, max_len), pad, dtype=torch.long, device=device)
    live_seqs[img] = seqs
    fin_seqs, fin_scores, fin_len, seqs = out_fin_seqs, out_fin_scores, out_fin_len, live_seqs
    all_scores = torch.cat([fin_scores, live_scores], 1)
    best = all_scores.argmax(dim=1)
    rows = torch.arange(batch, device=device)
    if return_beams:
        top, order = all_scores.topk(k, dim=1)
        lengths = torch.cat([fin_len, torch.full_like(fin_len, length)], 1).gather(1, order)
        beams = torch.cat([fin_seqs, seqs], 1).gather(1, order[:, :, None].expand(-1, -1, max_len))
        return beams[:, :, :int(lengths.max())], top * lengths.float() ** length_penalty
    out = torch.cat([fin_seqs, seqs], 1)[rows, best]
    lengths = torch.cat([fin_len, torch.full_like(fin_len, length)], 1)[rows, best]
    out = out[:, :int(lengths.max())]
    if not return_logprob:
        return out
    return out, all_scores[rows, best] * lengths.float() ** length_penalty  # undo the penalty


class GreedyStream:
    """Greedy decoding with continuous batching over a decoder.StreamState: images join between
    steps (`add`) and each leaves at its EOS or at `max_len` tokens (`step` returns it), so no
    image waits for a batch-mate's longer formula and a new one need not wait for the batch to
    end. Each row decodes as it would alone (its own positions; padding masked)."""

    def __init__(self, state, bos: int, eos: int, pad: int, max_len: int):
        if max_len > state.max_len:
            raise ValueError(f"max_len={max_len} exceeds the state's room ({state.max_len})")
        self.state, self.bos, self.eos, self.pad, self.max_len = state, bos, eos, pad, max_len
        self.keys: list = []  # the caller's key of each row
        self.tokens = self.ids = self.logprob = None

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, memory, memory_mask, keys: list) -> None:
        """One row per image of `memory` [b, N, dim] (memory_mask [b, N] or None), known by `keys`."""
        b, device = memory.shape[0], memory.device
        if len(keys) != b:
            raise ValueError(f"{len(keys)} keys for {b} images")
        self.state.join(memory, memory_mask)
        new = (torch.full((b,), self.bos, dtype=torch.long, device=device),
               torch.full((b, self.max_len), self.pad, dtype=torch.long, device=device),
               torch.zeros(b, device=device))
        if self.tokens is None or not self.keys:
            self.tokens, self.ids, self.logprob = new
        else:
            self.tokens, self.ids, self.logprob = (torch.cat([old, n]) for old, n in
                                                   zip((self.tokens, self.ids, self.logprob), new))
        self.keys += list(keys)

    def step(self) -> list[tuple]:
        """One token for every row. Returns the rows that finished, as (key, token ids without
        BOS, EOS included when it came, sequence log-probability, complete: ended with EOS)."""
        if not self.keys:
            return []
        logits = mask_pad_bos(self.state.step(self.tokens), self.bos, self.eos, self.pad)
        tokens = logits.argmax(dim=-1)
        written = self.state.pos  # tokens so far per row, this one included
        self.ids[torch.arange(len(tokens), device=tokens.device), written - 1] = tokens
        self.logprob += logits.log_softmax(dim=-1).gather(1, tokens[:, None])[:, 0]
        ended = tokens == self.eos
        finished = ended | (written >= self.max_len)
        self.tokens = tokens
        if not bool(finished.any()):
            return []
        out = [(self.keys[r], self.ids[r, :int(written[r])].tolist(), float(self.logprob[r]),
                bool(ended[r])) for r in finished.nonzero()[:, 0].tolist()]
        self._keep((~finished).nonzero()[:, 0])
        return out

    def drop(self, keys) -> None:
        """Remove the rows of `keys` (requests nobody waits for any more)."""
        gone = set(keys)
        keep = [r for r, key in enumerate(self.keys) if key not in gone]
        if len(keep) < len(self.keys):
            self._keep(torch.tensor(keep, dtype=torch.long, device=self.tokens.device))

    def _keep(self, rows: torch.Tensor) -> None:
        self.keys = [self.keys[r] for r in rows.tolist()]
        self.state.select(rows)  # no rows left: the next join starts the caches afresh
        self.tokens, self.ids, self.logprob = self.tokens[rows], self.ids[rows], self.logprob[rows]
