"""Which special ids decoding may output: one rule for the torch decoders (models/generate.py) and
the onnxruntime loop (onnx_model.py). Imports nothing, so the ONNX backend runs without torch."""


def mask_pad_bos(logits, bos: int, eos: int, pad: int):
    """Set PAD's and BOS's logits [B, V] to -inf, in place, and return them: neither is ever a
    valid next token. An id that is also EOS keeps its logit (a row must still be able to end).
    Plain indexing, so it works alike on a torch tensor and a numpy array."""
    never = [t for t in (pad, bos) if t != eos]
    logits[:, never] = float("-inf")
    return logits
