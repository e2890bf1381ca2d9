"""``ensure_demo_assets``: build (once) the whole demo - frames, annotations, base model, checkpoints, references.

The build is deterministic (fixed seeds, fixed thread count) and idempotent: a ``.complete`` marker records the
settings; a folder with other settings or without the marker (an interrupted build) is rebuilt. Each build happens
in a sibling temporary folder that is renamed into place at the end, so ``root`` is either complete or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vesselnb.demo.checkpoints import save_hf_folder, save_training_checkpoint
from vesselnb.demo.remote_code.configuration_sa2va_demo import Sa2VADemoChatConfig
from vesselnb.demo.remote_code.modeling_sa2va_demo import Sa2VADemoChatModel
from vesselnb.demo.synth import annotation_record, generate_frames
from vesselnb.demo.tokenizer import ANSWER, build_demo_tokenizer
from vesselnb.demo.train import (
    TrainSettings,
    finetune,
    merged_copy,
    prepare_training_set,
    pretrain,
    wrap_for_finetuning,
)
from vesselnb.demo.training_config import training_config_text
from vesselnb.errors import VesselnbError

BUILD_VERSION = 3  # bump when the generator or the training changes, so old demo folders are rebuilt
MARKER = ".complete"
OWNER_MARKER = ".vesselnb_demo"  # present from the first second of a build: this folder may be deleted and rebuilt
CONFIG_NAME = "sa2va_demo_vessel"
DEMO_PROMPT = "<image>Please segment the blood vessel."


@dataclass(frozen=True)
class DemoAssets:
    """Paths of a finished demo build (see docs/contracts.md, "Demo assets")."""

    root: Path
    images_dir: Path
    annotations: Path
    base_model: Path
    training_config: Path
    work_dir: Path
    checkpoints: dict[str, Path]  # {"short": iter_<short>.pth, "long": iter_<long>.pth}
    reference_hf: dict[str, Path]  # same keys: the directly trained model, LoRA merged, as HF folders


@dataclass(frozen=True)
class DemoSettings:
    """Everything that changes the build's bytes; stored in the ``.complete`` marker."""

    n_patients: int = 12
    sequences_per_patient: int = 2
    frames_per_sequence: int = 4
    size: int = 256
    short_iters: int = 50
    long_iters: int = 400
    train_sequences: int = 8
    train_frames_per_sequence: int = 4
    pretrain_iters: int = TrainSettings.pretrain_iters
    seed: int = 0
    build_version: int = BUILD_VERSION

    def __post_init__(self) -> None:
        if not 0 < self.short_iters < self.long_iters:
            raise VesselnbError(
                f"demo: short_iters ({self.short_iters}) must be positive and below long_iters ({self.long_iters})"
            )


def _paths(root: Path, settings: DemoSettings) -> DemoAssets:
    work_dir = root / "work_dirs" / CONFIG_NAME
    iters = {"short": settings.short_iters, "long": settings.long_iters}
    return DemoAssets(
        root=root,
        images_dir=root / "data" / "images",
        annotations=root / "data" / "annotations.json",
        base_model=root / "base_hf",
        training_config=root / "configs" / f"{CONFIG_NAME}.py",
        work_dir=work_dir,
        checkpoints={key: work_dir / f"iter_{n}.pth" for key, n in iters.items()},
        reference_hf={key: root / "reference_hf" / f"iter_{n}" for key, n in iters.items()},
    )


def _demo_config(tokenizer) -> Sa2VADemoChatConfig:
    """The tiny architecture: Qwen2 LM (64 wide, 2 layers) + conv vision + conv SAM2 stand-in."""
    llm_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
    }
    return Sa2VADemoChatConfig(
        llm_config=llm_config,
        grounding_config={"image_size": 128, "low_channels": 8, "high_channels": 16, "seg_dim": 32},
        template="qwen_chat",
    )


