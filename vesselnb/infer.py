"""Stage 02: run an HF Sa2VA folder over the frames and fill the prediction store — and never fake a result.

The users' three failures shaped this module:

* they called the training ``forward()``: here only ``predict_forward(image=..., text=..., tokenizer=...)`` is ever
  called, and a folder whose model has none is refused at load time;
* a prompt without ``<image>`` crashed deep inside (``assert selected.sum() != 0``): :func:`prepare_prompt` adds it
  with a warning, or refuses in strict mode, before the model is even loaded;
* a multi-GPU script silently fell back to ground truth plus noise: this stage never opens ground truth, and a
  sample that fails is stored as ``error`` (exception kept, run continues) and one without ``[SEG]`` as ``no_seg``,
  both counted and shown in a red banner — there is no fallback path at all.

Data-parallel scale-out is ``accelerate launch -m vesselnb.cli infer ...`` (one process per GPU): each process takes
shard ``RANK`` of ``WORLD_SIZE``, writes its own store part, and the last one to finish merges the parts (or run
``vesselnb merge-predictions``). ``--shard k/n`` does the same by hand on any machine.

Test hook (documented so tests can kill a run at a known point): the environment variable
``VESSELNB_TEST_SAMPLE_DELAY`` (seconds, default 0) makes the loop sleep after storing each sample.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vesselnb import doctor, store_writer
from vesselnb import htmlrepr as hr
from vesselnb.data import Sample, list_samples
from vesselnb.device import (
    DevicePlan,
    available_ram,
    code_assumes_cuda,
    distributed_context,
    maybe_cuda_shim,
    plan_device,
)
from vesselnb.errors import InferenceError, StoreError
from vesselnb.fingerprint import config_fingerprint
from vesselnb.frames import frame_size, load_frame
from vesselnb.interrupts import check_stop, graceful_stop
from vesselnb.locks import hold_all
from vesselnb.mask_capture import (
    CaptureMismatch,
    LogitCapture,
    ProbabilitySupport,
    maps_from_logits,
    probability_support,
    quantise_consistent,
)
from vesselnb.masks import resize_mask
from vesselnb.params import DEFAULT_PROMPT, RunParams, load_params
from vesselnb.run_folder import PARTS_DIR, RunFolder
from vesselnb.store import (
    STATUSES,
    PredictionStore,
    all_parts_complete,
    check_compatible,
    merge_parts,
    open_quietly,
    part_name,
    read_store_meta,
)

IMAGE_TOKEN = "<image>"
SEG_TOKEN = "[SEG]"
SAMPLE_DELAY_ENV = "VESSELNB_TEST_SAMPLE_DELAY"


class PromptWarning(UserWarning):
    """The prompt was changed to make it valid for Sa2VA."""


class FlashAttnWarning(UserWarning):
    """transformers' import check wanted flash_attn; loaded anyway (the code falls back to eager attention)."""


# --- prompt ---------------------------------------------------------------------------------------------------------
def prepare_prompt(prompt: str, strict: bool = False) -> tuple[str, str | None]:
    """Return ``(prompt to use, warning or None)``.

    Sa2VA replaces ``<image>`` with the image tokens; without it an image prompt dies in ``generate`` with a bare
    ``AssertionError``. The fix is to put ``<image>`` first, as in the default prompt; ``strict`` refuses instead.
    """
    if not prompt or not prompt.strip():
        raise InferenceError(f"the prompt is empty; set 'inference.prompt', e.g. {DEFAULT_PROMPT!r}")
    if IMAGE_TOKEN in prompt:
        return prompt, None
    if strict:
        raise InferenceError(
            f"prompt {prompt!r} has no '<image>' and strict_prompt is on; Sa2VA needs it to see the frame. "
            f"Use e.g. {DEFAULT_PROMPT!r}"
        )
    fixed = IMAGE_TOKEN + prompt
    message = f"prompt {prompt!r} has no '<image>' (Sa2VA would crash on it); using {fixed!r} instead"
    warnings.warn(message, PromptWarning, stacklevel=2)
    return fixed, message


# --- loading --------------------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model ready for ``predict_forward``, with its tokenizer and where/how it runs."""

    model: Any
    tokenizer: Any
    plan: DevicePlan
    hf_dir: Path
    probability: ProbabilitySupport
    load_seconds: float
    warnings: list[str] = field(default_factory=list)
    # "inference_mode" until a model shows it needs "no_grad" (see _grad_guard); sticky for the rest of the run.
    grad_guard: str = "inference_mode"

    def predict(self, probability: bool = False, **kwargs: Any) -> dict[str, Any]:
        """``model.predict_forward(**kwargs, tokenizer=...)`` with autograd off (and the CPU shim on the CPU).

        ``probability``: also return ``probability_maps`` (one float32 (T, H, W) stack per mask) — asked of the
        model when its signature offers them, else captured from its mask logits (:mod:`vesselnb.mask_capture`);
        when the capture cannot reproduce the masks the answer carries ``probability_error`` instead.

        Upstream Sa2VA decorates only ``generate`` with ``@torch.no_grad()``; its SAM2 path and ``text_hidden_fcs``
        run outside it, so an unguarded call keeps SAM2's whole graph (5x the memory of a no-grad call, measured on
        the upstream code). Every call is therefore made under ``torch.inference_mode()``; a model whose code keeps
        tensors across the mode boundary (torch then refuses with "Inference tensors ...") is retried once under
        ``torch.no_grad()``, which costs the same memory, and stays there.
        """
        capture = probability and self.probability.captured
        if probability:
            kwargs = {**self.probability.call_kwargs, **kwargs}
        try:
            return self._guarded_call(kwargs, capture)
        except RuntimeError as error:
            if self.grad_guard != "inference_mode" or "inference tensor" not in str(error).lower():
                raise
            self.grad_guard = "no_grad"
            self.warnings.append(f"model code is incompatible with torch.inference_mode() ({error}); using no_grad")
            return self._guarded_call(kwargs, capture)

    def _guarded_call(self, kwargs: dict[str, Any], capture: bool = False) -> dict[str, Any]:
        with maybe_cuda_shim(self.plan), _grad_guard(self.grad_guard):
            if not capture:
                return self.model.predict_forward(tokenizer=self.tokenizer, **kwargs)
            capturing = LogitCapture(self.model)
            with capturing.active() as logits:
                output = self.model.predict_forward(tokenizer=self.tokenizer, **kwargs)
            output = dict(output)
            masks = list(output.get("prediction_masks") or [])
            try:
                output["probability_maps"] = maps_from_logits(logits, masks) if masks else []
            except CaptureMismatch as exc:
                output["probability_error"] = f"no probability map: {exc}"
            return output


