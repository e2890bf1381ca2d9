"""The embedded demo: synthetic frames and annotations, the demo model's predict_forward contract, checkpoints."""

from __future__ import annotations

import ast
import hashlib
import json
import re
import runpy
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import AutoModel, AutoTokenizer

from vesselnb.data import list_samples, parse_sample_name
from vesselnb.demo import DemoAssets, ensure_demo_assets
from vesselnb.demo.assets import demo_raster_masks, demo_settings, write_demo_dataset
from vesselnb.demo.synth import polygons_to_mask
from vesselnb.device import code_assumes_cuda, cuda_shim
from vesselnb.errors import VesselnbError
from vesselnb.params import DEFAULT_NAME_REGEX, DEFAULT_PROMPT

NAME_PATTERN = re.compile(r"^[A-Za-z_]+_\d{10}__\d+-4_1_[0-9A-F]{8}_frame_\d{6}\.jpg$")


def _load(folder: Path, dtype: torch.dtype = torch.float32, **config_overrides):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype, **config_overrides).eval()
    return model, tokenizer


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The demo model's tensors are tiny: one thread avoids oversubscribing a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def upstream_cuda_shim():
    """The demo model keeps upstream's CUDA idioms (``.cuda()``, ``torch.device("cuda")``, a CUDA autocast), so on
    a CPU a direct call needs vesselnb's shim, as the real code does (fp32 weights: the autocast stays off). Only
    around model calls, as vesselnb scopes it: torch's own RNG forking must see the real ``torch.device``."""
    with cuda_shim(None):
        yield


@pytest.fixture(scope="module")
def demo_model(demo_model_dir: Path):
    model, tokenizer = _load(demo_model_dir)
    model.preparing_for_generation(tokenizer, torch_dtype=torch.float32)
    return model, tokenizer


@pytest.fixture(scope="module")
def first_frame(demo_assets: DemoAssets) -> Image.Image:
    return Image.open(sorted(demo_assets.images_dir.glob("*.jpg"))[0])


def _ground_truth(demo_assets: DemoAssets) -> dict[str, np.ndarray]:
    records = json.loads(demo_assets.annotations.read_text(encoding="utf-8"))
    size = demo_settings(demo_assets).size
    return {Path(r["image"]).stem: polygons_to_mask(r["mask"], size, size) for r in records}


# --- frames and annotations -------------------------------------------------------------------------------------
def test_frames_follow_the_users_naming_and_parse(demo_assets: DemoAssets) -> None:
    names = sorted(p.name for p in demo_assets.images_dir.glob("*.jpg"))
    assert len(names) == 2 * 2 * 3
    assert all(NAME_PATTERN.match(name) for name in names), names
    parsed = [parse_sample_name(Path(n).stem, DEFAULT_NAME_REGEX) for n in names]
    assert len({p for p, _, _ in parsed}) == 2
    assert len({(p, s) for p, s, _ in parsed}) == 4
    assert parsed[0][0] == "Demo_Patient_A_0000100001"
    frames_of_first_sequence = [f for p, s, f in parsed if (p, s) == parsed[0][:2]]
    assert frames_of_first_sequence == list(range(frames_of_first_sequence[0], frames_of_first_sequence[0] + 3))
    samples = list_samples(demo_assets.images_dir)
    assert {s.sequence for s in samples} == {s for _, s, _ in parsed}
    with Image.open(demo_assets.images_dir / names[0]) as image:
        assert image.size == (256, 256) and image.mode == "RGB"


def test_annotations_are_in_sa2va_training_layout(demo_assets: DemoAssets) -> None:
    records = json.loads(demo_assets.annotations.read_text(encoding="utf-8"))
    assert sorted(r["image"] for r in records) == sorted(p.name for p in demo_assets.images_dir.glob("*.jpg"))
    for record in records:
        assert set(record) == {"image", "mask", "text", "conversations"}
        assert record["mask"] and all(len(poly) >= 6 and len(poly) % 2 == 0 for poly in record["mask"])
        assert all(-0.5 <= v <= 255.5 for poly in record["mask"] for v in poly)  # outlines run on pixel edges
        assert record["text"] == ["blood vessel"] * len(record["mask"])
        assert "<image>" in record["conversations"][0]["value"]
        assert "[SEG]" in record["conversations"][1]["value"]


