"""Writing the demo's model files: HF folders (remote code + tokenizer + bf16 shards) and Sa2VA training checkpoints.

Training checkpoint layout (what mmengine + DeepSpeed write for Sa2VA, see ``/work/shared/sa2va_facts.md`` §2, §8):
``torch.save({"state_dict": {...}, "meta": {...}, "message_hub": {...}})`` with only the trained tensors, in bf16,
under training names - ``mllm.model.`` before vision/LLM/mlp1 keys, peft's ``base_model.model.`` and ``.default``
adapter names inside the LLM, SAM2's ``gamma`` (HF: ``g_weight``). ``meta`` holds a ``torch.torch_version.TorchVersion``
(so ``torch.load(weights_only=True)`` needs it allow-listed, as with real files). Real checkpoints keep mmengine
``HistoryBuffer`` objects in ``message_hub``; mmengine is not installed here, so the demo stores plain dicts/floats.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from vesselnb.demo.remote_code import remote_code_files
from vesselnb.demo.remote_code.modeling_sa2va_demo import Sa2VADemoChatModel

AUTO_MAP = {
    "AutoConfig": "configuration_sa2va_demo.Sa2VADemoChatConfig",
    "AutoModel": "modeling_sa2va_demo.Sa2VADemoChatModel",
    "AutoModelForCausalLM": "modeling_sa2va_demo.Sa2VADemoChatModel",
}
MLLM_PREFIXES = ("vision_model.", "language_model.", "mlp1.")
SHARD_SIZE = "100KB"  # several shards + an index, like real Sa2VA folders
FIXED_TIME = "20250101_120000"  # mmengine stores the save time; fixed so two builds give identical bytes


def save_hf_folder(model: Sa2VADemoChatModel, tokenizer, folder: Path) -> None:
    """``save_pretrained`` in bf16 (sharded, safetensors) + tokenizer + every remote-code file + ``auto_map``.

    Casts ``model`` to bf16 in place (callers save throw-away copies or reload the folder afterwards).
    """
    folder.mkdir(parents=True, exist_ok=True)
    model.config.auto_map = dict(AUTO_MAP)
    model.config.vocab_size = len(tokenizer)
    model.config.llm_config["vocab_size"] = len(tokenizer)
    bf16_model = model.to(torch.bfloat16)
    bf16_model.save_pretrained(folder, safe_serialization=True, max_shard_size=SHARD_SIZE)
    tokenizer.save_pretrained(folder)
    for source in remote_code_files():
        shutil.copyfile(source, folder / source.name)


def training_key(hf_name: str) -> str:
    """HF-model parameter name (peft-wrapped while training) -> the name Sa2VA's training checkpoint uses."""
    name = "mllm.model." + hf_name if hf_name.startswith(MLLM_PREFIXES) else hf_name
    return name[: -len(".g_weight")] + ".gamma" if name.endswith(".g_weight") else name


def trained_state_dict(model: Sa2VADemoChatModel) -> dict[str, torch.Tensor]:
    """Only the trainable tensors, bf16, under training names (Sa2VA's ``state_dict`` override keeps just those)."""
    return {
        training_key(name): parameter.detach().to(torch.bfloat16).clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def save_training_checkpoint(
    path: Path,
    model: Sa2VADemoChatModel,
    iteration: int,
    max_iters: int,
    seed: int,
    config_text: str,
    losses: list[float],
) -> None:
    """Write ``iter_N.pth`` in the mmengine layout ``{state_dict, meta, message_hub}``."""
    meta = {
        "cfg": config_text,
        "seed": seed,
        "experiment_name": path.parent.name,
        "time": FIXED_TIME,
        "mmengine_version": "0.10.7",
        "torch_version": torch.__version__,  # a TorchVersion object, like the env info mmengine records
        "epoch": 0,
        "iter": iteration,
        "dataset_meta": None,
    }
    message_hub = {
        "log_scalars": {"train/loss": {"data": [float(x) for x in losses[-10:]], "count": len(losses)}},
        "runtime_info": {"iter": iteration, "epoch": 0, "max_iters": max_iters},
        "resumed_keys": {"iter": True, "epoch": True},
    }
    torch.save({"state_dict": trained_state_dict(model), "meta": meta, "message_hub": message_hub}, path)
