"""Inference on the real demo model (transformers remote code): full run, kill -9 + resume, bad prompts, corrupt
frames, a model that raises, a model without [SEG], fingerprint refusal, shards, video mode, flash_attn check."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _infer_fixtures import (
    N_FRAMES,
    REPO,
    cli_command,
    copy_frames,
    copy_model,
    demo_model_dir,
    records_without_timing,
    run_cli,
    subprocess_env,
    write_params,
)
from bs4 import BeautifulSoup
from PIL import Image

from vesselnb.data import list_samples
from vesselnb.device import cuda_shim
from vesselnb.errors import InferenceError, StoreError
from vesselnb.fingerprint import weights_fingerprint
from vesselnb.frames import window_to_uint8
from vesselnb.infer import FlashAttnWarning, PromptWarning, infer_stage, load_model
from vesselnb.params import DEFAULT_PROMPT, load_params
from vesselnb.store import PredictionStore


@pytest.fixture(scope="session")
def demo(demo_assets):
    """The session's demo build (tests/conftest.py)."""
    return demo_assets


@pytest.fixture(scope="session")
def model_dir(demo) -> Path:
    return demo_model_dir(demo)


@pytest.fixture(scope="session")
def frames(demo, tmp_path_factory) -> Path:
    return copy_frames(demo, tmp_path_factory.mktemp("frames") / "images")