def test_even_odd_refill_of_polygons_reproduces_the_raster_masks(demo_assets: DemoAssets) -> None:
    raster = demo_raster_masks(demo_assets)
    refilled = _ground_truth(demo_assets)
    assert raster.keys() == refilled.keys()
    has_holes = 0
    for stem, mask in raster.items():
        iou = (mask & refilled[stem]).sum() / (mask | refilled[stem]).sum()
        assert iou > 0.95, (stem, iou)
        assert 0.03 < mask.mean() < 0.25  # a vessel tree, not an empty or flooded frame
        records = json.loads(demo_assets.annotations.read_text(encoding="utf-8"))
        n_polygons = len(next(r for r in records if r["image"] == f"{stem}.jpg")["mask"])
        from scipy import ndimage

        has_holes += n_polygons > ndimage.label(mask)[1]
    assert has_holes, "crossing vessels should enclose background (holes), exercising the even-odd rule"


def test_dataset_is_deterministic(demo_assets: DemoAssets, tmp_path: Path) -> None:
    settings = demo_settings(demo_assets)
    write_demo_dataset(tmp_path / "images", tmp_path / "annotations.json", settings)
    assert (tmp_path / "annotations.json").read_bytes() == demo_assets.annotations.read_bytes()
    for path in sorted(demo_assets.images_dir.glob("*.jpg")):
        assert (tmp_path / "images" / path.name).read_bytes() == path.read_bytes()


def test_ensure_demo_assets_is_idempotent_and_refuses_foreign_folders(demo_assets: DemoAssets, tmp_path: Path) -> None:
    marker = demo_assets.root / ".complete"
    before = marker.stat().st_mtime_ns
    started = time.perf_counter()
    again = ensure_demo_assets(demo_assets.root, demo_settings(demo_assets))
    assert time.perf_counter() - started < 1.0
    assert again == demo_assets and marker.stat().st_mtime_ns == before
    foreign = tmp_path / "my_data"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("user data")
    with pytest.raises(VesselnbError, match="not a vesselnb demo folder"):
        ensure_demo_assets(foreign, demo_settings(demo_assets))
    assert (foreign / "precious.txt").exists()


# --- the demo model ---------------------------------------------------------------------------------------------
def test_hf_folder_loads_with_remote_code_and_has_sa2va_keys(demo_assets: DemoAssets) -> None:
    for folder in (demo_assets.base_model, *demo_assets.reference_hf.values()):
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == "sa2va_demo" and config["architectures"] == ["Sa2VADemoChatModel"]
        assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
        assert config["template"] == "qwen_chat" and "demo" in config["demo_notice"]
        for name in ("configuration_sa2va_demo.py", "modeling_sa2va_demo.py", "demo_sam2.py", "demo_templates.py"):
            assert (folder / name).is_file()
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        keys = set(index["weight_map"])
        assert len(set(index["weight_map"].values())) > 1  # sharded, like real Sa2VA folders
        for family in (
            "vision_model.",
            "mlp1.0.",
            "mlp1.1.",
            "mlp1.3.",
            "language_model.model.layers.0.",
            "grounding_encoder.sam2_model.sam_mask_decoder.",
            "grounding_encoder.sam2_model.image_encoder.",
            "text_hidden_fcs.0.",
            "text_hidden_fcs.2.",
        ):
            assert any(k.startswith(family) for k in keys), family
        assert "language_model.lm_head.weight" in keys
        assert "grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.g_weight" in keys
        assert not any("lora" in k or "base_layer" in k or "modules_to_save" in k or k.endswith(".gamma") for k in keys)
        for shard in set(index["weight_map"].values()):
            with safe_open(folder / shard, "pt") as handle:
                assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}

        model, tokenizer = _load(folder)
        assert type(model).__name__ == "Sa2VADemoChatModel"
        assert config["llm_config"]["vocab_size"] == len(tokenizer) == model.language_model.config.vocab_size
        for token in (
            "[SEG]",
            "<p>",
            "</p>",
            "<vp>",
            "</vp>",
            "<img>",
            "</img>",
            "<IMG_CONTEXT>",
            "<|im_start|>",
            "<|im_end|>",
            "<|endoftext|>",
        ):
            assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id, token


