"""Stopping a running decode from outside it. The decoding loops (models/generate.py, and the
onnxruntime loop in onnx_model.py) take `should_stop: Callable[[], bool] | None` and ask it once
per step; when it says True they raise DecodeCancelled, so a caller that has given up (the
service's time limit, pix2tex/serve.py) gets its thread back within one step instead of after
max_len of them. Imports nothing, so the ONNX backend runs without torch."""


class DecodeCancelled(Exception):
    """A decode stopped by its `should_stop` before it finished: there is no result."""


def stop_if_asked(should_stop) -> None:
    """Raise DecodeCancelled when `should_stop()` is True (None: never)."""
    if should_stop is not None and should_stop():
        raise DecodeCancelled("decoding stopped: should_stop() returned True")
