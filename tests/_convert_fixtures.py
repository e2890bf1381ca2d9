"""Small real models for the conversion tests: a remote-code Sa2VA-like HF folder and training checkpoints.

The base folder is a real ``transformers`` model with remote code (``auto_map``), a Qwen2 language model, a
tokenizer with ``[SEG]``, and the Sa2VA key layout. Training checkpoints are made as xtuner does: peft LoRA on the
language model (``.default`` adapter, ``modules_to_save`` copies), keys prefixed ``mllm.model.``, bf16, in an
mmengine dict with ``meta`` (a ``TorchVersion``) and ``message_hub`` (an mmengine ``HistoryBuffer``).
"""

from __future__ import annotations

import json
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CONFIG_PY = """
from transformers import PretrainedConfig, Qwen2Config


class TinySa2VAConfig(PretrainedConfig):
    model_type = "tiny_sa2va"

    def __init__(self, llm_config=None, vision_hidden=16, template=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(llm_config, Qwen2Config):
            llm_config = Qwen2Config(**(llm_config or {}))
        self.llm_config = llm_config
        self.vision_hidden = vision_hidden
        self.template = template

    def to_dict(self):
        output = super().to_dict()
        output["llm_config"] = self.llm_config.to_dict()
        return output
"""

SAM2_PY = """
import torch
from torch import nn


class Fuser(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].g_weight = nn.Parameter(torch.full((dim,), 0.1))


class MemoryEncoder(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fuser = Fuser(dim)


class SAM2Model(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.image_encoder = nn.Linear(dim, dim)
        self.memory_encoder = MemoryEncoder(dim)
        self.sam_mask_decoder = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))


class TinySAM2(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.sam2_model = SAM2Model(dim)
"""

MODELING_PY = """
from torch import nn
from transformers import PreTrainedModel, Qwen2ForCausalLM

from .configuration_tiny_sa2va import TinySa2VAConfig
from .tiny_sam2 import TinySAM2


class TinyVision(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.embeddings = nn.Linear(dim, dim)
        self.encoder = nn.Sequential(nn.Linear(dim, dim))


class TinySa2VAModel(PreTrainedModel):
    config_class = TinySa2VAConfig
    base_model_prefix = "tiny_sa2va"
    _no_split_modules = []

    def __init__(self, config):
        super().__init__(config)
        hidden = config.llm_config.hidden_size
        vit = config.vision_hidden
        self.vision_model = TinyVision(vit)
        self.language_model = Qwen2ForCausalLM(config.llm_config)
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(4 * vit), nn.Linear(4 * vit, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.grounding_encoder = TinySAM2(8)
        self.text_hidden_fcs = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 8))
        self.post_init()

    def _init_weights(self, module):
        pass
"""

LOSSES = [2.0, 1.5, 1.25, 1.0, 0.875, 0.75, 0.7, 0.65, 0.6, 0.55]  # the message_hub's train/loss history

SPECIAL_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>", "<img>", "</img>", "<IMG_CONTEXT>", "<|im_end|>"]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

TRAINING_CONFIG_PY = """
from peft import LoraConfig
from xtuner.utils import PROMPT_TEMPLATE

path = "{base}"
pretrained_pth = None
template = "qwen_chat"
prompt_template = PROMPT_TEMPLATE.qwen_chat
special_tokens = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]
lr = 4e-5 * 2
model = dict(
    type=Sa2VAModel,
    special_tokens=special_tokens,
    mllm=dict(
        type=InternVLMLLM,
        model_path=path,
        freeze_llm=True,
        llm_lora=dict(type=LoraConfig, r={r}, lora_alpha={alpha}, lora_dropout=0.05, bias="none",
                      task_type="CAUSAL_LM"),
    ),
    pretrained_pth=pretrained_pth,
)
"""


def _tokenizer(folder: Path) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(48)}
    vocab["<unk>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>", additional_special_tokens=SPECIAL_TOKENS
    )
    fast.save_pretrained(folder)
    return len(fast)