@pytest.mark.usefixtures("upstream_cuda_shim")
def test_predict_forward_image_contract(demo_model, first_frame: Image.Image) -> None:
    """As upstream: thresholded masks only; the soft map exists only inside (and vesselnb captures it)."""
    from vesselnb.mask_capture import LogitCapture, maps_from_logits

    model, tokenizer = demo_model
    capture = LogitCapture(model)
    with capture.active() as logits:
        out = model.predict_forward(image=first_frame, text=DEFAULT_PROMPT, tokenizer=tokenizer)
    assert out["prediction"] == "Sure, it is [SEG].<|im_end|>" and "probability_maps" not in out
    (mask,) = out["prediction_masks"]
    assert isinstance(mask, np.ndarray) and mask.dtype == bool and mask.shape == (1, 256, 256)
    assert 0.01 < mask.mean() < 0.5
    (probability,) = maps_from_logits(logits, out["prediction_masks"])
    assert probability.dtype == np.float32 and probability.shape == (1, 256, 256)
    assert np.array_equal(probability > 0.5, mask)
    assert "language_embd_inference" not in vars(model.grounding_encoder)  # the wrapper is gone again
    plain = model.predict_forward(image=first_frame, text=DEFAULT_PROMPT, tokenizer=tokenizer)
    assert np.array_equal(plain["prediction_masks"][0], mask)


@pytest.mark.usefixtures("upstream_cuda_shim")
def test_predict_forward_resizes_masks_to_the_input_size(demo_model, first_frame: Image.Image) -> None:
    model, tokenizer = demo_model
    out = model.predict_forward(image=first_frame.resize((300, 200)), text=DEFAULT_PROMPT, tokenizer=tokenizer)
    assert out["prediction_masks"][0].shape == (1, 200, 300)


@pytest.mark.usefixtures("upstream_cuda_shim")
def test_predict_forward_video_gives_one_mask_per_frame(demo_model, demo_assets: DemoAssets) -> None:
    model, tokenizer = demo_model
    frames = [Image.open(p) for p in sorted(demo_assets.images_dir.glob("*.jpg"))[:3]]
    out = model.predict_forward(video=frames, text=DEFAULT_PROMPT, tokenizer=tokenizer)
    assert "[SEG]" in out["prediction"]
    assert out["prediction_masks"][0].shape == (3, 256, 256) and out["prediction_masks"][0].dtype == bool


@pytest.mark.usefixtures("upstream_cuda_shim")
def test_image_without_image_token_raises_assertion_like_upstream(demo_model, first_frame: Image.Image) -> None:
    model, tokenizer = demo_model
    with pytest.raises(AssertionError):
        model.predict_forward(image=first_frame, text="Please segment the blood vessel.", tokenizer=tokenizer)


@pytest.mark.usefixtures("upstream_cuda_shim")
def test_text_only_prompt_gives_no_masks(demo_model) -> None:
    model, tokenizer = demo_model
    out = model.predict_forward(text="Please segment the blood vessel.", tokenizer=tokenizer)
    assert isinstance(out["prediction"], str) and out["prediction_masks"] == []


@pytest.mark.usefixtures("upstream_cuda_shim")
def test_demo_switches_no_seg_and_fail_on_size(demo_model_dir: Path, first_frame: Image.Image) -> None:
    silent, tokenizer = _load(demo_model_dir, demo_behaviour="no_seg")
    silent.preparing_for_generation(tokenizer, torch_dtype=torch.float32)
    out = silent.predict_forward(image=first_frame, text=DEFAULT_PROMPT, tokenizer=tokenizer)
    assert "[SEG]" not in out["prediction"] and out["prediction_masks"] == []

    failing, tokenizer = _load(demo_model_dir, demo_fail_on_size=[256, 256])
    failing.preparing_for_generation(tokenizer, torch_dtype=torch.float32)
    with pytest.raises(RuntimeError, match="demo_fail_on_size"):
        failing.predict_forward(image=first_frame, text=DEFAULT_PROMPT, tokenizer=tokenizer)
    out = failing.predict_forward(image=first_frame.resize((128, 128)), text=DEFAULT_PROMPT, tokenizer=tokenizer)
    assert out["prediction_masks"][0].shape == (1, 128, 128)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour of upstream's CUDA idioms")
