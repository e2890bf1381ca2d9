"""Probability maps from Sa2VA models that return only thresholded masks, without editing their code.

Upstream Sa2VA's ``predict_forward`` (bytedance/Sa2VA ``projects/sa2va/hf/models/modeling_sa2va_chat.py``) computes,
for each ``[SEG]``, fp32 mask logits at SAM2's 1024² with ``grounding_encoder.language_embd_inference(...)`` (shape
``(frames, 1, 1024, 1024)``), resizes them with ``F.interpolate(..., size=(h, w), mode='bilinear',
align_corners=False)`` to the size of the image (or of ``video[0]``), and returns only ``sigmoid(...) > 0.5``. The
soft map the users' threshold sweep needs is thrown away.

:class:`LogitCapture` wraps that one method on the model's own ``grounding_encoder`` *instance* for the duration of
a call (an instance attribute shadowing the class's method; removed on exit, also after an exception, exactly like
the CPU shim in :mod:`vesselnb.device`) and keeps what it returns. :func:`maps_from_logits` then repeats upstream's
resize on the same tensors on the same device, and keeps a map only when ``map > 0.5`` reproduces every returned mask
bit for bit. A model whose code has another shape (no such method, a call count or a tensor shape that does not match
the masks, or masks the captured logits do not reproduce) gets no map, with the reason: never a guessed one.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CAPTURED_METHOD = "language_embd_inference"
SOURCE_RETURNED = "returned by predict_forward (vessel-fork signature)"
SOURCE_CAPTURED = "captured: grounding_encoder.language_embd_inference logits, resized as upstream"


class CaptureMismatch(Exception):
    """The captured logits do not correspond to the returned masks; the sample gets no map (reason in the text)."""


@dataclass(frozen=True)
class ProbabilitySupport:
    """Whether probability maps can be had from this model, and how (``source``: returned or captured)."""

    available: bool
    call_kwargs: dict[str, Any]
    reason: str
    source: str | None = None

    @property
    def captured(self) -> bool:
        """True when the maps come from :class:`LogitCapture` (upstream-shaped code)."""
        return self.source == SOURCE_CAPTURED


def _predict_source(model: Any) -> str:
    try:
        return inspect.getsource(type(model).predict_forward)
    except (OSError, TypeError, AttributeError):
        return ""


def probability_support(model: Any) -> ProbabilitySupport:
    """How this model's probability maps can be obtained, read from its code.

    * ``predict_forward(..., return_tensors=...)`` (the vessel fork qimingfan10/RLSa2va): it returns
      ``probability_maps`` (sigmoid of the logits before the 0.5 threshold) itself; nothing to pass;
    * upstream's shape — ``grounding_encoder.language_embd_inference`` exists and ``predict_forward`` calls it and
      resizes bilinearly: the logits are captured (:class:`LogitCapture`);
    * anything else: no maps, and the reason says what was not recognised.
    """
    try:
        params = inspect.signature(model.predict_forward).parameters
    except (TypeError, ValueError, AttributeError):
        params = {}
    if "return_tensors" in params:
        return ProbabilitySupport(True, {}, "predict_forward returns probability_maps (vessel-fork signature)",
                                  SOURCE_RETURNED)
    encoder = getattr(model, "grounding_encoder", None)
    if not callable(getattr(encoder, CAPTURED_METHOD, None)):
        return ProbabilitySupport(False, {}, "this model's code has no grounding_encoder.language_embd_inference "
                                  "(not upstream Sa2VA's shape): only its thresholded masks are stored, no maps")
    source = _predict_source(model)
    if CAPTURED_METHOD not in source or "bilinear" not in source:
        return ProbabilitySupport(False, {}, "this model's predict_forward does not resize language_embd_inference's "
                                  "logits bilinearly as upstream Sa2VA does: capture not recognised, no maps")
    return ProbabilitySupport(True, {}, "mask logits captured from grounding_encoder.language_embd_inference and "
                              "resized as upstream (maps checked: > 0.5 reproduces the returned masks)",
                              SOURCE_CAPTURED)


class LogitCapture:
    """Keeps what ``model.grounding_encoder.language_embd_inference`` returns while :meth:`active`."""

    def __init__(self, model: Any) -> None:
        self.encoder = model.grounding_encoder
        self.logits: list[Any] = []

    @contextlib.contextmanager
    def active(self) -> Iterator[list[Any]]:
        """Wrap the method on the instance for the block; always restored (the class is never touched)."""
        encoder = self.encoder
        shadowed = CAPTURED_METHOD in vars(encoder)
        previous = vars(encoder).get(CAPTURED_METHOD)
        original = getattr(encoder, CAPTURED_METHOD)
        logits = self.logits = []

        def capturing(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            logits.append(out)
            return out

        setattr(encoder, CAPTURED_METHOD, capturing)
        try:
            yield logits
        finally:
            if shadowed:
                setattr(encoder, CAPTURED_METHOD, previous)
            else:
                delattr(encoder, CAPTURED_METHOD)


def maps_from_logits(logits: list[Any], masks: list[Any]) -> list[np.ndarray]:
    """Upstream's resize + sigmoid on each captured ``(T, 1, h', w')`` logit stack, at its returned mask's size.

    Same op, same input, same device as upstream's own line, so the result is the map upstream thresholded; it is
    kept only if ``map > 0.5`` equals the returned mask exactly (:class:`CaptureMismatch` otherwise).
    """
    if len(logits) != len(masks):
        raise CaptureMismatch(f"{len(logits)} captured logit stacks for {len(masks)} returned masks")
    maps = []
    for index, (stack, mask) in enumerate(zip(logits, masks, strict=True)):
        expected = np.asarray(mask)
        if not isinstance(stack, torch.Tensor) or stack.ndim != 4 or stack.shape[1] != 1 or expected.ndim != 3 \
                or stack.shape[0] != expected.shape[0]:
            shape = tuple(stack.shape) if isinstance(stack, torch.Tensor) else type(stack).__name__
            raise CaptureMismatch(f"captured logits {shape} do not match returned mask {expected.shape} (expected "
                                  "(frames, 1, h, w) logits for a (frames, H, W) mask)")
        resized = F.interpolate(stack.detach(), size=tuple(expected.shape[1:]), mode="bilinear",
                                align_corners=False)[:, 0]
        probability = resized.sigmoid()
        if not np.array_equal((probability > 0.5).cpu().numpy(), expected.astype(bool, copy=False)):
            raise CaptureMismatch(f"captured logits of [SEG] {index} thresholded at 0.5 differ from the returned mask")
        maps.append(probability.float().cpu().numpy())
    return maps


def quantise_consistent(probability: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``rint(p · 255)`` as uint8, with ``value > 127.5`` ⇔ ``mask`` guaranteed.

    ``rint`` alone sends p = 0.5 exactly (a zero logit) to 128 although upstream's ``> 0.5`` says False; only such
    pixels (and, after a resize to another frame size, pixels where nearest and bilinear disagree) move, by the
    least needed, so that the stored map thresholded at 0.5 is the stored mask, bit for bit.
    """
    scaled = np.clip(probability, 0.0, 1.0)  # a new array: the model's output is never modified in place
    scaled *= 255.0
    values = np.rint(scaled, out=scaled).astype(np.uint8)
    return np.where(mask, np.maximum(values, 128), np.minimum(values, 127)).astype(np.uint8)