def make_base_folder(folder: Path, seed: int = 0, hidden: int = 32, max_shard_size: str = "40KB") -> Path:
    """A real remote-code HF folder in bf16, several shards."""
    from transformers import AutoConfig, AutoModel

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "configuration_tiny_sa2va.py").write_text(CONFIG_PY)
    (folder / "modeling_tiny_sa2va.py").write_text(MODELING_PY)
    (folder / "tiny_sam2.py").write_text(SAM2_PY)
    vocab_size = _tokenizer(folder)
    config = {
        "model_type": "tiny_sa2va",
        "architectures": ["TinySa2VAModel"],
        "auto_map": {
            "AutoConfig": "configuration_tiny_sa2va.TinySa2VAConfig",
            "AutoModel": "modeling_tiny_sa2va.TinySa2VAModel",
        },
        "vision_hidden": 16,
        "template": "internlm2_chat",
        "llm_config": {
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": vocab_size,
            "tie_word_embeddings": False,
            "max_position_embeddings": 64,
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    cfg = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    torch.manual_seed(seed)
    model = AutoModel.from_config(cfg, trust_remote_code=True)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.05)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    return folder


def load_hf(folder: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModel

    return AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=dtype)


@dataclass
class TrainedCheckpoint:
    """A training checkpoint on disk and the state dict a correct conversion must produce (peft's merge)."""

    path: Path
    expected: dict[str, torch.Tensor]
    state_dict: dict[str, torch.Tensor]


def make_training_checkpoint(
    base: Path, path: Path, seed: int, r: int = 4, alpha: int = 8, layout: str = "mmengine", trained: bool = True
) -> TrainedCheckpoint:
    """Train-like perturbation of the base: LoRA on the LLM + new mlp1 / mask decoder / text_hidden_fcs."""
    from peft import LoraConfig, get_peft_model

    model = load_hf(base)
    lora = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=LORA_TARGETS,
        modules_to_save=["lm_head", "embed_tokens"],
        lora_dropout=0.0,
    )
    model.language_model = get_peft_model(model.language_model, lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            trainable = (
                "lora_" in name
                or "modules_to_save" in name
                or name.startswith(("mlp1.", "text_hidden_fcs."))
                or "sam_mask_decoder" in name
                or "fuser" in name
            )
            if trainable and trained:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
            param.copy_(param.bfloat16().float())  # what bf16 training stores, so peft's merge sees the same
    state = {}
    for name, tensor in model.state_dict().items():
        keep = (
            "lora_" in name
            or "modules_to_save" in name
            or "original_module" in name  # peft keeps the untrained copy too; the trained one must win
            or name.startswith(("mlp1.", "text_hidden_fcs."))
            or "sam_mask_decoder" in name
            or "fuser" in name
        )
        if not keep:
            continue
        key = name.replace(".g_weight", ".gamma")
        if key.startswith(("vision_model.", "language_model.", "mlp1.")):
            key = "mllm.model." + key
        state[key] = tensor.detach().to(torch.bfloat16).clone()
    model.language_model = model.language_model.merge_and_unload()
    expected = {k: v.detach().to(torch.bfloat16).clone() for k, v in model.state_dict().items()}
    _save(state, path, layout)
    return TrainedCheckpoint(path, expected, state)


def _save(state: dict[str, torch.Tensor], path: Path, layout: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "deepspeed":
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"module": state, "buffer_names": [], "global_steps": 10}, path / "mp_rank_00_model_states.pt")
        return
    if layout == "flat":
        torch.save(state, path)
        return
    # As mmengine's runner saves it: its own save_checkpoint, a live MessageHub (HistoryBuffers), numpy scalars.
    from mmengine.logging import MessageHub
    from mmengine.runner.checkpoint import save_checkpoint

    hub = MessageHub.get_instance(f"vesselnb-fixture-{uuid.uuid4().hex}")
    for step, loss in enumerate(LOSSES):
        hub.update_scalar("train/loss", loss)
        hub.update_info("iter", step + 1)
    payload = {
        "meta": {"epoch": 0, "iter": len(LOSSES), "seed": 42, "time": "20250101_120000", "cfg": "model = dict(...)",
                 "torch_version": torch.__version__},
        "state_dict": state,
        "message_hub": hub.state_dict(),
        "param_schedulers": [{"last_step": len(LOSSES), "base_values": [np.float64(2e-5)]}],
    }
    save_checkpoint(payload, str(path))


def write_training_config(path: Path, base: Path, r: int = 4, alpha: int = 8) -> Path:
    path.write_text(textwrap.dedent(TRAINING_CONFIG_PY.format(base=base, r=r, alpha=alpha)))
    return path
