"""Training of the demo model, Sa2VA style, in seconds on a CPU.

1. *Pre-training* (every module trainable) teaches the language model to answer the vessel prompt with ``[SEG]`` and
   gives the SAM2-like grounding encoder generic features: its mask targets are coarse (ground truth dilated by a few
   pixels), so the base model finds vessels but not their borders - like SAM2 before vessel fine-tuning.
2. *Fine-tuning* from the saved base folder, on a separate synthetic training set: peft LoRA on the language model
   (``modules_to_save`` copies of ``embed_tokens``/``lm_head``), ``mlp1``, the mask decoder, ``text_hidden_fcs`` and
   the memory-encoder layer scale trainable; vision model and the SAM2 image encoder frozen. Checkpoints are written
   in Sa2VA's training layout (:mod:`vesselnb.demo.checkpoints`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from scipy import ndimage
from tqdm.auto import tqdm

from vesselnb.demo.remote_code.demo_templates import PROMPT_TEMPLATES
from vesselnb.demo.remote_code.modeling_sa2va_demo import (
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    Sa2VADemoChatModel,
)
from vesselnb.demo.synth import SyntheticFrame
from vesselnb.demo.tokenizer import ANSWER, TRAINING_PROMPTS

LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODULES_TO_SAVE = ["embed_tokens", "lm_head"]


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters shared by the training code and the written training config (one source of truth)."""

    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    batch_size: int = 4
    pretrain_iters: int = 100
    pretrain_lr: float = 3e-3
    finetune_lr: float = 3e-3
    warmup_ratio: float = 0.5  # linear warm-up then cosine decay, as Sa2VA configs (LinearLR + CosineAnnealingLR)
    coarse_dilation: int = 5


@dataclass
class TrainingSet:
    """Pre-processed tensors of the training frames (the frozen parts see the same pixels every epoch)."""

    vision_pixels: torch.Tensor  # (N, 3, s, s)
    sam_pixels: torch.Tensor  # (N, 3, S, S)
    fine_targets: torch.Tensor  # (N, S, S) vessel fraction per pixel
    coarse_targets: torch.Tensor  # (N, S, S) dilated vessels (pre-training)
    features: tuple[torch.Tensor, torch.Tensor] | None = None  # frozen image-encoder output, cached for fine-tuning

    def cache_image_features(self, model: Sa2VADemoChatModel) -> None:
        """Run the (frozen) SAM2 image encoder once instead of every iteration."""
        with torch.no_grad():
            self.features = model.grounding_encoder.sam2_model.encode_image(self.sam_pixels)


def prepare_training_set(model: Sa2VADemoChatModel, frames: list[SyntheticFrame], dilation: int) -> TrainingSet:
    """Resize frames and masks to the model's input sizes once."""
    images = torch.from_numpy(np.stack([f.image for f in frames]))
    sam2 = model.grounding_encoder.sam2_model
    size = sam2.image_size
    fine = torch.from_numpy(np.stack([f.mask for f in frames]).astype(np.float32))[:, None]
    structure = ndimage.generate_binary_structure(2, 1)
    coarse_np = np.stack([ndimage.binary_dilation(f.mask, structure, iterations=dilation) for f in frames])
    coarse = torch.from_numpy(coarse_np.astype(np.float32))[:, None]
    return TrainingSet(
        vision_pixels=model.vision_pixels(images),
        sam_pixels=sam2.preprocess(images, torch.float32),
        fine_targets=F.interpolate(fine, size=(size, size), mode="area")[:, 0],
        coarse_targets=(F.interpolate(coarse, size=(size, size), mode="area")[:, 0] > 0.5).float(),
    )


def encode_conversation(model: Sa2VADemoChatModel, tokenizer, prompt: str) -> tuple[list[int], int]:
    """Token ids of prompt + answer (as upstream's template) and the number of prompt tokens (not supervised)."""
    block = f"{IMG_START_TOKEN}{IMG_CONTEXT_TOKEN * model.num_image_token}{IMG_END_TOKEN}\n"
    instruction = str(PROMPT_TEMPLATES[model.template]["INSTRUCTION"])
    prompt_ids = tokenizer.encode(instruction.format(input=prompt.replace("<image>", block)), add_special_tokens=False)
    answer_ids = tokenizer.encode(ANSWER + tokenizer.eos_token, add_special_tokens=False)
    return prompt_ids + answer_ids, len(prompt_ids)