def test_demo_model_needs_the_cuda_shim_on_a_cpu_like_upstream(demo_model, first_frame: Image.Image) -> None:
    """Upstream calls ``torch.tensor(ids).cuda()``: on a CPU-only torch a bare call fails before anything else, and
    vesselnb's folder scan sees the idiom, so its runs put the shim on (the shim is exercised on every demo run)."""
    model, tokenizer = demo_model
    with pytest.raises(AssertionError, match="CUDA"):
        model.predict_forward(image=first_frame, text=DEFAULT_PROMPT, tokenizer=tokenizer)
    assert code_assumes_cuda(Path(model.name_or_path))


def test_bf16_runs_by_default_and_fp32_needs_preparing_like_upstream(demo_model_dir: Path, first_frame) -> None:
    bf16, tokenizer = _load(demo_model_dir, dtype=torch.bfloat16)
    with cuda_shim(torch.bfloat16):  # what vesselnb's plan gives bf16 weights on a CPU
        out = bf16.predict_forward(image=first_frame, text=DEFAULT_PROMPT, tokenizer=tokenizer)  # prepares bf16
    assert out["prediction_masks"][0].shape == (1, 256, 256)
    fp32, tokenizer = _load(demo_model_dir, dtype=torch.float32)
    with cuda_shim(None), pytest.raises(RuntimeError):  # bf16 pixels into fp32 convolutions, as upstream unprepared
        fp32.predict_forward(image=first_frame, text=DEFAULT_PROMPT, tokenizer=tokenizer)


@pytest.mark.usefixtures("upstream_cuda_shim")
def test_longer_training_segments_better(demo_assets: DemoAssets) -> None:
    truth = _ground_truth(demo_assets)
    dice = {}
    for key, folder in demo_assets.reference_hf.items():
        model, tokenizer = _load(folder)
        model.preparing_for_generation(tokenizer, torch_dtype=torch.float32)
        scores = []
        for stem, gt in truth.items():
            image = Image.open(demo_assets.images_dir / f"{stem}.jpg")
            pred = model.predict_forward(image=image, text=DEFAULT_PROMPT, tokenizer=tokenizer)["prediction_masks"][0][
                0
            ]
            scores.append(2 * (pred & gt).sum() / (pred.sum() + gt.sum()))
        dice[key] = float(np.mean(scores))
    assert dice["long"] > dice["short"] + 0.05, dice
    assert dice["long"] > 0.6, dice


# --- training checkpoints and config ----------------------------------------------------------------------------
def test_training_checkpoints_use_the_sa2va_layout(demo_assets: DemoAssets) -> None:
    path = demo_assets.checkpoints["long"]
    assert path.name == "iter_160.pth" and demo_assets.checkpoints["short"].name == "iter_30.pth"
    assert (demo_assets.work_dir / "last_checkpoint").read_text().strip() == str(path)
    with pytest.raises(Exception, match="TorchVersion"):
        torch.load(path, weights_only=True)
    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
        checkpoint = torch.load(path, weights_only=True)
    assert set(checkpoint) == {"state_dict", "meta", "message_hub"}
    assert checkpoint["meta"]["iter"] == 160 and isinstance(
        checkpoint["meta"]["torch_version"], torch.torch_version.TorchVersion
    )
    state = checkpoint["state_dict"]
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    llm = "mllm.model.language_model.base_model.model."
    for layer in range(2):
        for projection in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ):
            a = state[f"{llm}model.layers.{layer}.{projection}.lora_A.default.weight"]
            b = state[f"{llm}model.layers.{layer}.{projection}.lora_B.default.weight"]
            assert a.shape[0] == 8 and b.shape[1] == 8  # r from the training config
    assert f"{llm}lm_head.modules_to_save.default.weight" in state
    assert f"{llm}model.embed_tokens.modules_to_save.default.weight" in state
    assert "grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.gamma" in state
    prefixes = {k.split(".")[0] if not k.startswith("mllm.") else ".".join(k.split(".")[:3]) for k in state}
    assert prefixes == {"mllm.model.language_model", "mllm.model.mlp1", "grounding_encoder", "text_hidden_fcs"}
    assert not any("vision_model" in k or "image_encoder" in k or "base_layer" in k for k in state)
    assert all(
        k.startswith("grounding_encoder.sam2_model.sam_mask_decoder.") or "memory_encoder" in k
        for k in state
        if k.startswith("grounding_encoder.")
    )