def _grad_guard(name: str) -> contextlib.AbstractContextManager[Any]:
    """The autograd guard every model call runs under: ``inference_mode`` or ``no_grad``."""
    return torch.inference_mode() if name == "inference_mode" else torch.no_grad()


@contextlib.contextmanager
def _import_check_without_flash_attn() -> Iterator[None]:
    """Make transformers' remote-code import check ignore ``flash_attn`` (restored on exit).

    The check reads import statements, not what runs; Sa2VA imports flash_attn only behind a runtime guard and falls
    back to eager attention, so a missing flash_attn is not a reason to refuse the folder.
    """
    import transformers.dynamic_module_utils as dmu

    original = dmu.get_imports

    def get_imports_without_flash_attn(filename: Any) -> list[str]:
        return [name for name in original(filename) if name != "flash_attn"]

    dmu.get_imports = get_imports_without_flash_attn
    try:
        yield
    finally:
        dmu.get_imports = original


def _from_pretrained(loader: Any, path: Path, notes: list[str], **kwargs: Any) -> Any:
    try:
        return loader(str(path), **kwargs)
    except ImportError as exc:
        if "flash_attn" not in str(exc):
            raise InferenceError(f"{path}: the model's remote code needs a package that is missing: {exc}") from None
    message = (f"{path}: transformers' import check asks for flash_attn, which is not installed; loading anyway — "
               "the remote code falls back to eager attention at run time (slower on GPU, identical results)")
    if message not in notes:
        warnings.warn(message, FlashAttnWarning, stacklevel=3)
        notes.append(message)
    with _import_check_without_flash_attn():
        return loader(str(path), **kwargs)


def _dtype_kwarg() -> str:
    """transformers ≥ 4.56 renamed ``torch_dtype`` to ``dtype`` (the old name warns)."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def load_model(
    hf_dir: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    max_memory_per_gpu: str | None = None,
) -> LoadedModel:
    """Load an HF Sa2VA folder with ``AutoModel.from_pretrained(trust_remote_code=True)`` and its tokenizer.

    bf16 on a GPU and fp32 on a CPU unless ``dtype`` says otherwise; ``device: auto|cpu|cuda`` (see
    :func:`vesselnb.device.plan_device`; under ``accelerate launch`` each process takes ``cuda:LOCAL_RANK``). The
    model is prepared for generation in that dtype, because upstream's ``predict_forward`` would otherwise cast
    pixels to bf16.
    """
    from transformers import AutoModel, AutoTokenizer

    folder = Path(hf_dir)
    if not (folder / "config.json").is_file():
        raise InferenceError(
            f"{folder}: not an HF model folder (config.json missing). Run stage 01 (notebook 01_convert) to convert "
            "the checkpoint, or set 'hf_model' to a converted Sa2VA folder."
        )
    doctor.check_files(folder)  # auto_map, remote code, every shard the index names: before minutes of loading
    plan = plan_device(device, dtype, max_memory_per_gpu, distributed_context())
    plan = dataclasses.replace(plan, code_assumes_cuda=code_assumes_cuda(folder))
    notes: list[str] = []
    if plan.is_cpu:
        notes.append("CPU shim for the code's CUDA calls: " + (
            "on (the remote code names CUDA)" if plan.code_assumes_cuda else "off (the remote code never names CUDA)"))
    started = time.perf_counter()
    kwargs: dict[str, Any] = {"trust_remote_code": True, _dtype_kwarg(): plan.dtype}
    if plan.device_map is not None:
        kwargs["device_map"] = plan.device_map
        if plan.max_memory:
            kwargs["max_memory"] = plan.max_memory
    try:
        tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, folder, notes, trust_remote_code=True)
        model, loading_info = _from_pretrained(AutoModel.from_pretrained, folder, notes, output_loading_info=True,
                                               **kwargs)
    except RuntimeError as exc:
        if "size mismatch" not in str(exc):
            raise
        raise InferenceError(doctor.size_mismatch_message(folder, exc)) from None
    except (OSError, ValueError, KeyError) as exc:
        raise InferenceError(f"{folder}: cannot load the model or tokenizer: {exc}") from None
    # transformers initialises absent weights and drops unknown ones with only a log line: both refuse here.
    doctor.refuse_loading_info(folder, loading_info)
    doctor.refuse_non_finite(folder, model)
    if plan.device_map is None:
        model = model.to(plan.device)
    model.eval()
    if not callable(getattr(model, "predict_forward", None)):
        raise InferenceError(
            f"{folder}: {type(model).__name__} has no predict_forward(); this is not a Sa2VA HF folder (its forward() "
            "is the training forward and cannot segment). Point 'hf_model' at the converted Sa2VA folder."
        )
    _prepare_for_generation(model, tokenizer, plan, notes)
    return LoadedModel(model, tokenizer, plan, folder, probability_support(model), time.perf_counter() - started, notes)


def _prepare_for_generation(model: Any, tokenizer: Any, plan: DevicePlan, notes: list[str]) -> None:
    """Call ``preparing_for_generation`` with our dtype first: its default (bf16) would cast fp32 CPU runs' pixels."""
    prepare = getattr(model, "preparing_for_generation", None)
    if prepare is None:
        return
    try:
        accepts_dtype = "torch_dtype" in inspect.signature(prepare).parameters
    except (TypeError, ValueError):
        accepts_dtype = False
    with maybe_cuda_shim(plan):
        if accepts_dtype:
            prepare(tokenizer, torch_dtype=plan.dtype)
        else:
            prepare(tokenizer)
            if plan.dtype_name != "bf16":
                notes.append("preparing_for_generation takes no torch_dtype; the model casts pixels to its default")


# --- one prediction -> one record -----------------------------------------------------------------------------------
@dataclass
class FrameResult:
    """What is stored for one sample."""

    record: dict[str, Any]
    mask: np.ndarray
    probability: np.ndarray | None


def _base_record(sample: Sample, height: int, width: int) -> dict[str, Any]:
    return {
        "sample_id": sample.sample_id, "image": sample.reference, "patient": sample.patient,
        "sequence": sample.sequence, "frame": sample.frame, "status": "error", "text": "", "n_seg": 0,
        "seconds": 0.0, "error": None, "height": height, "width": width, "mask_resized_from": None,
        "has_probability": False,
    }  # fmt: skip