class _PhaseClock:
    """One short line per build phase with its duration (the build is quiet otherwise, apart from tqdm bars)."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()

    def __call__(self, message: str) -> None:
        now = time.perf_counter()
        print(f"vesselnb demo: {message} ({now - self.last:.1f} s)", flush=True)
        self.last = now


def write_demo_dataset(images_dir: Path, annotations: Path, settings: DemoSettings) -> int:
    """Write the demo frames (JPEG, quality 95) and their Sa2VA-layout annotations JSON; returns the frame count."""
    frames = generate_frames(
        settings.seed, settings.n_patients, settings.sequences_per_patient, settings.frames_per_sequence, settings.size
    )
    images_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for frame in frames:
        file_name = f"{frame.name}.jpg"
        Image.fromarray(frame.image).save(images_dir / file_name, quality=95)
        records.append(annotation_record(file_name, frame.mask, DEMO_PROMPT, ANSWER))
    annotations.write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return len(frames)


def _train_models(assets: DemoAssets, settings: DemoSettings, final: DemoAssets, progress: _PhaseClock) -> None:
    """Pre-train -> base_hf; fine-tune -> iter_<short>.pth / iter_<long>.pth + reference_hf folders."""
    train = TrainSettings(pretrain_iters=settings.pretrain_iters)
    train_frames = generate_frames(
        settings.seed + 1000,
        settings.train_sequences,
        1,
        settings.train_frames_per_sequence,
        settings.size,
        prefix="Train_Case",
    )
    tokenizer = build_demo_tokenizer()
    model = Sa2VADemoChatModel(_demo_config(tokenizer))
    data = prepare_training_set(model, train_frames, train.coarse_dilation)
    progress(f"{len(train_frames)} training frames")
    pretrain(model, tokenizer, data, train, settings.seed)
    save_hf_folder(model, tokenizer, assets.base_model)
    progress(f"pre-training ({train.pretrain_iters} iterations) -> base_hf")

    config_text = training_config_text(
        final.base_model, final.root / "data" / "train", train, settings.long_iters, settings.short_iters
    )
    assets.training_config.parent.mkdir(parents=True)
    assets.training_config.write_text(config_text, encoding="utf-8")

    base = Sa2VADemoChatModel.from_pretrained(assets.base_model, dtype=torch.float32)
    wrap_for_finetuning(base, train)
    assets.work_dir.mkdir(parents=True)
    names = {n: key for key, n in (("short", settings.short_iters), ("long", settings.long_iters))}

    def on_save(iteration: int, trained: Sa2VADemoChatModel, losses: list[float]) -> None:
        key = names[iteration]
        save_training_checkpoint(
            assets.checkpoints[key], trained, iteration, settings.long_iters, settings.seed, config_text, losses
        )
        save_hf_folder(merged_copy(trained), tokenizer, assets.reference_hf[key])

    finetune(base, tokenizer, data, train, settings.seed, sorted(names), on_save)
    progress(f"fine-tuning ({settings.long_iters} iterations) -> checkpoints + reference_hf")
    (assets.work_dir / "last_checkpoint").write_text(str(final.checkpoints["long"]), encoding="utf-8")


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def ensure_demo_assets(root: str | Path, settings: DemoSettings | None = None) -> DemoAssets:
    """Build the demo under ``root`` unless a complete build with the same settings is already there.

    Deterministic: the same settings give the same images, annotations and weights. Takes ~40 s of one CPU core
    with the defaults (most of it fine-tuning); a second call with the same settings returns at once.
    """
    root = Path(root).resolve()
    settings = settings or DemoSettings()
    final = _paths(root, settings)
    if _read_marker(root) == {"settings": asdict(settings)}:
        return final
    root.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(root):
        if _read_marker(root) == {"settings": asdict(settings)}:  # another process finished it while we waited
            return final
        if root.exists() and any(root.iterdir()) and not (root / OWNER_MARKER).exists():
            raise VesselnbError(
                f"{root}: exists and is not a vesselnb demo folder; choose an empty or new folder for the demo assets"
            )
        building = root.parent / f".{root.name}.building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        try:
            _build(building, settings, final)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        if root.exists():
            shutil.rmtree(root)
        os.replace(building, root)
    return final


@contextmanager
def _build_lock(root: Path) -> Iterator[None]:
    """Serialise builds of one folder across processes (two pytest sessions sharing ``VESSELNB_TEST_DEMO_DIR``)."""
    lock_path = root.parent / f".{root.name}.lock"
    with open(lock_path, "w") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; concurrent builds of one folder are the caller's problem
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(building: Path, settings: DemoSettings, final: DemoAssets) -> None:
    """The whole build into ``building`` (paths written into files name ``final``), marker last."""
    progress = _PhaseClock()
    building.mkdir(parents=True)
    (building / OWNER_MARKER).write_text("built by vesselnb.demo.ensure_demo_assets\n", encoding="utf-8")
    staged = _paths(building, settings)
    print(f"vesselnb demo: building into {final.root} ...", flush=True)
    n_frames = write_demo_dataset(staged.images_dir, staged.annotations, settings)
    progress(f"{n_frames} demo frames + annotations")
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(settings.seed)
            torch.set_num_threads(1)  # tiny tensors: threads only add overhead; one thread = same bytes everywhere
            _train_models(staged, settings, final, progress)
    finally:
        torch.set_num_threads(threads)
    (building / MARKER).write_text(json.dumps({"settings": asdict(settings)}), encoding="utf-8")
    print(f"vesselnb demo: done in {time.perf_counter() - progress.started:.1f} s", flush=True)


def demo_settings(assets: DemoAssets) -> DemoSettings:
    """The settings a finished demo folder was built with (from its ``.complete`` marker)."""
    return DemoSettings(**json.loads((assets.root / MARKER).read_text(encoding="utf-8"))["settings"])


def demo_raster_masks(assets: DemoAssets) -> dict[str, np.ndarray]:
    """``{frame stem: raster vessel mask}`` regenerated from the seeds - for tests of the polygon annotations only.

    The pipeline never uses this: the analysis stage reads ground truth from ``annotations.json`` like user data.
    """
    settings = demo_settings(assets)
    frames = generate_frames(
        settings.seed, settings.n_patients, settings.sequences_per_patient, settings.frames_per_sequence, settings.size
    )
    return {frame.name: frame.mask for frame in frames}
