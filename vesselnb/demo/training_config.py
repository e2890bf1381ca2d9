"""The demo's training config file, written in the xtuner/mmengine style of real Sa2VA configs.

It imports xtuner, mmengine and Sa2VA's ``projects`` package, none of which are installed here: like a user's real
config, it can only be *parsed* (the converter reads ``path``, ``template``, ``special_tokens`` and the LoRA
settings from its syntax tree), never executed.
"""

from __future__ import annotations

from pathlib import Path

from vesselnb.demo.tokenizer import SPECIAL_TOKENS
from vesselnb.demo.train import LORA_TARGET_MODULES, MODULES_TO_SAVE, TrainSettings

SA2VA_ADDED_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]


def training_config_text(
    base_model: Path, data_root: Path, settings: TrainSettings, max_iters: int, save_steps: int
) -> str:
    """Python source of ``configs/sa2va_demo_vessel.py`` (values match what the demo training really used)."""
    assert all(token in SPECIAL_TOKENS for token in SA2VA_ADDED_TOKENS)
    return f"""# Demo training config written by vesselnb (tiny Sa2VA-shaped demo model, synthetic angiograms).
# Same shape as a real Sa2VA fine-tuning config: it imports xtuner/mmengine/projects and cannot run here.
from mmengine.hooks import (CheckpointHook, DistSamplerSeedHook, IterTimerHook,
                            LoggerHook, ParamSchedulerHook)
from mmengine.optim import AmpOptimWrapper, CosineAnnealingLR, LinearLR
from torch.optim import AdamW
from transformers import AutoTokenizer

from xtuner.dataset.samplers import LengthGroupedSampler
from xtuner.engine.runner import TrainLoop
from xtuner.utils import PROMPT_TEMPLATE

from third_parts.mmdet.models.losses import DiceLoss, CrossEntropyLoss
from peft import LoraConfig

from projects.sa2va.models import Sa2VAModel, SAM2TrainRunner, DirectResize, InternVLMLLM
from projects.sa2va.datasets import sa2va_collect_fn, Sa2VAFinetuneDataset

#######################################################################
#                          PART 1  Settings                           #
#######################################################################
# Model
path = {str(base_model)!r}
pretrained_pth = None

# Data
template = 'qwen_chat'
prompt_template = PROMPT_TEMPLATE.qwen_chat
max_length = 512

# Scheduler & Optimizer
batch_size = {settings.batch_size}  # per_device
accumulative_counts = 1
dataloader_num_workers = 0
max_iters = {max_iters}
optim_type = AdamW
lr = {settings.finetune_lr!r}
betas = (0.9, 0.999)
weight_decay = 0.0
max_norm = 1  # grad clip
warmup_ratio = {settings.warmup_ratio!r}

# Save
save_steps = {save_steps}
save_total_limit = -1

special_tokens = {SA2VA_ADDED_TOKENS!r}

tokenizer = dict(
    type=AutoTokenizer.from_pretrained,
    pretrained_model_name_or_path=path,
    trust_remote_code=True,
    padding_side='right')

extra_image_processor = dict(
    type=DirectResize,
    target_length=128,
)

#######################################################################
#            PART 2  Model & Tokenizer & Image Processor              #
#######################################################################
model = dict(
    type=Sa2VAModel,
    special_tokens=special_tokens,
    pretrained_pth=pretrained_pth,
    frozen_sam2_decoder=False,
    mllm=dict(
        type=InternVLMLLM,
        model_path=path,
        freeze_llm=True,
        freeze_visual_encoder=True,
        llm_lora=dict(
            type=LoraConfig,
            r={settings.lora_r},
            lora_alpha={settings.lora_alpha},
            lora_dropout={settings.lora_dropout!r},
            bias='none',
            target_modules={LORA_TARGET_MODULES!r},
            task_type='CAUSAL_LM',
            modules_to_save={MODULES_TO_SAVE!r}),
    ),
    tokenizer=tokenizer,
    grounding_encoder=dict(
        type=SAM2TrainRunner,
    ),
    loss_mask=dict(
        type=CrossEntropyLoss,
        use_sigmoid=True,
        reduction='mean',
        loss_weight=2.0),
    loss_dice=dict(
        type=DiceLoss,
        use_sigmoid=True,
        activate=True,
        reduction='mean',
        naive_dice=True,
        eps=1.0,
        loss_weight=0.5)
)

#######################################################################
#                      PART 3  Dataset & Dataloader                   #
#######################################################################
# The demo's training frames are generated in memory (vesselnb.demo.synth, training seed); this is where a
# real config points at its images/ and annotations.json.
DATA_ROOT = {str(data_root)!r}

train_dataset = dict(
    type=Sa2VAFinetuneDataset,
    name='DemoVesselSegmentation',
    data_root=DATA_ROOT,
    data_prefix=dict(img_path='images/'),
    ann_file='annotations.json',
    tokenizer=tokenizer,
    special_tokens=special_tokens,
    extra_image_processor=extra_image_processor,
    prompt_template=prompt_template,
    max_length=max_length,
)

train_dataloader = dict(
    batch_size=batch_size,
    num_workers=dataloader_num_workers,
    dataset=train_dataset,
    sampler=dict(
        type=LengthGroupedSampler,
        length_property='modality_length',
        per_device_batch_size=batch_size * accumulative_counts),
    collate_fn=dict(type=sa2va_collect_fn)
)

#######################################################################
#                    PART 4  Scheduler & Optimizer                    #
#######################################################################
optim_wrapper = dict(
    type=AmpOptimWrapper,
    optimizer=dict(type=optim_type, lr=lr, betas=betas, weight_decay=weight_decay),
    clip_grad=dict(max_norm=max_norm, error_if_nonfinite=False),
    accumulative_counts=accumulative_counts,
    loss_scale='dynamic',
    dtype='bfloat16'
)

param_scheduler = [
    dict(
        type=LinearLR,
        start_factor=1e-3,
        by_epoch=False,
        begin=0,
        end=int(warmup_ratio * max_iters)),
    dict(
        type=CosineAnnealingLR,
        eta_min=0.0,
        by_epoch=False,
        begin=int(warmup_ratio * max_iters),
        end=max_iters)
]

train_cfg = dict(type=TrainLoop, max_iters=max_iters)

#######################################################################
#                           PART 5  Runtime                           #
#######################################################################
custom_hooks = []

default_hooks = dict(
    timer=dict(type=IterTimerHook),
    logger=dict(type=LoggerHook, log_metric_by_epoch=False, interval=10),
    param_scheduler=dict(type=ParamSchedulerHook),
    checkpoint=dict(
        type=CheckpointHook,
        save_optimizer=False,
        by_epoch=False,
        interval=save_steps,
        max_keep_ckpts=save_total_limit),
    sampler_seed=dict(type=DistSamplerSeedHook),
)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)

visualizer = None
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=None, deterministic=False)
log_processor = dict(by_epoch=False)
"""