def describe_exception(exc: BaseException) -> str:
    """``Type: message (at file:line in function)`` — enough to find the failing line without the full traceback."""
    text = f"{type(exc).__name__}: {exc}".strip()
    frames = traceback.extract_tb(exc.__traceback__)
    if frames:
        last = frames[-1]
        text += f" (at {Path(last.filename).name}:{last.lineno} in {last.name})"
    return text


def file_signature(path: Path) -> list[int] | None:
    """``[size, mtime_ns]`` of a frame's file, kept in its ``error`` record so a rerun can tell it was fixed."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def errors_to_retry(store: PredictionStore, samples: Sequence[Sample], retry_all: bool = False) -> set[str]:
    """Ids of ``error`` records to predict again: those whose file changed since (size or mtime differ, or the file
    appeared), or all of them with ``retry_all`` (``--retry-errors``; also for records written before vesselnb kept
    the file's signature)."""
    by_id = {s.sample_id: s for s in samples}
    retry = set()
    for sample_id in store.sample_ids():
        if sample_id not in by_id:
            continue
        record = store.record(sample_id)
        if record.get("status") != "error":
            continue
        changed = "image_stat" in record and record["image_stat"] != file_signature(by_id[sample_id].image_path)
        if retry_all or changed:
            retry.add(sample_id)
    return retry


def error_result(sample: Sample, message: str, seconds: float = 0.0) -> FrameResult:
    """An ``error`` record with an all-zero mask at the frame's size (0x0 if the file is unreadable)."""
    height, width = frame_size(sample.reference)
    record = dict(_base_record(sample, height, width), status="error", error=message, seconds=seconds,
                  image_stat=file_signature(sample.image_path))
    return FrameResult(record, np.zeros((height, width), dtype=bool), None)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy() if value.dtype.is_floating_point else value.cpu().numpy()
    return np.asarray(value)


def _frame_of(stack: Any, index: int) -> np.ndarray:
    """Frame ``index`` of a (T, H, W) mask/probability stack (a bare (H, W) counts as T=1)."""
    array = _to_numpy(stack)
    if array.ndim == 2:
        return array
    if array.ndim == 3:
        return array[index]
    raise InferenceError(f"predict_forward returned a mask of shape {array.shape}; expected (frames, H, W)")


def _resize_probability(prob: np.ndarray, height: int, width: int) -> np.ndarray:
    image = Image.fromarray(prob.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR)
    return np.asarray(image)


def interpret_output(
    output: dict[str, Any], sample: Sample, frame_index: int, height: int, width: int, seconds: float,
    want_probability: bool, map_source: str | None = None,
) -> FrameResult:
    """Turn one ``predict_forward`` answer into a record: ``ok`` / ``no_seg``, OR-ed masks, resize if needed.

    Several ``[SEG]`` masks are OR-ed (as the official referring-segmentation eval does; their probability maps
    combine by maximum, which thresholds to the same union). No ``[SEG]`` in the text, or no mask returned, is
    ``no_seg`` with an empty mask — never a substitute. The stored map is quantised so that it thresholds at 0.5
    to the stored mask exactly (:func:`vesselnb.mask_capture.quantise_consistent`); ``probability_source`` in the
    record says where the map came from, or why there is none.
    """
    text = str(output.get("prediction", ""))
    masks = list(output.get("prediction_masks") or [])
    record = dict(_base_record(sample, height, width), text=text, n_seg=len(masks), seconds=seconds)
    if SEG_TOKEN not in text or not masks:
        record["status"] = "no_seg"
        return FrameResult(record, np.zeros((height, width), dtype=bool), None)
    frame_masks = [_frame_of(m, frame_index).astype(bool, copy=False) for m in masks]
    combined = frame_masks[0] if len(frame_masks) == 1 else np.logical_or.reduce(frame_masks)
    if combined.shape != (height, width):
        record["mask_resized_from"] = [int(combined.shape[0]), int(combined.shape[1])]
        combined = resize_mask(combined, (height, width))
    probability = None
    maps = output.get("probability_maps") if want_probability else None
    if maps:
        frame_maps = [_frame_of(p, frame_index).astype(np.float32, copy=False) for p in maps]
        prob = frame_maps[0] if len(frame_maps) == 1 else np.maximum.reduce(frame_maps)
        if prob.shape != (height, width):
            prob = _resize_probability(prob, height, width)
        probability = quantise_consistent(prob, combined)
        record["probability_source"] = map_source or "returned by predict_forward"
    elif want_probability:
        record["probability_source"] = "none: " + str(output.get("probability_error") or "the model returned no map")
    record["status"] = "ok"
    return FrameResult(record, combined, probability)


@dataclass
class DecodedFrame:
    """A sample's frame decoded ahead of its model call, or why it could not be (that sample's error)."""

    sample: Sample
    image: Image.Image | None
    error: str | None = None
    windowing: str | None = None  # how its pixels were brought to 8 bit (vesselnb.frames.load_frame)


def decode_frames(samples: Sequence[Sample], windowing: str = "auto") -> list[DecodedFrame]:
    """Decode the frames of one model call; a file that cannot be read carries its error instead of raising."""
    decoded = []
    for sample in samples:
        try:
            frame = load_frame(sample.reference, windowing)
            decoded.append(DecodedFrame(sample, frame.image, windowing=frame.windowing))
        except Exception as exc:  # noqa: BLE001 - a bad file is this sample's error, not the run's
            decoded.append(
                DecodedFrame(sample, None, f"cannot read image {sample.reference}: {describe_exception(exc)}")
            )
    return decoded


def predict_image(
    loaded: LoadedModel, sample: Sample, prompt: str, want_probability: bool, frame: DecodedFrame | None = None
) -> FrameResult:
    """One frame in image mode (``frame``: already decoded, else read now); any failure becomes an ``error``
    record (the run goes on)."""
    frame = frame if frame is not None else decode_frames([sample])[0]
    if frame.image is None:
        return error_result(sample, str(frame.error))
    image = frame.image
    started = time.perf_counter()
    try:
        output = loaded.predict(image=image, text=prompt, probability=want_probability)
        seconds = time.perf_counter() - started
        result = interpret_output(output, sample, 0, image.height, image.width, seconds, want_probability,
                                  loaded.probability.source)
        result.record["windowing"] = frame.windowing
        return result
    except Exception as exc:  # noqa: BLE001 - recorded as status "error" with its text; counted and shown
        return error_result(sample, describe_exception(exc), time.perf_counter() - started)


UPSTREAM_LLM_FRAMES = 5  # upstream predict_forward: `if frame_idx < 5` -> only these frames reach the LLM
# Memory model of one video call: peak ≈ fixed + per-frame cost × frames. Measured on upstream bytedance/Sa2VA
# 9832e1a remote code (tiny random LLM/ViT + the full SAM2 Hiera-L), fp32 on a CPU, a bare no-grad
# predict_forward(video=[...]) per fresh process, peak RSS in MiB (`bench/bench_infer.py --side-by-side
# --window-sweep`): 1 frame 1757; 2 frames 2093; 4 frames 2148, 2228, 2276; 8 frames 2336; 16 frames 2557. Least
# squares over 2-16 frames: 2079 MiB + 30.6 MiB per frame (residuals within ±75 MiB: RSS noise). From two frames on
# SAM2 adds memory attention, a fixed step of ~350 MiB over the line at one frame. The per-frame part is small
# because SAM2 encodes one frame at a time (it keeps only the current frame's features) and keeps per frame the
# 1024² input, the 1024² fp32 logits and a small memory entry; the language model sees at most 5 frames. In bf16
# (a GPU) the per-frame cost is taken as half (not measured: no GPU here).
VIDEO_FRAME_BYTES_FP32 = 32 * 2**20
# The default window is the most frames whose per-frame memory in bf16 fits VIDEO_WINDOW_BUDGET_BYTES (2 GiB): what
# stays free, with a margin of about as much again, on the users' smallest card (24 GB) beside an 8B model's bf16
# weights (16.4 GB), CUDA's context and the single-call fixed part. That is 128 frames: the users' sequences of
# dozens of frames go to SAM2 whole, as upstream's own video calls do. On a CPU in fp32 the same window costs twice
# that. A constant, not measured per machine, so that a run's windows (and so its masks) do not depend on it.
VIDEO_WINDOW_BUDGET_BYTES = 2 * 2**30
VIDEO_PLAN_TOLERANCE = 1.10  # a window's peak above 1.1x its plan is reported (allocator and RSS noise stay below)


def video_frame_bytes(dtype: torch.dtype) -> int:
    """The memory model's cost of one more frame in a video call, for the model's dtype."""
    return VIDEO_FRAME_BYTES_FP32 if dtype == torch.float32 else VIDEO_FRAME_BYTES_FP32 // 2


def window_for_budget(budget_bytes: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """The most frames per video call whose per-frame memory (the memory model's) fits ``budget_bytes``; at least 1."""
    return max(1, budget_bytes // video_frame_bytes(dtype))


DEFAULT_VIDEO_WINDOW = window_for_budget(VIDEO_WINDOW_BUDGET_BYTES)


def _free_memory_bytes(plan: DevicePlan) -> int | None:
    """Memory free for activations now (after the model is loaded): the GPU's free bytes, or the kernel's
    MemAvailable on a CPU; None when it cannot be read."""
    if not plan.is_cpu and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(torch.device(plan.device))[0])
    return available_ram()


def video_window_note(plan: DevicePlan, window: int, free_bytes: int | None) -> str | None:
    """A warning when the memory model's cost of ``window`` frames does not fit the memory free after loading."""
    need = window * video_frame_bytes(plan.dtype)
    if free_bytes is None or need <= free_bytes:
        return None
    fits = free_bytes // video_frame_bytes(plan.dtype)
    return (f"inference.video_window {window}: the memory model plans {need / 2**30:.1f} GiB for a window's frames "
            f"({plan.dtype_name}) but {free_bytes / 2**30:.1f} GiB is free on {plan.device} after loading the model; "
            f"set inference.video_window to at most {max(fits, 1)} if a window runs out of memory")


@dataclass(frozen=True)
class VideoWindow:
    """One ``video=[...]`` call: frames ``first..last`` (inclusive) of a sequence; ``owned`` = the ids whose stored
    result comes from this window (in an overlap, the window whose centre is nearer; ties go to the earlier one)."""

    samples: tuple[Sample, ...]
    owned: frozenset[str]
    first: int
    last: int


def window_bounds(n_frames: int, window: int, overlap: int = 0) -> list[tuple[int, int]]:
    """``[(first, last), ...]`` covering ``0..n_frames-1``: ``window`` frames each, consecutive windows sharing
    ``overlap``; the last window ends at the last frame (it is shifted back rather than cut short).

    >>> window_bounds(10, 4, 1)
    [(0, 3), (3, 6), (6, 9)]
    >>> window_bounds(5, 8)
    [(0, 4)]
    """
    if window < 1 or not 0 <= overlap < window:
        raise InferenceError(f"video_window {window} / video_overlap {overlap}: need window >= 1 and "
                             "0 <= overlap < window (set 'inference.video_window' / 'inference.video_overlap')")
    if n_frames <= window:
        return [(0, n_frames - 1)] if n_frames else []
    step = window - overlap
    bounds = []
    start = 0
    while True:
        if start + window >= n_frames:
            bounds.append((n_frames - window, n_frames - 1))
            break
        bounds.append((start, start + window - 1))
        start += step
    return bounds


def video_windows(sequence: Sequence[Sample], window: int, overlap: int = 0) -> list[VideoWindow]:
    """A sequence's windows and which window each frame's stored result comes from (deterministic stitching)."""
    bounds = window_bounds(len(sequence), window, overlap)
    owner = []
    for index in range(len(sequence)):
        covering = [k for k, (a, b) in enumerate(bounds) if a <= index <= b]
        owner.append(min(covering, key=lambda k: (abs(index - (bounds[k][0] + bounds[k][1]) / 2), k)))
    return [VideoWindow(tuple(sequence[a:b + 1]),
                        frozenset(sequence[i].sample_id for i in range(a, b + 1) if owner[i] == k), a, b)
            for k, (a, b) in enumerate(bounds)]


def _reset_peak_memory(plan: DevicePlan) -> None:
    """Start a new high-water mark: CUDA's allocator statistics, or the kernel's peak RSS (``clear_refs`` 5)."""
    if not plan.is_cpu and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(torch.device(plan.device))
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_memory_mb(plan: DevicePlan) -> float | None:
    """Peak since :func:`_reset_peak_memory`: CUDA allocated bytes, else this process's VmHWM (Linux); None if
    neither can be read."""
    if not plan.is_cpu and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(torch.device(plan.device)) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def predict_sequence(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    prompt: str,
    want_probability: bool,
    decoded: list[DecodedFrame] | None = None,
    window: VideoWindow | None = None,
) -> list[FrameResult]:
    """Frames of one window (default: all of ``samples``) as one ``video=[frames]`` call; unreadable frames are
    dropped from it as errors. Each record says whether the language model saw its frame (upstream shows it only
    the first five of a call) and the window it came from."""
    decoded = decoded if decoded is not None else decode_frames(samples)
    results = {d.sample.sample_id: error_result(d.sample, str(d.error)) for d in decoded if d.image is None}
    frames = [(d.sample, d.image, d.windowing) for d in decoded if d.image is not None]
    started = time.perf_counter()
    if frames:
        try:
            output = loaded.predict(video=[image for _, image, _ in frames], text=prompt,
                                    probability=want_probability)
            share = (time.perf_counter() - started) / len(frames)
            for index, (sample, image, windowing) in enumerate(frames):
                result = interpret_output(output, sample, index, image.height, image.width, share, want_probability,
                                          loaded.probability.source)
                result.record.update(windowing=windowing, llm_saw_frame=index < UPSTREAM_LLM_FRAMES)
                results[sample.sample_id] = result
        except Exception as exc:  # noqa: BLE001
            share = (time.perf_counter() - started) / len(frames)
            message = f"sequence call failed: {describe_exception(exc)}"
            for sample, _, _ in frames:
                results[sample.sample_id] = error_result(sample, message, share)
    if window is not None:
        for result in results.values():
            result.record["video_window"] = [window.first, window.last]
    return [results[s.sample_id] for s in samples]


# --- the loop -------------------------------------------------------------------------------------------------------
def work_units(samples: Sequence[Sample], mode: str) -> list[list[Sample]]:
    """What one model call covers: a frame (image mode) or a whole sequence (video mode), in sample order."""
    if mode == "image":
        return [[s] for s in samples]
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.video_key, []).append(sample)
    return list(groups.values())


def select_shard(units: list[list[Sample]], shard: tuple[int, int] | None) -> list[list[Sample]]:
    """Shard ``k`` of ``n`` takes every n-th unit from k: balanced, deterministic, sequences never split."""
    if shard is None:
        return units
    k, n = shard
    if n < 1 or not 0 <= k < n:
        raise InferenceError(f"shard {k}/{n} is invalid: use k/n with 0 <= k < n (e.g. --shard 0/2 and --shard 1/2)")
    return units[k::n]


def parse_shard(text: str) -> tuple[int, int]:
    """``"k/n"`` → ``(k, n)``; k counts from 0 like accelerate's RANK."""
    try:
        k_text, n_text = text.split("/")
        shard = int(k_text), int(n_text)
    except ValueError:
        raise InferenceError(f"--shard {text!r}: expected k/n such as 0/2") from None
    select_shard([], shard)
    return shard


@dataclass
class LoopStats:
    """Timing of one pass of :func:`run_inference`."""

    n_done_before: int = 0
    n_run: int = 0
    wall_seconds: float = 0.0
    model_seconds: float = 0.0
    n_retried: int = 0  # error records predicted again (their file changed, or --retry-errors)
    missing_maps: dict[str, int] = field(default_factory=dict)  # reason -> samples stored "ok" without a map
    # video mode: one row per window run: sequence, first, last, frames, llm_frames, peak_mb, planned_mb
    windows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def notes(self) -> list[str]:
        """What the summary must say about this pass beyond the counts."""
        return [f"{n} ok sample(s) stored with no probability map — {reason}"
                for reason, n in sorted(self.missing_maps.items())]


def _units(samples: Sequence[Sample], mode: str, done: set[str], video_window: int,
           video_overlap: int) -> list[VideoWindow]:
    """The model calls still to make: one per frame (image mode), one per window of a sequence (video mode) —
    windows are cut from the whole sequence, so a resumed run makes the same calls and stitches the same way."""
    if mode == "image":
        units = [VideoWindow((s,), frozenset({s.sample_id}), 0, 0) for s in samples]
    else:
        units = [w for seq in work_units(samples, mode) for w in video_windows(seq, video_window, video_overlap)]
    return [unit for unit in units if unit.owned - done]


def run_inference(
    loaded: LoadedModel,
    samples: Sequence[Sample],
    store: PredictionStore,
    prompt: str,
    mode: str = "image",
    want_probability: bool = False,
    already_done: set[str] | None = None,
    progress: bool = True,
    windowing: str = "auto",
    video_window: int = DEFAULT_VIDEO_WINDOW,
    video_overlap: int = 0,
) -> LoopStats:
    """Predict every sample not yet stored and write each one as soon as it is done (resumable at any point).

    Video mode calls the model once per window of ``video_window`` frames (``video_overlap`` shared with the next)
    and reports each window's peak memory next to the memory model's plan: the first window's measured peak plus
    :func:`video_frame_bytes` per extra frame (the first window calibrates, so it has no plan of its own); a later
    window above it means memory grows across windows or frames cost more than the model says. A one-frame window
    is no base for longer ones (from two frames on SAM2 adds memory attention, a fixed step of ~350 MiB measured on
    the upstream code): the first longer window calibrates again."""
    from tqdm import tqdm

    done = set(already_done if already_done is not None else store.sample_ids())
    units = _units(samples, mode, done, video_window, video_overlap)
    stats = LoopStats(n_done_before=sum(1 for s in samples if s.sample_id in done))
    delay = float(os.environ.get(SAMPLE_DELAY_ENV, "0") or 0)
    todo = sum(len(unit.owned - done) for unit in units)
    per_frame_mb = video_frame_bytes(loaded.plan.dtype) / 2**20
    started = time.perf_counter()
    with tqdm(total=todo, desc="predict_forward", unit="frame", disable=not progress, file=sys.stderr,
              dynamic_ncols=True, mininterval=0.5) as bar:
        if stats.n_done_before:
            bar.write(f"resuming: {stats.n_done_before} of {len(samples)} samples already stored")
        # Three workers overlap: a thread decodes the next unit's frames, this thread runs the model, and the store
        # writer (a separate process: see vesselnb.store_writer) encodes and writes the results.
        with store_writer.open_writer(store) as writer, \
                ThreadPoolExecutor(1, thread_name_prefix="vesselnb-read") as reader:
            upcoming = reader.submit(decode_frames, units[0].samples, windowing) if units else None
            calibration: tuple[float, int] | None = None  # (peak MB, frames) of the first window measured
            for index, unit in enumerate(units):
                # A stop request (Ctrl-C, SIGTERM) ends the loop here, between frames: everything so far is stored.
                check_stop(f"after {stats.n_run} of {todo} frames (all stored)")
                decoded = upcoming.result()
                upcoming = (reader.submit(decode_frames, units[index + 1].samples, windowing)
                            if index + 1 < len(units) else None)
                if mode == "image":
                    results = [predict_image(loaded, unit.samples[0], prompt, want_probability, decoded[0])]
                else:
                    _reset_peak_memory(loaded.plan)
                    results = predict_sequence(loaded, unit.samples, prompt, want_probability, decoded, unit)
                    peak = _peak_memory_mb(loaded.plan)
                    if calibration is not None and calibration[1] == 1 < len(unit.samples):
                        calibration = None  # one frame runs no memory attention: no base for longer windows
                    planned = None if calibration is None else \
                        calibration[0] + per_frame_mb * max(len(unit.samples) - calibration[1], 0)
                    if calibration is None and peak is not None:
                        calibration = (peak, len(unit.samples))
                    stats.windows.append({
                        "sequence": unit.samples[0].video_key, "first": unit.first, "last": unit.last,
                        "frames": len(unit.samples), "llm_frames": min(len(unit.samples), UPSTREAM_LLM_FRAMES),
                        "peak_mb": None if peak is None else round(peak, 1),
                        "planned_mb": None if planned is None else round(planned, 1),
                    })
                    results = [r for r in results if r.record["sample_id"] in unit.owned - done]
                for result in results:
                    source = str(result.record.get("probability_source") or "")
                    if result.record["status"] == "ok" and source.startswith("none: "):
                        reason = source[len("none: "):]
                        stats.missing_maps[reason] = stats.missing_maps.get(reason, 0) + 1
                    writer.put(result.record, result.mask, result.probability)
                    stats.model_seconds += float(result.record["seconds"])
                    stats.n_run += 1
                    if delay:
                        time.sleep(delay)
                bar.update(len(results))
    stats.wall_seconds = time.perf_counter() - started
    return stats


# --- the stage ------------------------------------------------------------------------------------------------------
# What each record status means to a reader of notebook 02 (and how stage 03 counts it).
STATUS_MEANINGS = {
    "ok": "the model emitted [SEG] and returned a mask",
    "no_seg": "no [SEG] / no mask: stored as an EMPTY mask and scored as one",
    "error": "the model raised: the exception is kept, the mask is EMPTY",
}


@dataclass
class InferenceSummary:
    """What notebook 02 shows: status counts, speed, and a red banner when anything errored or produced no mask."""

    store_path: Path
    records: Any  # pandas.DataFrame of this run's samples (contract columns)
    n_samples: int
    stats: LoopStats
    prompt: str
    prompt_warning: str | None
    device: str
    dtype: str
    mode: str
    probability_maps: bool
    probability_note: str
    fingerprint: str
    shard: tuple[int, int] | None = None
    merged: bool | None = None
    load_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def status_counts(self) -> dict[str, int]:
        """``{"ok", "no_seg", "error"}`` counts over this run's samples."""
        counts = dict.fromkeys(STATUSES, 0)
        for status in self.records["status"] if len(self.records) else []:
            counts[status] += 1
        return counts

    @property
    def frames_per_second(self) -> float:
        """Frames stored per wall-clock second in this pass (NaN when everything was already stored)."""
        if not self.stats.n_run or not self.stats.wall_seconds:
            return float("nan")
        return self.stats.n_run / self.stats.wall_seconds

    @property
    def has_problems(self) -> bool:
        """True when any sample errored or produced no mask."""
        counts = self.status_counts
        return bool(counts["error"] or counts["no_seg"])

    def status_table(self):  # -> pandas.DataFrame
        """Per status: frames, share of the run (%), median seconds per frame and what the status means."""
        import pandas as pd

        counts = self.status_counts
        total = max(sum(counts.values()), 1)
        seconds = self.records.groupby("status")["seconds"].median() if len(self.records) else {}
        return pd.DataFrame({
            "status": list(counts), "frames": list(counts.values()),
            "share (%)": [round(100 * v / total, 1) for v in counts.values()],
            "median time (s per frame)": [float(seconds[s]) if s in seconds else float("nan") for s in counts],
            "meaning": [STATUS_MEANINGS[s] for s in counts],
        })

    def status_html(self) -> str:
        """The status table (frames, share, time per frame, meaning): what the banner's counts stand for."""
        table = self.status_table()
        column = "median time (s per frame)"
        return hr.join(hr.table(table.assign(**{column: table[column].map(hr.number)})))

    def problems(self):  # -> pandas.DataFrame
        """The ``error`` and ``no_seg`` samples with the model's text and the error message."""
        frame = self.records
        columns = ["sample_id", "status", "error", "text", "seconds"]
        return frame[frame["status"] != "ok"][columns].reset_index(drop=True)

    def problems_html(self) -> str:
        """Every problem frame with its full id, or one line saying that no frame had one (never an empty table)."""
        problems = self.problems()
        if problems.empty:
            return hr.join(hr.muted(f"No frame had a problem: all {self.n_samples} frames produced a mask (ok)."))
        shown = problems.rename(columns={"sample_id": "frame (full id)", "text": "model's text",
                                         "seconds": "time (s)"}).fillna("")
        return hr.join(hr.muted(f"{len(problems)} of {self.n_samples} frames have an EMPTY mask, counted as such "
                                "in stage 03 (nothing is substituted):"),
                       f"<div style='overflow-wrap:anywhere'>{hr.table(shown, float_format='{:.3g}')}</div>")

    def probability_html(self) -> str:
        """How many frames have a probability map (and from where) and how each was brought to 8 bit, grouped."""
        frame = self.records
        if not len(frame):
            return hr.join(hr.muted("No frame is stored yet."))
        columns = {"status": "status", "has_probability": "probability map",
                   "probability_source": "where the map came from", "windowing": "windowing (how it became 8 bit)"}
        present = [c for c in columns if c in frame.columns]
        shown = frame[present].assign(**({"has_probability": frame["has_probability"].map(
            {True: "yes", False: "no"})} if "has_probability" in present else {}))
        grouped = (shown.fillna("not recorded").astype(str).value_counts(sort=False).rename("frames")
                   .reset_index().rename(columns=columns))
        groups = "1 group" if len(grouped) == 1 else f"{len(grouped)} groups"
        return hr.join(hr.muted(f"{len(frame)} frames in {groups}; each frame's record is "
                                "predictions/records/<sample id>.json."), hr.table(grouped))

    def example_ids(self, k: int = 4) -> list[str]:
        """A few samples to look at: problems first (they matter most), then evenly spread ``ok`` ones."""
        frame = self.records
        bad = list(frame[frame["status"] != "ok"]["sample_id"])[: k // 2]
        ok = list(frame[frame["status"] == "ok"]["sample_id"])
        step = max(len(ok) // max(k - len(bad), 1), 1)
        return bad + ok[::step][: k - len(bad)]

    @property
    def video_notes(self) -> list[str]:
        """Video mode's caveats: which frames the language model saw, and memory per window against the plan."""
        if self.mode != "video":
            return []
        lines = [f"video mode: upstream Sa2VA shows only the first {UPSTREAM_LLM_FRAMES} frames of each call to the "
                 "language model (all frames go to SAM2); each record's 'llm_saw_frame' says whether its frame was "
                 "among them, 'video_window' which window [first, last] it was predicted in"]
        windows = self.stats.windows
        peaks = [w["peak_mb"] for w in windows if w["peak_mb"] is not None]
        if peaks:
            over = [w for w in windows if w["peak_mb"] is not None and w["planned_mb"] is not None
                    and w["peak_mb"] > w["planned_mb"] * VIDEO_PLAN_TOLERANCE]
            lines.append(f"{len(windows)} window(s) run; peak memory per window {min(peaks):.0f}–{max(peaks):.0f} MB"
                         + (f"; {len(over)} above the memory model's plan (lower inference.video_window)" if over
                            else "; none above the memory model's plan (first window's peak + the per-frame cost)"))
        return lines

    def window_table(self):  # -> pandas.DataFrame
        """Video mode: one row per window run in this pass (frames, frames the LLM saw, peak vs planned MB)."""
        import pandas as pd

        columns = ["sequence", "first", "last", "frames", "llm_frames", "peak_mb", "planned_mb"]
        return pd.DataFrame(self.stats.windows, columns=columns)

    def video_html(self) -> str:
        """Video mode's caveats and its windows (memory in MB); one line in image mode, never an empty table."""
        if self.mode != "video":
            return hr.join(hr.muted("Image mode: one frame per call to the model, so no windows (this section "
                                    "applies to inference.mode: video)."))
        table = self.window_table().rename(columns={
            "first": "first frame", "last": "last frame", "llm_frames": "frames the LLM saw",
            "peak_mb": "peak memory (MB)", "planned_mb": "planned memory (MB)"})
        parts = [hr.notes(self.video_notes)]
        parts.append(hr.table(table, float_format="{:.0f}") if len(table) else
                     hr.muted("No window was run in this pass (every frame was already stored)."))
        return hr.join(*parts)

    def banner(self) -> str:
        """One line: the state of this run (what the CLI prints and the HTML shows in colour)."""
        counts = self.status_counts
        text = (f"{self.n_samples} samples: {counts['ok']} ok, {counts['no_seg']} no_seg (no [SEG] / no mask), "
                f"{counts['error']} error")
        if self.has_problems:
            return "ATTENTION: " + text + " — see problems(); these samples have EMPTY masks, not substitutes"
        return text

    def to_text(self) -> str:
        """Plain-text summary for the CLI."""
        lines = [self.banner(),
                 f"store: {self.store_path}  (fingerprint {self.fingerprint}, mode {self.mode})",
                 f"device {self.device}, dtype {self.dtype}; this pass: {self.stats.n_run} predicted "
                 f"({self.stats.n_retried} retried error records), {self.stats.n_done_before} already stored, "
                 + (f"{self.frames_per_second:.2f} frames/s" if self.stats.n_run else "nothing predicted in this pass"),
                 f"probability maps: {'stored' if self.probability_maps else 'not stored'} ({self.probability_note})"]
        if self.shard:
            lines.append(f"shard {self.shard[0]}/{self.shard[1]}: "
                         + ("parts merged into the store" if self.merged else
                            "part written; merge with `vesselnb merge-predictions` when all shards are done"))
        lines += [f"note: {n}" for n in ([self.prompt_warning] if self.prompt_warning else []) + self.notes
                  + self.video_notes]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """The banner (its title states the counts once) over the run's facts, each number with its unit."""
        speed = self.frames_per_second
        timing = (f"{speed:.3g} frames/s = {1 / speed:.3g} s per frame (wall clock, this pass); model load "
                  f"{self.load_seconds:.1f} s" if speed == speed else "nothing predicted in this pass")
        rows = [
            ("store", f"{self.store_path}"), ("weights fingerprint", self.fingerprint), ("prompt", self.prompt),
            ("mode", self.mode), ("device / dtype", f"{self.device} / {self.dtype}"),
            ("this pass", f"{self.stats.n_run} frames predicted ({self.stats.n_retried} of them retried error "
                          f"records), {self.stats.n_done_before} already stored (resumed)"),
            ("speed", timing),
            ("probability maps",
             ("stored" if self.probability_maps else "NOT available") + f" — {self.probability_note}"),
        ]
        if self.shard:
            rows.append(("shard", f"{self.shard[0]}/{self.shard[1]}, merged: {self.merged}"))
        notes = ([self.prompt_warning] if self.prompt_warning else []) + self.notes + self.video_notes
        return hr.join(
            hr.banner(self.banner(), level="error" if self.has_problems else "ok"),
            hr.table(rows), hr.notes(notes),
        )


def _resolve_shard(shard: tuple[int, int] | None) -> tuple[int, int] | None:
    dist = distributed_context()
    if shard is None and dist.active:
        return dist.rank, dist.world_size
    return shard


def infer_stage(params: RunParams, run_dir: str | Path, shard: tuple[int, int] | None = None,
                progress: bool = True, retry_errors: bool = False) -> InferenceSummary:
    """Stage 02: predict every frame of ``params.data.images`` into ``run_dir/predictions``; resumable.

    ``shard=(k, n)`` (or ``accelerate launch``'s RANK/WORLD_SIZE) runs one part; the last part to finish merges all.
    Stored ``error`` records are predicted again when their file changed, or all of them with ``retry_errors``.
    Ground truth (``params.data.annotations``) is never read here. The store is locked while this writes it (shards
    share it and each locks its own part), so a second writer is refused at once, naming this one.
    """
    run = RunFolder(run_dir)
    # Refusals that must leave no folder behind come before the lock (which creates the store's folder).
    if params.inference.strict_prompt:
        prepare_prompt(params.inference.prompt, strict=True)
    if not (run.hf_dir(params) / "config.json").is_file():
        raise InferenceError(f"{run.hf_dir(params)}: no HF model folder here; run stage 01 (convert) first or set "
                             "'hf_model'")
    with hold_all(run.store_locks(_resolve_shard(shard))):
        return _infer_stage(params, run_dir, shard, progress, retry_errors)


def _infer_stage(params: RunParams, run_dir: str | Path, shard: tuple[int, int] | None = None,
                 progress: bool = True, retry_errors: bool = False) -> InferenceSummary:
    run = RunFolder(run_dir)
    shard = _resolve_shard(shard)
    inf = params.inference
    prompt, prompt_warning = prepare_prompt(inf.prompt, inf.strict_prompt)
    hf_dir = run.hf_dir(params)
    if not (hf_dir / "config.json").is_file():
        raise InferenceError(f"{hf_dir}: no HF model folder here; run stage 01 (convert) first or set 'hf_model'")
    if params.data.images is None:
        raise InferenceError("params: 'data.images' is not set; point it at the folder of frames")
    samples = list_samples(params.data.images, params.data.image_glob, params.data.name_regex, params.data.limit)
    fingerprint = run.weights_fingerprint(params)
    model_config = config_fingerprint(hf_dir)
    predictions = run.predictions_dir
    meta = read_store_meta(predictions)
    if meta is not None:  # refuse a mismatch before spending minutes loading weights
        wanted = {"fingerprint": fingerprint, "model_config": model_config, "prompt": prompt, "mode": inf.mode,
                  "probability_maps": meta.get("probability_maps")}
        check_compatible(meta, wanted, where=str(predictions))

    units = select_shard(work_units(samples, inf.mode), shard)
    mine = [s for unit in units for s in unit]
    target = predictions / PARTS_DIR / part_name(shard) if shard is not None else predictions
    already: set[str] = set()
    retry: set[str] = set()
    for folder in {predictions, target}:
        if read_store_meta(folder) is not None:
            existing = open_quietly(folder)
            already |= set(existing.sample_ids())
            if folder == target:
                retry = errors_to_retry(existing, mine, retry_errors)
    already -= retry
    todo = [s for s in mine if s.sample_id not in already]
    video_window = inf.video_window or DEFAULT_VIDEO_WINDOW

    if not todo and (read_store_meta(target) or meta) is not None:
        # Everything is stored already: do not spend minutes loading weights to predict nothing.
        done_meta = read_store_meta(target) or meta or {}
        store = open_quietly(target) if read_store_meta(target) is not None else None
        stats = LoopStats(n_done_before=len(mine))
        want_probability = bool(done_meta.get("probability_maps"))
        device, dtype_name, load_seconds = "(not loaded)", str(done_meta.get("dtype", "?")), 0.0
        note = "as stored" if want_probability else "not stored in this store"
        notes = ["all samples were already stored; the model was not loaded"]
    else:
        store_writer.prestart()  # its ~0.15 s start-up overlaps the model load
        loaded = load_model(hf_dir, inf.device, inf.dtype, inf.max_memory_per_gpu)
        want_probability = bool(inf.probability_maps and loaded.probability.available)
        note = loaded.probability.reason if inf.probability_maps else "not requested (inference.probability_maps)"
        identity = {"fingerprint": fingerprint, "model_config": model_config, "model_dir": hf_dir, "prompt": prompt,
                    "mode": inf.mode, "probability_maps": want_probability,
                    "extra": {"dtype": loaded.plan.dtype_name, "prompt_given": inf.prompt,
                              "probability_source": loaded.probability.source if want_probability else None,
                              **({"video_window": video_window, "video_overlap": inf.video_overlap,
                                  "llm_frames_per_call": UPSTREAM_LLM_FRAMES} if inf.mode == "video" else {})}}
        if meta is not None:
            check_compatible(meta, identity, where=str(predictions))
        store = PredictionStore.create_or_open(target, **identity)
        window_note = video_window_note(loaded.plan, video_window, _free_memory_bytes(loaded.plan)) \
            if inf.mode == "video" else None
        if window_note:
            loaded.warnings.append(window_note)
        stats = run_inference(loaded, mine, store, prompt, inf.mode, want_probability, already, progress,
                              inf.windowing, video_window, inf.video_overlap)
        stats.n_retried = len(retry)
        device, dtype_name, load_seconds = loaded.plan.device, loaded.plan.dtype_name, loaded.load_seconds
        notes = list(loaded.warnings) + stats.notes
    merged = None
    if shard is not None:
        if store is not None and store.path == target:
            store.mark_part_complete(len(mine))
        merged = _merge_if_last(predictions, shard[1]) or not (predictions / PARTS_DIR).exists()
    final = open_quietly(predictions) if (shard is None or merged) else open_quietly(target)
    wanted_ids = {s.sample_id for s in (samples if final.path == predictions else mine)}
    frame = final.records_frame()
    frame = frame[frame["sample_id"].isin(wanted_ids)].reset_index(drop=True)
    return InferenceSummary(
        store_path=final.path, records=frame, n_samples=len(wanted_ids), stats=stats, prompt=prompt,
        prompt_warning=prompt_warning, device=device, dtype=dtype_name, mode=inf.mode,
        probability_maps=want_probability, probability_note=note, fingerprint=fingerprint, shard=shard,
        merged=merged, load_seconds=load_seconds, notes=notes,
    )


def _merge_if_last(predictions: Path, n_shards: int) -> bool:
    """Merge the parts when every shard has finished; False (and a hint) when others are still running."""
    if not all_parts_complete(predictions, n_shards):
        return False
    try:
        merge_parts(predictions)
    except StoreError as exc:
        if "merging shard parts right now" in str(exc):
            return False
        raise
    return not (predictions / PARTS_DIR).exists()


# --- CLI (registered by vesselnb.infer_cli, which imports this module only when the command runs) --------------
def _cli_infer(args: Any) -> int:
    params = load_params(args.params)
    if args.device:
        params.inference.device = args.device
    run_dir = args.run_dir or Path("outputs") / params.run_name
    shard = parse_shard(args.shard) if args.shard else None
    # Shards share the run folder (each locks its own part of the store); a `vesselnb run` on it is refused meanwhile.
    with graceful_stop("the current frame"), hold_all([RunFolder(run_dir).lock("shared")]):
        summary = infer_stage(params, run_dir, shard=shard, progress=not args.no_progress,
                              retry_errors=args.retry_errors)
    print(summary.to_text(), file=sys.stderr if summary.has_problems else sys.stdout)
    return 0