def make_batch(
    model: Sa2VADemoChatModel, tokenizer, rng: np.random.Generator, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels, seg_positions) for random training prompts."""
    conversations = [
        encode_conversation(model, tokenizer, TRAINING_PROMPTS[i])
        for i in rng.integers(0, len(TRAINING_PROMPTS), batch_size)
    ]
    length = max(len(ids) for ids, _ in conversations)
    input_ids = torch.full((batch_size, length), tokenizer.pad_token_id)
    labels = torch.full((batch_size, length), -100)
    attention = torch.zeros((batch_size, length), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(conversations):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        attention[row, : len(ids)] = 1
    seg_positions = (input_ids == model.seg_token_idx).float().argmax(dim=1)
    return input_ids, attention, labels, seg_positions


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice, as Sa2VA's mask loss pair (CrossEntropyLoss(use_sigmoid) + DiceLoss)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    probability = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    dice = 1 - (2 * (probability * target).sum(1) + 1) / (probability.sum(1) + target.sum(1) + 1)
    return 2.0 * bce + 0.5 * dice.mean()


def training_step(
    model: Sa2VADemoChatModel,
    tokenizer,
    data: TrainingSet,
    targets: torch.Tensor,
    rng: np.random.Generator,
    batch_size: int,
) -> torch.Tensor:
    """Language-model loss on the answer + mask loss from the ``[SEG]`` hidden state (teacher forcing)."""
    index = torch.from_numpy(rng.integers(0, data.vision_pixels.shape[0], batch_size))
    input_ids, attention, labels, seg_positions = make_batch(model, tokenizer, rng, batch_size)
    outputs = model(
        input_ids=input_ids,
        pixel_values=data.vision_pixels[index],
        attention_mask=attention,
        labels=labels,
        output_hidden_states=True,
    )
    seg_hidden = outputs.hidden_states[-1][torch.arange(batch_size), seg_positions]
    seg_embedding = model.text_hidden_fcs(seg_hidden)
    sam2 = model.grounding_encoder.sam2_model
    if data.features is None:
        logits = sam2.mask_logits(data.sam_pixels[index], seg_embedding)
    else:
        logits = sam2.decode(data.features[0][index], data.features[1][index], seg_embedding)
    return outputs.loss + mask_loss(logits, targets[index])


def _run(
    model: Sa2VADemoChatModel,
    tokenizer,
    data: TrainingSet,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    settings: TrainSettings,
    iters: range,
    description: str,
    on_iter: Callable[[int, float], None] | None = None,
) -> None:
    model.train()
    for it in tqdm(iters, desc=description, leave=False):
        loss = training_step(model, tokenizer, data, targets, rng, settings.batch_size)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if on_iter is not None:
            on_iter(it + 1, float(loss.detach()))
    model.eval()


def pretrain(
    model: Sa2VADemoChatModel, tokenizer, data: TrainingSet, settings: TrainSettings, seed: int
) -> Sa2VADemoChatModel:
    """All weights trainable, coarse mask targets: yields the base model (weak, generic masks; answers [SEG])."""
    model.preparing_for_generation(tokenizer, torch_dtype=torch.float32)
    rng = np.random.default_rng([seed, 1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.pretrain_lr, weight_decay=0.0)
    _run(
        model,
        tokenizer,
        data,
        data.coarse_targets,
        optimizer,
        rng,
        settings,
        range(settings.pretrain_iters),
        "pretrain",
    )
    return model


def wrap_for_finetuning(model: Sa2VADemoChatModel, settings: TrainSettings) -> Sa2VADemoChatModel:
    """Sa2VA's fine-tuning set-up: LoRA on the LLM, trained mlp1 / mask decoder / text_hidden_fcs / layer scale."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=LORA_TARGET_MODULES,
        modules_to_save=MODULES_TO_SAVE,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model.language_model = get_peft_model(model.language_model, lora)
    sam2 = model.grounding_encoder.sam2_model
    for module in (model.mlp1, sam2.sam_mask_decoder, model.text_hidden_fcs):
        module.requires_grad_(True)
    sam2.memory_encoder.fuser.layers[0].g_weight.requires_grad_(True)
    return model


def finetune(
    model: Sa2VADemoChatModel,
    tokenizer,
    data: TrainingSet,
    settings: TrainSettings,
    seed: int,
    save_at: list[int],
    on_save: Callable[[int, Sa2VADemoChatModel, list[float]], None],
) -> None:
    """Fine-tune a LoRA-wrapped model, calling ``on_save(iteration, model, losses)`` at each of ``save_at``."""
    model.preparing_for_generation(tokenizer, torch_dtype=torch.float32)
    data.cache_image_features(model)
    rng = np.random.default_rng([seed, 2])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=settings.finetune_lr, weight_decay=0.0)
    max_iters = max(save_at)
    warmup = max(int(settings.warmup_ratio * max_iters), 1)
    schedule = torch.optim.lr_scheduler.SequentialLR(
        optimizer,
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_iters - warmup, eta_min=0.0),
        ],
        milestones=[warmup],
    )
    losses: list[float] = []

    def after_iter(iteration: int, loss: float) -> None:
        losses.append(loss)
        schedule.step()
        if iteration in save_at:
            on_save(iteration, model, losses)

    _run(model, tokenizer, data, data.fine_targets, optimizer, rng, settings, range(max_iters), "finetune", after_iter)


def merged_copy(model: Sa2VADemoChatModel) -> Sa2VADemoChatModel:
    """The directly trained model with trained tensors rounded to bf16 (as saved) and LoRA merged by peft.

    Rounding first makes this the exact answer a converter computes from the bf16 checkpoint + bf16 base folder
    (up to the bf16 rounding of the fp32 merge result).
    """
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in merged.parameters():
            if parameter.requires_grad:
                parameter.copy_(parameter.to(torch.bfloat16).float())
    merged.language_model = merged.language_model.merge_and_unload()
    merged.requires_grad_(False)
    return merged.eval()