@pytest.fixture(scope="session")
def reference_run(model_dir, frames, tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """One uninterrupted, unsharded CLI run over the frames: what resumed and sharded runs must reproduce.

    The params name an annotations file that is not JSON: inference must never open ground truth.
    """
    root = tmp_path_factory.mktemp("reference")
    poison = root / "annotations.json"
    poison.write_text("this is not JSON: inference must not read ground truth")
    params = write_params(root / "ref.yaml", model_dir, frames, annotations=poison)
    proc = run_cli(params, root / "run")
    return params, root / "run", proc


def test_full_run_stores_every_frame_with_masks_and_probabilities(reference_run, model_dir, frames) -> None:
    _, run_dir, proc = reference_run
    store = PredictionStore(run_dir / "predictions")
    ids = [s.sample_id for s in list_samples(frames)]
    assert store.sample_ids() == sorted(ids) and len(ids) == N_FRAMES
    assert store.fingerprint == weights_fingerprint(model_dir)
    assert store.meta["prompt"] == DEFAULT_PROMPT and store.meta["mode"] == "image"
    assert store.meta["probability_maps"] is True
    counts = store.status_counts()
    assert counts == {"ok": N_FRAMES, "no_seg": 0, "error": 0}, counts
    assert f"{N_FRAMES} samples: {N_FRAMES} ok" in proc.stdout
    for rec in store.records():
        mask = store.mask(rec["sample_id"])
        prob = store.probability(rec["sample_id"])
        with Image.open(rec["image"]) as image:
            assert mask.shape == (image.height, image.width) == (rec["height"], rec["width"])
        assert "[SEG]" in rec["text"] and rec["n_seg"] >= 1 and rec["seconds"] > 0
        assert mask.any() and prob is not None and prob.dtype == np.uint8
        # The map was captured from the model's logits (the demo returns masks only, as upstream) and, stored,
        # thresholded at 0.5 as the analysis does, gives back the model's own mask bit for bit.
        assert rec["probability_source"].startswith("captured")
        assert np.array_equal(prob > 0.5 * 255, mask)
        assert 0 < np.count_nonzero((prob > 0) & (prob < 255))  # a soft map, not the mask in disguise


def test_captured_maps_reproduce_the_returned_masks_bit_for_bit(model_dir, frames) -> None:
    """Image and video calls: the captured map thresholded at 0.5 is predict_forward's own mask, frame by frame,
    both as float and as stored (uint8); a non-square frame exercises upstream's resize to the input size."""
    from vesselnb.mask_capture import quantise_consistent

    loaded = load_model(model_dir, device="cpu")
    assert loaded.probability.captured
    paths = sorted(frames.glob("*.jpg"))[:3]
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    calls = [{"image": images[0]}, {"image": images[1].resize((301, 207))}, {"video": images}]
    for call in calls:
        output = loaded.predict(text=DEFAULT_PROMPT, probability=True, **call)
        plain = loaded.predict(text=DEFAULT_PROMPT, **call)
        assert "probability_maps" not in plain and "probability_error" not in output
        masks, maps = output["prediction_masks"], output["probability_maps"]
        assert len(masks) == len(maps) > 0
        for mask, prob, plain_mask in zip(masks, maps, plain["prediction_masks"], strict=True):
            assert prob.shape == mask.shape and np.array_equal(plain_mask, mask)
            assert np.array_equal(prob > 0.5, mask)
            for index in range(mask.shape[0]):
                stored = quantise_consistent(prob[index], mask[index])
                assert np.array_equal(stored > 127.5, mask[index])
    assert "language_embd_inference" not in vars(loaded.model.grounding_encoder)


def test_a_capture_that_does_not_reproduce_the_masks_stores_no_map(model_dir, frames, tmp_path) -> None:
    """Code whose returned masks are not the captured logits' threshold: no map, the reason in the record."""
    folder = copy_model(model_dir, tmp_path / "other_threshold")
    modeling = folder / "modeling_sa2va_demo.py"
    code = modeling.read_text()
    assert "masks.sigmoid() > 0.5" in code
    modeling.write_text(code.replace("masks.sigmoid() > 0.5", "masks.sigmoid() > 0.3"))
    params = load_params(write_params(tmp_path / "p.yaml", folder, frames))
    params.data.limit = 1
    summary = infer_stage(params, tmp_path / "run", progress=False)
    (rec,) = PredictionStore(tmp_path / "run" / "predictions").records()
    assert rec["status"] == "ok" and not rec["has_probability"]
    assert "differ from the returned mask" in rec["probability_source"]
    assert any("no probability map" in note for note in summary.notes)


@pytest.mark.slow
def test_resume_after_sigkill_loses_and_duplicates_nothing(reference_run, tmp_path) -> None:
    params, reference_dir, _ = reference_run
    run_dir = tmp_path / "run"
    records_dir = run_dir / "predictions" / "records"
    proc = subprocess.Popen(cli_command(params, run_dir), env=subprocess_env(VESSELNB_TEST_SAMPLE_DELAY="1.5"),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if records_dir.is_dir() and len(list(records_dir.glob("*.json"))) >= 2:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    before = {p.name: p.read_bytes() for p in records_dir.glob("*.json")}
    assert 2 <= len(before) < N_FRAMES

    rerun = run_cli(params, run_dir)
    assert f"{len(before)} already stored" in rerun.stdout + rerun.stderr
    store = PredictionStore(run_dir / "predictions")
    reference = PredictionStore(reference_dir / "predictions")
    assert store.sample_ids() == reference.sample_ids()  # each sample exactly once (one file per id)
    assert {p.name: p.read_bytes() for p in records_dir.glob("*.json") if p.name in before} == before  # not redone
    assert not list(run_dir.glob("predictions/*/.*.tmp"))
    assert store.predictions_hash() == reference.predictions_hash()
    assert records_without_timing(store) == records_without_timing(reference)


def test_prompt_without_image_token_is_fixed_not_crashed(model_dir, frames, tmp_path) -> None:
    bad_prompt = "Please segment the blood vessel."
    loaded = load_model(model_dir, device="cpu")
    with Image.open(next(frames.glob("*.jpg"))) as image:
        with pytest.raises(AssertionError):  # what users hit: the model itself crashes on this prompt
            loaded.predict(image=image.convert("RGB"), text=bad_prompt)

    params = load_params(write_params(tmp_path / "p.yaml", model_dir, frames, prompt=bad_prompt))
    params.data.limit = 2
    with pytest.warns(PromptWarning, match="<image>"):
        summary = infer_stage(params, tmp_path / "run", progress=False)
    assert summary.prompt == "<image>" + bad_prompt and summary.prompt_warning
    assert summary.status_counts["error"] == 0 and summary.status_counts["ok"] == 2
    assert PredictionStore(tmp_path / "run" / "predictions").meta["prompt"] == "<image>" + bad_prompt
    assert "has no &#x27;&lt;image&gt;&#x27;" in summary._repr_html_()  # the fix is shown, not hidden

    params.inference.strict_prompt = True
    with pytest.raises(InferenceError, match="strict"):
        infer_stage(params, tmp_path / "strict", progress=False)
    assert not (tmp_path / "strict").exists()


def test_corrupt_frames_are_errors_and_the_run_goes_on(model_dir, frames, tmp_path) -> None:
    images = tmp_path / "images"
    good = sorted(frames.glob("*.jpg"))[:2]
    for path in good:
        (images / path.name).parent.mkdir(exist_ok=True)
        (images / path.name).write_bytes(path.read_bytes())
    (images / "Zz_Broken_1__1-1_frame_000000.jpg").write_bytes(b"this is not an image at all")
    (images / "Zz_Broken_1__1-1_frame_000001.jpg").write_bytes(good[0].read_bytes()[:2000])  # truncated JPEG
    params = load_params(write_params(tmp_path / "p.yaml", model_dir, images))
    summary = infer_stage(params, tmp_path / "run", progress=False)

    store = PredictionStore(tmp_path / "run" / "predictions")
    by_id = {rec["sample_id"]: rec for rec in store.records()}
    garbage, truncated = by_id["Zz_Broken_1__1-1_frame_000000"], by_id["Zz_Broken_1__1-1_frame_000001"]
    for rec in (garbage, truncated):
        assert rec["status"] == "error" and "cannot read image" in rec["error"]
    assert (garbage["height"], garbage["width"]) == (0, 0) and store.mask(garbage["sample_id"]).shape == (0, 0)
    assert truncated["height"] > 0 and not store.mask(truncated["sample_id"]).any()  # size known, mask empty
    assert [by_id[p.stem]["status"] for p in good] == ["ok", "ok"]
    assert summary.status_counts == {"ok": 2, "no_seg": 0, "error": 2}
    assert summary.has_problems and "ATTENTION" in summary.banner()
    assert "#b00020" in summary._repr_html_()
    assert set(summary.problems()["sample_id"]) == {garbage["sample_id"], truncated["sample_id"]}

    from vesselnb.viz import prediction_panels  # notebook 02's example cell: must draw error records, not crash

    figure = prediction_panels(store, summary.example_ids(8))
    titles = [axis.get_title() for axis in figure.axes]
    assert sum("frame not shown" in title for title in titles) == 2
    # every id whole (wrapped over lines, never cut), so patient, sequence and frame stay readable
    shown = [title.rsplit("\n", 1)[0].replace("\n", "") for title in titles if title]
    assert sorted(shown) == sorted(summary.example_ids(8))

    # the report lists both problem frames by full id with their error, and states its numbers' units
    problems = BeautifulSoup(summary.problems_html(), "html.parser")
    listed = [tr.find_all("td")[0].get_text(strip=True) for tr in problems.find_all("tr") if tr.find_all("td")]
    assert sorted(listed) == sorted([garbage["sample_id"], truncated["sample_id"]])
    assert "cannot read image" in problems.get_text() and "time (s)" in problems.get_text()
    page = BeautifulSoup(summary._repr_html_(), "html.parser").get_text(" ")
    assert "frames/s" in page and "s per frame" in page and "model load" in page
    status = BeautifulSoup(summary.status_html(), "html.parser")
    heads = [th.get_text(strip=True) for th in status.find_all("th")]
    assert "share (%)" in heads and "median time (s per frame)" in heads
    rows = {tr.find_all("td")[0].get_text(strip=True): tr.find_all("td")[1].get_text(strip=True)
            for tr in status.find_all("tr") if tr.find_all("td")}
    assert rows == {s: str(n) for s, n in summary.status_counts.items()}


def test_a_run_without_problems_says_so_in_one_line_and_shows_its_banner_once(reference_run) -> None:
    """No empty tables (problems, video windows): one line each; the counts stand in the banner's title only."""
    params, run_dir, _ = reference_run
    summary = infer_stage(load_params(params), run_dir, progress=False)  # all stored: the model is not loaded
    assert not summary.has_problems
    problems = BeautifulSoup(summary.problems_html(), "html.parser")
    assert problems.find("table") is None
    assert problems.get_text(strip=True) == f"No frame had a problem: all {N_FRAMES} frames produced a mask (ok)."
    video = BeautifulSoup(summary.video_html(), "html.parser")
    assert video.find("table") is None and "Image mode" in video.get_text()
    page = summary._repr_html_()
    assert page.count("vesselnb-banner") == 1 and page.count(f"{N_FRAMES} ok") == 1
    grouped = BeautifulSoup(summary.probability_html(), "html.parser")
    frames = [int(tr.find_all("td")[-1].get_text()) for tr in grouped.find_all("tr") if tr.find_all("td")]
    assert sum(frames) == N_FRAMES


def test_a_model_that_raises_on_one_frame_records_the_error(model_dir, frames, tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    paths = sorted(frames.glob("*.jpg"))[:3]
    for path in paths[:2]:
        (images / path.name).write_bytes(path.read_bytes())
    with Image.open(paths[2]) as image:
        image.resize((200, 150)).save(images / paths[2].name)
    failing = copy_model(model_dir, tmp_path / "failing_model", demo_fail_on_size=[200, 150])
    summary = infer_stage(load_params(write_params(tmp_path / "p.yaml", failing, images)), tmp_path / "run",
                          progress=False)
    store = PredictionStore(tmp_path / "run" / "predictions")
    failed = store.record(paths[2].stem)
    assert failed["status"] == "error"
    assert "RuntimeError" in failed["error"] and "demo_fail_on_size" in failed["error"]
    assert (failed["height"], failed["width"]) == (150, 200) and not store.mask(paths[2].stem).any()
    assert [store.record(p.stem)["status"] for p in paths[:2]] == ["ok", "ok"]
    assert summary.status_counts["error"] == 1


def test_a_model_without_seg_gives_no_seg_and_empty_masks(model_dir, frames, tmp_path) -> None:
    silent = copy_model(model_dir, tmp_path / "no_seg_model", demo_behaviour="no_seg")
    params = load_params(write_params(tmp_path / "p.yaml", silent, frames))
    params.data.limit = 2
    summary = infer_stage(params, tmp_path / "run", progress=False)
    store = PredictionStore(tmp_path / "run" / "predictions")
    for rec in store.records():
        assert rec["status"] == "no_seg" and "[SEG]" not in rec["text"] and rec["n_seg"] == 0
        assert not store.mask(rec["sample_id"]).any() and store.probability(rec["sample_id"]) is None
    assert summary.status_counts == {"ok": 0, "no_seg": 2, "error": 0}
    assert "ATTENTION" in summary.banner() and "EMPTY" in summary.banner()


def test_predictions_of_another_model_are_refused(reference_run, demo, frames, tmp_path) -> None:
    import shutil

    params_path, reference_dir, _ = reference_run
    run_dir = tmp_path / "run"
    shutil.copytree(reference_dir / "predictions", run_dir / "predictions")
    other = Path(demo.base_model)
    assert weights_fingerprint(other) != PredictionStore(run_dir / "predictions").fingerprint
    params = load_params(write_params(tmp_path / "other.yaml", other, frames))
    started = time.perf_counter()
    with pytest.raises(StoreError, match="fingerprint"):
        infer_stage(params, run_dir, progress=False)
    assert time.perf_counter() - started < 10  # refused before loading any weights
    assert PredictionStore(run_dir / "predictions").sample_ids() == PredictionStore(
        reference_dir / "predictions").sample_ids()

    proc = subprocess.run(cli_command(tmp_path / "other.yaml", run_dir), capture_output=True, text=True,
                          env=subprocess_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "Refusing to mix" in proc.stderr and "Traceback" not in proc.stderr


def test_same_weights_with_another_template_are_refused(reference_run, model_dir, frames, tmp_path) -> None:
    """The weights fingerprint says nothing about config.json: a changed template must not resume into the store."""
    import shutil

    _, reference_dir, _ = reference_run
    run_dir = tmp_path / "run"
    shutil.copytree(reference_dir / "predictions", run_dir / "predictions")
    edited = tmp_path / "edited_hf"
    shutil.copytree(model_dir, edited)
    config = json.loads((edited / "config.json").read_text())
    config["template"] = "another_template"
    (edited / "config.json").write_text(json.dumps(config))
    assert weights_fingerprint(edited) == PredictionStore(run_dir / "predictions").fingerprint
    params = load_params(write_params(tmp_path / "edited.yaml", edited, frames))
    with pytest.raises(StoreError, match="model_config"):
        infer_stage(params, run_dir, progress=False)


def test_two_shards_merge_to_the_unsharded_run(reference_run, tmp_path) -> None:
    """``--shard 0/2`` then ``--shard 1/2`` (in-process here; the launcher test below runs them as two processes)."""
    params_path, reference_dir, _ = reference_run
    params = load_params(params_path)
    run_dir = tmp_path / "run"
    first = infer_stage(params, run_dir, shard=(0, 2), progress=False)
    assert first.merged is False and (run_dir / "predictions" / "parts" / "0-of-2" / "part_complete.json").is_file()
    with pytest.raises(StoreError, match="merge-predictions"):
        PredictionStore(run_dir / "predictions")  # nothing merged yet: readers are told, not shown half a run
    second = infer_stage(params, run_dir, shard=(1, 2), progress=False)
    assert second.merged is True and not (run_dir / "predictions" / "parts").exists()
    assert first.stats.n_run + second.stats.n_run == N_FRAMES
    store = PredictionStore(run_dir / "predictions")
    reference = PredictionStore(reference_dir / "predictions")
    assert store.predictions_hash() == reference.predictions_hash()
    assert records_without_timing(store) == records_without_timing(reference)


@pytest.mark.slow
def test_a_launcher_with_two_processes_shards_by_rank(reference_run, tmp_path) -> None:
    """``torchrun`` sets RANK/WORLD_SIZE/LOCAL_RANK exactly as ``accelerate launch --multi_gpu`` does (it wraps it)."""
    import sys

    params, reference_dir, _ = reference_run
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vesselnb.cli", "infer", str(params), "--run-dir", str(run_dir), "--no-progress"]
    proc = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shard 0/2" in proc.stdout and "shard 1/2" in proc.stdout
    store = PredictionStore(run_dir / "predictions")
    assert store.predictions_hash() == PredictionStore(reference_dir / "predictions").predictions_hash()


def test_video_mode_passes_each_sequence_as_one_video(model_dir, frames, tmp_path) -> None:
    params = load_params(write_params(tmp_path / "p.yaml", model_dir, frames, mode="video"))
    summary = infer_stage(params, tmp_path / "run", progress=False)
    store = PredictionStore(tmp_path / "run" / "predictions")
    assert store.meta["mode"] == "video" and len(store) == N_FRAMES
    texts = {}
    for rec in store.records():
        texts.setdefault(rec["sequence"], set()).add(rec["text"])
    assert len(texts) == 2 and all(len(t) == 1 for t in texts.values())  # one answer per sequence
    assert summary.status_counts["error"] == 0 and summary.mode == "video"


def test_flash_attn_import_check_is_handled_with_a_warning(model_dir, tmp_path) -> None:
    """Remote code that imports flash_attn only behind a runtime guard: transformers' static check refuses it."""
    from transformers import AutoModel

    folder = copy_model(model_dir, tmp_path / "fa_model")
    modeling = folder / "modeling_sa2va_demo.py"
    modeling.write_text(modeling.read_text() + (
        "\n\nimport importlib.util as _importlib_util\n"
        "if _importlib_util.find_spec('flash_attn') is not None:  # runtime guard, as Sa2VA's flash_attention.py\n"
        "    from flash_attn import flash_attn_func  # noqa: F401\n"))
    with pytest.raises(ImportError, match="flash_attn"):
        AutoModel.from_pretrained(str(folder), trust_remote_code=True)
    with pytest.warns(FlashAttnWarning, match="eager"):
        loaded = load_model(folder, device="cpu")
    assert callable(loaded.model.predict_forward) and loaded.warnings
    import transformers.dynamic_module_utils as dmu

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert dmu.get_imports.__name__ == "get_imports"  # the import-check patch was undone


def test_doctor_builds_code_that_reads_tensor_values_in_init(model_dir, tmp_path) -> None:
    """Upstream Sa2VA's InternViT and SAM2 call ``torch.linspace(...)[i].item()`` in ``__init__`` (drop-path
    schedules): the doctor's key check must build such code (it reported upstream folders as not importable)."""
    from transformers import AutoConfig, AutoModel

    from vesselnb import doctor

    folder = copy_model(model_dir, tmp_path / "item_model")
    modeling = folder / "modeling_sa2va_demo.py"
    source = modeling.read_text()
    anchor = "        super().__init__(config)\n        vision = config.vision_config\n"
    assert anchor in source
    modeling.write_text(source.replace(anchor, anchor.replace(
        "        vision =", "        self.drop_path_rates = [x.item() for x in torch.linspace(0, 0.1, 2)]\n"
                           "        vision =")))
    with pytest.raises(RuntimeError, match="meta"), torch.device("meta"):  # what the check used to do
        AutoModel.from_config(AutoConfig.from_pretrained(str(folder), trust_remote_code=True),
                              trust_remote_code=True)
    checks = {check.name: check for check in doctor.diagnose(folder, device="cpu", scan_values=False).checks}
    assert checks["remote code importable"].status == "ok", checks["remote code importable"].detail
    assert checks["weights complete"].status == "ok", checks["weights complete"].detail


def test_every_model_call_runs_without_autograd(model_dir, frames) -> None:
    """The demo model guards only generation, as upstream does: a bare call builds SAM2's graph, ours never does."""
    loaded = load_model(model_dir, device="cpu")
    decoder = loaded.model.grounding_encoder.sam2_model.sam_mask_decoder
    seen: list[tuple[bool, bool]] = []
    hook = decoder.register_forward_hook(
        lambda _module, _inputs, output: seen.append((torch.is_grad_enabled(), output.requires_grad))
    )
    try:
        with Image.open(sorted(frames.glob("*.jpg"))[0]) as image:
            frame = image.convert("RGB")
        with cuda_shim(None):  # the demo keeps upstream's .cuda() idioms: a bare call on a CPU needs the shim too
            bare = loaded.model.predict_forward(image=frame, text=DEFAULT_PROMPT, tokenizer=loaded.tokenizer)
        assert seen and seen[-1] == (True, True), "the demo model must not hide the cost of an unguarded call"
        seen.clear()
        ours = loaded.predict(image=frame, text=DEFAULT_PROMPT)
        assert seen and all(not grad_on and not requires_grad for grad_on, requires_grad in seen)
        assert torch.is_inference_mode_enabled() is False  # the guard is scoped to the call
    finally:
        hook.remove()
    assert bare["prediction"] == ours["prediction"]
    assert len(bare["prediction_masks"]) == len(ours["prediction_masks"]) > 0
    for mask_bare, mask_ours in zip(bare["prediction_masks"], ours["prediction_masks"], strict=True):
        assert np.array_equal(mask_bare, mask_ours)


def test_model_incompatible_with_inference_mode_falls_back_to_no_grad(model_dir, frames) -> None:
    """Code that leaves inference mode inside the call trips torch's check; the call is redone under no_grad."""
    loaded = load_model(model_dir, device="cpu")
    language_model = loaded.model.language_model
    original_forward = language_model.forward
    weight = torch.nn.Parameter(torch.ones(1))

    def forward_leaving_inference_mode(*args, **kwargs):
        embeds = kwargs["inputs_embeds"]
        with torch.inference_mode(False), torch.enable_grad():
            _ = embeds * weight  # saving an inference tensor for backward: refused ("Inference tensors ...")
        return original_forward(*args, **kwargs)

    with Image.open(sorted(frames.glob("*.jpg"))[0]) as image:
        frame = image.convert("RGB")
    reference = loaded.predict(image=frame, text=DEFAULT_PROMPT)
    language_model.forward = forward_leaving_inference_mode
    try:
        output = loaded.predict(image=frame, text=DEFAULT_PROMPT)
    finally:
        language_model.forward = original_forward
    assert loaded.grad_guard == "no_grad"
    assert any("inference_mode" in warning for warning in loaded.warnings)
    assert output["prediction"] == reference["prediction"]


def test_16_bit_frame_predicts_as_its_8_bit_window(model_dir, frames, tmp_path) -> None:
    """A 16-bit export of a frame gets the same masks as the 8-bit picture of the same window (not a white frame)."""
    from vesselnb.frames import open_frame_rgb, window_to_uint8

    with Image.open(sorted(frames.glob("*.jpg"))[0]) as image:
        grey8 = np.asarray(image.convert("L"))
    grey16 = grey8.astype(np.uint16) * 257 + 1000  # a linear 16-bit export of the same picture
    Image.fromarray(grey16).save(tmp_path / "frame16.png")
    Image.fromarray(window_to_uint8(grey8)).save(tmp_path / "frame8.png")
    loaded = load_model(model_dir, device="cpu")
    out16 = loaded.predict(image=open_frame_rgb(tmp_path / "frame16.png"), text=DEFAULT_PROMPT)
    out8 = loaded.predict(image=open_frame_rgb(tmp_path / "frame8.png"), text=DEFAULT_PROMPT)
    assert out16["prediction"] == out8["prediction"]
    masks16, masks8 = np.any(out16["prediction_masks"], axis=0), np.any(out8["prediction_masks"], axis=0)
    assert masks8.any() and np.array_equal(masks16, masks8)


def _dicom(path: Path, frames16: np.ndarray, window=None) -> Path:
    """A real multi-frame XA DICOM file written with pydicom (uncompressed 16-bit)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, XRayAngiographicImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = XRayAngiographicImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.SeriesNumber, ds.Modality = "Doe^Jane", "42", 3, "XA"
    ds.NumberOfFrames, (ds.Rows, ds.Columns) = frames16.shape[0], frames16.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = frames16.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return path


def test_dicom_cine_is_one_record_per_frame_with_its_windowing(model_dir, frames, tmp_path) -> None:
    """A 16-bit XA cine run: each frame predicted as its 8-bit window (same masks as the 8-bit picture), the
    window recorded, a constant frame an error record."""
    paths = sorted(frames.glob("*.jpg"))[:2]
    greys = []
    for path in paths:
        with Image.open(path) as image:
            greys.append(np.asarray(image.convert("L")))
    cine = np.stack([g.astype(np.uint16) * 257 + 1000 for g in greys] + [np.full_like(greys[0], 7000, np.uint16)])
    images = tmp_path / "dicom"
    images.mkdir()
    _dicom(images / "run1.dcm", cine)
    params = load_params(write_params(tmp_path / "p.yaml", model_dir, images, image_glob="*.dcm"))
    summary = infer_stage(params, tmp_path / "run", progress=False)
    store = PredictionStore(tmp_path / "run" / "predictions")
    records = {rec["sample_id"]: rec for rec in store.records()}
    assert sorted(records) == [f"run1_frame_{i:06d}" for i in range(3)] and summary.n_samples == 3
    bad = records["run1_frame_000002"]
    assert bad["status"] == "error" and "black" in bad["error"] and bad["image"].endswith("run1.dcm#frame=2")
    loaded = load_model(model_dir, device="cpu")
    for index, grey in enumerate(greys):
        rec = records[f"run1_frame_{index:06d}"]
        assert rec["status"] == "ok" and rec["patient"] == "Doe_Jane_42" and rec["sequence"] == "3"
        assert rec["frame"] == index and rec["windowing"].startswith("min-max")
        reference = loaded.predict(image=Image.fromarray(window_to_uint8(grey)).convert("RGB"), text=DEFAULT_PROMPT)
        assert np.array_equal(store.mask(rec["sample_id"]), np.any(reference["prediction_masks"], axis=0)[0])
    frame = summary.records
    assert "windowing" in frame.columns and frame["windowing"].notna().sum() == 2


def test_error_records_are_retried_when_their_file_changes(model_dir, frames, tmp_path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    good = sorted(frames.glob("*.jpg"))[:2]
    (images / good[0].name).write_bytes(good[0].read_bytes())
    broken = images / good[1].name
    broken.write_bytes(b"not yet exported")
    params = load_params(write_params(tmp_path / "p.yaml", model_dir, images))
    first = infer_stage(params, tmp_path / "run", progress=False)
    assert first.status_counts == {"ok": 1, "no_seg": 0, "error": 1}
    unchanged = infer_stage(params, tmp_path / "run", progress=False)
    assert unchanged.stats.n_run == 0 and unchanged.stats.n_retried == 0
    assert unchanged.stats.n_done_before == 2
    assert "nothing predicted in this pass" in unchanged.to_text() and "nan" not in unchanged.to_text()

    broken.write_bytes(good[1].read_bytes())  # the user re-exports the frame
    fixed = infer_stage(params, tmp_path / "run", progress=False)
    assert fixed.stats.n_retried == 1 and fixed.stats.n_run == 1 and fixed.stats.n_done_before == 1
    assert "1 predicted (1 retried error records)" in fixed.to_text()
    assert fixed.status_counts == {"ok": 2, "no_seg": 0, "error": 0}

    (images / good[0].name).write_bytes(b"broken again")  # an ok record is never redone by itself...
    again = infer_stage(params, tmp_path / "run", progress=False)
    assert again.stats.n_run == 0
    store = PredictionStore(tmp_path / "run" / "predictions")
    record = store.record(good[1].stem)
    record.pop("image_stat", None)  # ...and an error record without a file signature only with --retry-errors
    record.update(status="error", error="old vesselnb error")
    store.write(record, np.zeros((record["height"], record["width"]), bool))
    assert infer_stage(params, tmp_path / "run", progress=False).stats.n_retried == 0
    forced = run_cli(write_params(tmp_path / "p.yaml", model_dir, images), tmp_path / "run", "--retry-errors")
    assert "1 retried error records" in forced.stdout + forced.stderr
    assert PredictionStore(tmp_path / "run" / "predictions").record(good[1].stem)["status"] == "ok"


def test_video_mode_runs_in_windows_stitched_deterministically(model_dir, frames, tmp_path) -> None:
    """Sequences of three frames in windows of two sharing one: each frame stored from the window whose centre is
    nearer (ties: the earlier), each window's peak memory reported, what the LLM saw recorded; a resumed run makes
    the same calls and stores the same masks."""
    params = load_params(write_params(tmp_path / "p.yaml", model_dir, frames, mode="video", video_window=2,
                                      video_overlap=1))
    summary = infer_stage(params, tmp_path / "run", progress=False)
    windows = summary.stats.windows
    assert [(w["first"], w["last"], w["frames"], w["llm_frames"]) for w in windows] == [(0, 1, 2, 2), (1, 2, 2, 2)] * 2
    assert all(w["peak_mb"] and w["peak_mb"] > 0 for w in windows)
    assert windows[0]["planned_mb"] is None and all(w["planned_mb"] >= windows[0]["peak_mb"] for w in windows[1:])
    assert "none above the memory model's plan" in " ".join(summary.video_notes)  # the demo's memory is flat
    store = PredictionStore(tmp_path / "run" / "predictions")
    assert store.meta["video_window"] == 2 and store.meta["video_overlap"] == 1
    loaded = load_model(model_dir, device="cpu")
    for sequence in {rec["sequence"] for rec in store.records()}:
        recs = sorted((r for r in store.records() if r["sequence"] == sequence), key=lambda r: r["frame"])
        assert [r["video_window"] for r in recs] == [[0, 1], [0, 1], [1, 2]]
        assert all(r["llm_saw_frame"] for r in recs)
        images = []
        for rec in recs:
            with Image.open(rec["image"]) as image:
                images.append(image.convert("RGB"))
        last_window = loaded.predict(video=images[1:], text=DEFAULT_PROMPT)  # frame 2 comes from window (1, 2)
        assert np.array_equal(store.mask(recs[2]["sample_id"]), np.any(last_window["prediction_masks"], axis=0)[1])
    reference = {r["sample_id"]: store.mask(r["sample_id"]) for r in store.records()}
    removed = sorted(store.sample_ids())[1]
    (store.path / "records" / f"{removed}.json").unlink()
    resumed = infer_stage(params, tmp_path / "run", progress=False)
    assert resumed.stats.n_run == 1 and len(resumed.stats.windows) == 1
    assert np.array_equal(PredictionStore(store.path).mask(removed), reference[removed])
    assert "video" in summary._repr_html_() and "first 5" in summary._repr_html_()
    windows = BeautifulSoup(summary.video_html(), "html.parser")  # one row per window, memory in MB
    heads = [th.get_text(strip=True) for th in windows.find_all("th")]
    assert "peak memory (MB)" in heads and "frames the LLM saw" in heads
    assert len([tr for tr in windows.find_all("tr") if tr.find_all("td")]) == len(summary.stats.windows) > 0


def test_a_one_frame_window_does_not_plan_longer_windows(model_dir, frames, tmp_path) -> None:
    """SAM2 adds memory attention from two frames on (a fixed step): a one-frame sequence's peak cannot plan a
    longer window, which calibrates the plan again (no plan of its own, no false "above the plan")."""
    samples = list_samples(frames)
    sequences: dict[str, list] = {}
    for sample in samples:
        sequences.setdefault(sample.video_key, []).append(sample)
    first, second = list(sequences.values())[:2]
    assert len(second) >= 2
    images = tmp_path / "images"
    images.mkdir()
    for sample in [first[0], *second]:
        (images / sample.image_path.name).write_bytes(sample.image_path.read_bytes())
    params = load_params(write_params(tmp_path / "p.yaml", model_dir, images, mode="video", video_window=8))
    windows = infer_stage(params, tmp_path / "run", progress=False).stats.windows
    assert [w["frames"] for w in windows] == [1, len(second)]
    assert all(w["peak_mb"] is not None for w in windows)
    assert [w["planned_mb"] for w in windows] == [None, None]