def test_reference_folder_is_base_plus_merged_lora(demo_assets: DemoAssets) -> None:
    """reference_hf is what a correct converter computes: bf16(W_base + alpha/r * B @ A), trained copies verbatim."""
    with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
        state = torch.load(demo_assets.checkpoints["long"], weights_only=True)["state_dict"]

    def tensor(folder: Path, key: str) -> torch.Tensor:
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        with safe_open(folder / index[key], "pt") as handle:
            return handle.get_tensor(key)

    reference, base = demo_assets.reference_hf["long"], demo_assets.base_model
    prefix = "mllm.model.language_model.base_model.model.model.layers.1.self_attn.q_proj."
    merged = tensor(base, "language_model.model.layers.1.self_attn.q_proj.weight").float() + 16 / 8 * (
        state[prefix + "lora_B.default.weight"].float() @ state[prefix + "lora_A.default.weight"].float()
    )
    got = tensor(reference, "language_model.model.layers.1.self_attn.q_proj.weight")
    assert torch.allclose(got.float(), merged.to(torch.bfloat16).float(), atol=0, rtol=2**-7)
    assert not torch.equal(got, tensor(base, "language_model.model.layers.1.self_attn.q_proj.weight"))
    lm_head = state["mllm.model.language_model.base_model.model.lm_head.modules_to_save.default.weight"]
    assert torch.equal(tensor(reference, "language_model.lm_head.weight"), lm_head)
    gamma = state["grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.gamma"]
    assert torch.equal(tensor(reference, "grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.g_weight"), gamma)
    frozen = "grounding_encoder.sam2_model.image_encoder.stem.0.weight"
    assert torch.equal(tensor(reference, frozen), tensor(base, frozen))


def test_training_config_parses_but_cannot_run(demo_assets: DemoAssets) -> None:
    source = demo_assets.training_config.read_text()
    values = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    assert values["path"] == str(demo_assets.base_model)
    assert values["pretrained_pth"] is None and values["template"] == "qwen_chat"
    assert values["special_tokens"] == ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]
    lora = re.search(r"llm_lora=dict\((.*?)\)", source, re.S).group(1)
    assert "r=8," in lora and "lora_alpha=16," in lora and "task_type='CAUSAL_LM'" in lora
    with pytest.raises(ImportError):
        runpy.run_path(str(demo_assets.training_config))


@pytest.mark.slow
def test_two_builds_are_byte_identical(demo_assets: DemoAssets, tmp_path: Path) -> None:
    """A second build gives the same bytes (images, weights, checkpoints); a half-built folder is rebuilt."""
    half_built = tmp_path / "again"
    (half_built / "base_hf").mkdir(parents=True)
    (half_built / ".vesselnb_demo").write_text("interrupted build")
    (half_built / "base_hf" / "stale.safetensors").write_bytes(b"junk")
    other = ensure_demo_assets(half_built, demo_settings(demo_assets))
    assert not (half_built / "base_hf" / "stale.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".again.building")] == []

    def digests(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in {".jpg", ".json", ".safetensors", ".pth"} and p.name != ".complete"
        }

    ours, theirs = digests(demo_assets.root), digests(other.root)
    assert ours.keys() == theirs.keys()
    # .pth files embed the config text, which names the (different) absolute base folder; compare their content
    differing = [k for k in ours if ours[k] != theirs[k] and not k.endswith(".pth")]
    assert differing == []
    for key in ("short", "long"):
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
            mine = torch.load(demo_assets.checkpoints[key], weights_only=True)
            again = torch.load(other.checkpoints[key], weights_only=True)
        assert mine["state_dict"].keys() == again["state_dict"].keys()
        assert all(torch.equal(mine["state_dict"][k], again["state_dict"][k]) for k in mine["state_dict"])
        assert mine["meta"]["cfg"].replace(str(demo_assets.root), str(other.root)) == again["meta"]["cfg"]
