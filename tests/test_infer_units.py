"""Inference pieces that need no model: the CUDA shim, device planning, prompt handling, sharding, output parsing."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from vesselnb.data import Sample
from vesselnb.device import (
    DistributedContext,
    code_assumes_cuda,
    cuda_shim,
    distributed_context,
    maybe_cuda_shim,
    plan_device,
)
from vesselnb.errors import InferenceError
from vesselnb.infer import (
    PromptWarning,
    interpret_output,
    parse_shard,
    prepare_prompt,
    select_shard,
    work_units,
)


# --- CUDA shim ------------------------------------------------------------------------------------------------------
def _originals() -> tuple:
    return torch.Tensor.cuda, torch.device, torch.autocast


def test_shim_runs_upstream_cuda_idioms_on_cpu_and_restores_everything() -> None:
    before = _originals()
    conv = torch.nn.Conv2d(3, 4, 3).to(torch.bfloat16)  # bf16 weights, as Sa2VA ships them
    frames = torch.randn(1, 3, 8, 8)  # float input, as SAM2's mask path gets it
    with cuda_shim():
        ids = torch.tensor([1, 2, 3]).cuda()  # (1) predict_forward's .cuda()
        assert ids.device.type == "cpu"
        assert torch.randn(2).cuda(0, non_blocking=True).device.type == "cpu"
        device = torch.device("cuda")  # (2) SAM2 init_state
        assert device.type == "cpu" and torch.device("cuda", 0).type == "cpu" and torch.device("cuda:1").type == "cpu"
        assert torch.device("cpu").type == "cpu" and torch.device("meta").type == "meta"
        assert isinstance(ids.device, torch.device)
        assert torch.zeros(2, device=device).device.type == "cpu"
        with torch.autocast("cuda", dtype=torch.bfloat16):  # (3) SAM2's autocast
            out = conv(frames)
        assert out.dtype == torch.bfloat16
    assert _originals() == before


def test_shim_for_fp32_weights_turns_cuda_autocast_off() -> None:
    """fp32 on a CPU (the default) must stay fp32: a CPU bf16 autocast would be slow and change the numbers."""
    conv = torch.nn.Conv2d(3, 4, 3)
    with cuda_shim(autocast_dtype=None), torch.autocast("cuda", dtype=torch.bfloat16):
        assert not torch.is_autocast_enabled("cpu")
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.float32
    with cuda_shim(), torch.autocast("cuda", torch.bfloat16):  # positional dtype, as some code writes it
        assert torch.is_autocast_enabled("cpu")


def test_without_the_shim_the_bf16_mask_path_fails_on_cpu() -> None:
    """Guards the test above: the failure the shim exists for really happens on this machine."""
    if torch.cuda.is_available():
        pytest.skip("needs a CPU-only machine")
    conv = torch.nn.Conv2d(3, 4, 3).to(torch.bfloat16)
    with pytest.warns(UserWarning), torch.autocast("cuda", dtype=torch.bfloat16), pytest.raises(RuntimeError):
        conv(torch.randn(1, 3, 8, 8))


def test_shim_restores_after_an_exception() -> None:
    before = _originals()
    with pytest.raises(ValueError), cuda_shim():
        raise ValueError("boom")
    assert _originals() == before
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(1).cuda()  # the real .cuda() is back


def test_shim_entered_only_for_code_that_names_cuda(tmp_path: Path) -> None:
    """The shim costs every torch.device call a Python detour, so a model whose code never names CUDA runs without
    it; a folder whose code does (upstream Sa2VA) gets all of it."""
    plain, upstream = tmp_path / "plain", tmp_path / "upstream"
    plain.mkdir(), upstream.mkdir()
    (plain / "modeling_x.py").write_text('"""Raises like a CUDA OOM would."""\nx = torch.zeros(1).to("cpu")\n')
    (upstream / "modeling_x.py").write_text("ids = torch.tensor(ids).cuda()\n")
    assert not code_assumes_cuda(plain) and code_assumes_cuda(upstream)
    for idiom in ('torch.device("cuda")', "torch.autocast('cuda', dtype=torch.bfloat16)", 'x.to(f"cuda:{rank}")'):
        (upstream / "modeling_x.py").write_text(idiom + "\n")
        assert code_assumes_cuda(upstream), idiom
    real_device = torch.device
    plan = plan_device("cpu")
    with maybe_cuda_shim(dataclasses.replace(plan, code_assumes_cuda=False)):
        assert torch.device is real_device
    with maybe_cuda_shim(dataclasses.replace(plan, code_assumes_cuda=True)):
        assert torch.device is not real_device and torch.device("cuda").type == "cpu"
    assert torch.device is real_device


# --- device planning ------------------------------------------------------------------------------------------------
def test_cpu_plan_defaults_to_fp32_and_honours_an_explicit_dtype() -> None:
    assert plan_device("cpu").dtype == torch.float32
    assert plan_device("cpu", "bf16").dtype == torch.bfloat16
    plan = plan_device("cpu")
    assert plan.is_cpu and plan.device_map is None and plan.dtype_name == "fp32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_requested_without_gpu_says_so() -> None:
    with pytest.raises(InferenceError, match="no CUDA GPU"):
        plan_device("cuda")
    assert plan_device("auto").device == "cpu"


def test_bad_device_or_dtype_is_a_clear_error() -> None:
    with pytest.raises(InferenceError, match="device"):
        plan_device("tpu")
    with pytest.raises(InferenceError, match="dtype"):
        plan_device("cpu", "int8")


def test_distributed_context_reads_launcher_variables() -> None:
    assert distributed_context({}) == DistributedContext(0, 1, 0)
    ctx = distributed_context({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert ctx.active and (ctx.rank, ctx.world_size, ctx.local_rank) == (3, 4, 1)
    with pytest.raises(InferenceError, match="accelerate launch"):
        distributed_context({"RANK": "x", "WORLD_SIZE": "2"})


# --- prompt ---------------------------------------------------------------------------------------------------------
def test_prompt_without_image_token_is_fixed_with_a_warning() -> None:
    with pytest.warns(PromptWarning, match="<image>"):
        prompt, message = prepare_prompt("Please segment the blood vessel.")
    assert prompt == "<image>Please segment the blood vessel." and message


def test_prompt_without_image_token_is_refused_in_strict_mode() -> None:
    with pytest.raises(InferenceError, match="strict"):
        prepare_prompt("Please segment the blood vessel.", strict=True)
    with pytest.raises(InferenceError, match="empty"):
        prepare_prompt("  ")
    assert prepare_prompt("<image>\nSegment.", strict=True) == ("<image>\nSegment.", None)


# --- sharding -------------------------------------------------------------------------------------------------------
def _samples() -> list[Sample]:
    return [Sample(f"P_1__s{seq}_frame_{f:06d}", Path(f"/x/{seq}{f}.jpg"), "P_1", f"s{seq}", f)
            for seq in range(3) for f in range(4)]


def test_shards_partition_the_work_and_keep_sequences_whole() -> None:
    samples = _samples()
    for mode in ("image", "video"):
        units = work_units(samples, mode)
        parts = [select_shard(units, (k, 2)) for k in range(2)]
        ids = [s.sample_id for part in parts for unit in part for s in unit]
        assert sorted(ids) == sorted(s.sample_id for s in samples) and len(ids) == len(set(ids))
    video_units = work_units(samples, "video")
    assert [len(u) for u in video_units] == [4, 4, 4]
    assert {s.sequence for s in video_units[1]} == {"s1"}


def test_shard_text_is_validated() -> None:
    assert parse_shard("1/2") == (1, 2)
    for bad in ("2/2", "1", "a/b", "-1/2"):
        with pytest.raises(InferenceError, match="shard"):
            parse_shard(bad)


# --- parsing predict_forward's answer ---------------------------------------------------------------------------
SAMPLE = Sample("s", Path("/x/s.jpg"), "P", "S", 0)


def test_several_seg_masks_are_or_ed_and_counted() -> None:
    first = np.zeros((1, 4, 6), bool)
    first[0, 0, 0] = True
    second = np.zeros((1, 4, 6), bool)
    second[0, 3, 5] = True
    result = interpret_output({"prediction": "[SEG] and [SEG]<|im_end|>", "prediction_masks": [first, second]},
                              SAMPLE, 0, 4, 6, 0.5, want_probability=False)
    assert result.record["status"] == "ok" and result.record["n_seg"] == 2
    assert result.mask.sum() == 2 and result.mask[0, 0] and result.mask[3, 5]
    assert result.record["mask_resized_from"] is None and result.probability is None


def test_no_seg_text_or_no_mask_is_no_seg_with_an_empty_mask() -> None:
    full = np.ones((1, 4, 6), bool)
    no_token = interpret_output({"prediction": "Sorry.", "prediction_masks": [full]}, SAMPLE, 0, 4, 6, 0.1, False)
    no_mask = interpret_output({"prediction": "[SEG]", "prediction_masks": []}, SAMPLE, 0, 4, 6, 0.1, False)
    for result in (no_token, no_mask):
        assert result.record["status"] == "no_seg" and not result.mask.any() and result.mask.shape == (4, 6)


def test_other_size_masks_are_resized_and_recorded_with_probabilities() -> None:
    mask = np.zeros((1, 2, 3), bool)
    mask[0, :, :1] = True
    prob = np.where(mask, 0.9, 0.1).astype(np.float32)
    result = interpret_output({"prediction": "[SEG]", "prediction_masks": [mask], "probability_maps": [prob]},
                              SAMPLE, 0, 4, 6, 0.1, want_probability=True)
    assert result.record["mask_resized_from"] == [2, 3]
    assert result.mask.shape == (4, 6) and result.mask[:, :2].all() and not result.mask[:, 2:].any()
    assert result.probability is not None and result.probability.dtype == np.uint8
    assert result.probability.shape == (4, 6)
    assert result.probability.max() == round(0.9 * 255) and result.probability.min() == round(0.1 * 255)


# --- probability-map support, read from predict_forward's signature ---------------------------------------------
class _Upstream:
    def predict_forward(self, image=None, video=None, text=None, past_text="", mask_prompts=None, tokenizer=None,
                        processor=None):
        return {}


class _VesselFork:
    def predict_forward(self, image=None, video=None, text=None, past_text="", mask_prompts=None, tokenizer=None,
                        processor=None, return_tensors=False):
        return {}


class _Encoder:
    def language_embd_inference(self, state, language_embd):
        return torch.zeros(1, 1, 4, 4)


class _UpstreamShaped(_Upstream):
    """Upstream's shape: predict_forward resizes grounding_encoder.language_embd_inference's logits bilinearly."""

    grounding_encoder = _Encoder()

    def predict_forward(self, image=None, video=None, text=None, past_text="", mask_prompts=None, tokenizer=None,
                        processor=None):
        logits = self.grounding_encoder.language_embd_inference(None, [None])
        masks = torch.nn.functional.interpolate(logits, size=(4, 6), mode="bilinear", align_corners=False)[:, 0]
        return {"prediction": "[SEG]", "prediction_masks": [(masks.sigmoid() > 0.5).numpy()]}


class _OtherShape(_Upstream):
    grounding_encoder = _Encoder()  # the method exists, but predict_forward never calls it


def test_probability_support_follows_the_code() -> None:
    from vesselnb.infer import probability_support

    upstream, fork, shaped, other = (probability_support(m()) for m in (_Upstream, _VesselFork, _UpstreamShaped,
                                                                         _OtherShape))
    assert not upstream.available and "no grounding_encoder.language_embd_inference" in upstream.reason
    assert fork.available and fork.call_kwargs == {} and not fork.captured  # the fork returns maps itself
    assert shaped.available and shaped.captured and shaped.call_kwargs == {}
    assert not other.available and "capture not recognised" in other.reason


def test_capture_is_scoped_and_keeps_only_maps_that_reproduce_the_masks() -> None:
    from vesselnb.mask_capture import CaptureMismatch, LogitCapture, maps_from_logits

    model = _UpstreamShaped()
    model.grounding_encoder = _Encoder()  # an instance of its own, as nn.Module children are
    capture = LogitCapture(model)
    with capture.active() as logits:
        out = model.predict_forward(image=object())
        assert "language_embd_inference" in vars(model.grounding_encoder)
    assert "language_embd_inference" not in vars(model.grounding_encoder)
    (stack,) = logits
    assert stack.shape == (1, 1, 4, 4)
    (prob,) = maps_from_logits(logits, out["prediction_masks"])
    assert prob.shape == (1, 4, 6) and np.all(prob == 0.5)  # zero logits: p = 0.5 exactly, mask False
    with pytest.raises(CaptureMismatch, match="differ from the returned mask"):
        maps_from_logits(logits, [np.ones((1, 4, 6), bool)])
    with pytest.raises(CaptureMismatch, match="2 captured logit stacks for 1"):
        maps_from_logits(logits * 2, out["prediction_masks"])
    with pytest.raises(CaptureMismatch, match="do not match returned mask"):
        maps_from_logits([torch.zeros(1, 4, 4)], out["prediction_masks"])
    with pytest.raises(ValueError), capture.active():
        raise ValueError("boom")
    assert "language_embd_inference" not in vars(model.grounding_encoder)


def test_quantised_maps_threshold_to_the_mask_even_at_exactly_one_half() -> None:
    from vesselnb.mask_capture import quantise_consistent

    prob = np.array([[0.5, 0.5000001, 0.4999, 0.9]], np.float32)
    mask = prob > 0.5
    stored = quantise_consistent(prob, mask)
    assert np.rint(0.5 * 255) == 128  # plain rounding would say "vessel" where upstream said no
    assert np.array_equal(stored > 0.5 * 255, mask)
    assert np.abs(stored.astype(int) - np.rint(prob * 255)).max() <= 1


# --- video windows --------------------------------------------------------------------------------------------------
def test_window_bounds_cover_every_frame_and_refuse_bad_settings() -> None:
    import doctest

    import vesselnb.infer as infer_module
    from vesselnb.infer import window_bounds

    assert doctest.testmod(infer_module).failed == 0
    for n in range(1, 40):
        for window in (1, 2, 5, 16):
            for overlap in range(window):
                bounds = window_bounds(n, window, overlap)
                covered = sorted({i for a, b in bounds for i in range(a, b + 1)})
                assert covered == list(range(n))
                assert all(b - a + 1 == min(window, n) for a, b in bounds)
                assert all(later[0] - earlier[1] <= 1 for earlier, later in zip(bounds, bounds[1:], strict=False))
    with pytest.raises(InferenceError, match="video_overlap"):
        window_bounds(10, 4, 4)


def test_each_frame_is_owned_by_exactly_one_window_the_nearest_centre() -> None:
    from vesselnb.infer import video_windows

    sequence = [Sample(f"f{i}", Path(f"f{i}.jpg"), "p", "s", i) for i in range(10)]
    windows = video_windows(sequence, 4, 2)  # (0,3) (2,5) (4,7) (6,9)
    assert [(w.first, w.last) for w in windows] == [(0, 3), (2, 5), (4, 7), (6, 9)]
    owners = {}
    for k, window in enumerate(windows):
        for sample_id in window.owned:
            assert sample_id not in owners
            owners[sample_id] = k
    assert sorted(owners) == sorted(s.sample_id for s in sequence)
    # frame 2: centres 1.5 (distance 0.5) and 3.5 (1.5) -> window 0; frame 3: 1.5 (1.5) vs 3.5 (0.5) -> window 1
    assert [owners[f"f{i}"] for i in range(10)] == [0, 0, 0, 1, 1, 2, 2, 3, 3, 3]
    assert video_windows(sequence, 4, 2) == windows  # deterministic


def test_default_video_window_is_the_largest_that_fits_the_memory_budget() -> None:
    from vesselnb.infer import (
        DEFAULT_VIDEO_WINDOW,
        VIDEO_WINDOW_BUDGET_BYTES,
        video_frame_bytes,
        window_for_budget,
    )

    per_frame = video_frame_bytes(torch.bfloat16)
    assert video_frame_bytes(torch.float32) == 2 * per_frame  # fp32 on a CPU: twice the bf16 cost
    assert DEFAULT_VIDEO_WINDOW * per_frame <= VIDEO_WINDOW_BUDGET_BYTES < (DEFAULT_VIDEO_WINDOW + 1) * per_frame
    assert window_for_budget(VIDEO_WINDOW_BUDGET_BYTES, torch.float32) == VIDEO_WINDOW_BUDGET_BYTES // (2 * per_frame)
    assert window_for_budget(0) == 1  # always at least one frame per call


def test_a_window_that_does_not_fit_the_free_memory_is_named_with_the_window_that_would() -> None:
    from vesselnb.infer import video_frame_bytes, video_window_note

    plan = plan_device("cpu", "fp32")
    per_frame = video_frame_bytes(torch.float32)
    assert video_window_note(plan, 8, 8 * per_frame) is None
    assert video_window_note(plan, 8, None) is None  # free memory unknown: nothing to say
    note = video_window_note(plan, 8, 3 * per_frame + 1)
    assert note is not None and "inference.video_window 8" in note and "at most 3" in note
