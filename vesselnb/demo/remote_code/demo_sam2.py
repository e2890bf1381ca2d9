"""The demo model's SAM2-shaped grounding encoder: a tiny conv segmenter conditioned on the ``[SEG]`` embedding.

Module names follow Sa2VA's ``grounding_encoder.sam2_model.*`` (``image_encoder``, ``memory_encoder``,
``sam_mask_decoder``) so converters and weight diffs see the same key families as with a real checkpoint. The
memory encoder's layer-scale parameter is called ``g_weight`` here, as in Sa2VA's HF folders; Sa2VA's training
code calls it ``gamma`` (transformers would rename a ``gamma`` key on load), which is why converters rename it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DemoImageEncoder(nn.Module):
    """Two-scale conv features: ``low`` at the input resolution (thin vessels) and ``high`` at half (context)."""

    def __init__(self, low_channels: int, high_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, low_channels, 3, padding=1), nn.GELU(), nn.Conv2d(low_channels, low_channels, 3, padding=1)
        )
        self.down = nn.Sequential(
            nn.Conv2d(low_channels, high_channels, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(high_channels, high_channels, 3, padding=2, dilation=2),
        )

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low = F.gelu(self.stem(pixels))
        return low, F.gelu(self.down(low))


class DemoFuserLayer(nn.Module):
    """A ConvNeXt-like block with a layer-scale vector, like SAM2's memory-encoder fuser layer."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 7, padding=3, groups=channels)
        self.pwconv = nn.Conv2d(channels, channels, 1)
        self.g_weight = nn.Parameter(torch.full((channels,), 0.1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        update = self.pwconv(F.gelu(self.dwconv(features)))
        return features + self.g_weight.view(1, -1, 1, 1) * update


class DemoFuser(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([DemoFuserLayer(channels)])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            features = layer(features)
        return features


class DemoMemoryEncoder(nn.Module):
    """Only the fuser of SAM2's memory encoder, applied to every frame's context features."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fuser = DemoFuser(channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fuser(features)


class DemoMaskDecoder(nn.Module):
    """Mask logits from image features, modulated (FiLM) by the projected ``[SEG]`` embedding.

    The context features are conditioned and processed at half resolution, then added to the full-resolution
    features that keep 1-2 px vessels; all the heavy work stays small enough to train in seconds on a CPU.
    """

    def __init__(self, low_channels: int, high_channels: int, seg_dim: int) -> None:
        super().__init__()
        self.film = nn.Linear(seg_dim, 2 * high_channels)
        self.context = nn.Conv2d(high_channels, high_channels, 3, padding=1)
        self.lift = nn.Conv2d(high_channels, low_channels, 1)
        self.fuse = nn.Conv2d(low_channels, low_channels, 3, padding=1)
        self.mask_head = nn.Conv2d(low_channels, 1, 1)

    def forward(self, low: torch.Tensor, high: torch.Tensor, seg_embedding: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(seg_embedding).chunk(2, dim=-1)
        high = high * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        high = self.lift(F.gelu(self.context(F.gelu(high))))
        high = F.interpolate(high, size=low.shape[-2:], mode="nearest")
        return self.mask_head(F.gelu(self.fuse(low + high)))[:, 0]


class DemoSAM2(nn.Module):
    """SAM2 stand-in: ``image_encoder`` stays frozen in fine-tuning; ``sam_mask_decoder`` trains."""

    def __init__(self, image_size: int, low_channels: int, high_channels: int, seg_dim: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.image_encoder = DemoImageEncoder(low_channels, high_channels)
        self.memory_encoder = DemoMemoryEncoder(high_channels)
        self.sam_mask_decoder = DemoMaskDecoder(low_channels, high_channels, seg_dim)

    def preprocess(self, frames_uint8: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(T, H, W, 3) uint8 -> (T, 3, S, S) normalised pixels (direct resize, /255, ImageNet mean/std)."""
        pixels = frames_uint8.permute(0, 3, 1, 2).float() / 255.0
        pixels = F.interpolate(pixels, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return ((pixels - mean) / std).to(dtype)

    def encode_image(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, 3, S, S) pixels -> (low, high) image features (the frozen part; fine-tuning may cache it)."""
        return self.image_encoder(pixels)

    def decode(self, low: torch.Tensor, high: torch.Tensor, seg_embedding: torch.Tensor) -> torch.Tensor:
        """Image features + (T, D) or (1, D) seg embeddings -> (T, S, S) mask logits."""
        high = self.memory_encoder(high)
        if seg_embedding.shape[0] != low.shape[0]:
            seg_embedding = seg_embedding.expand(low.shape[0], -1)
        return self.sam_mask_decoder(low, high, seg_embedding)

    def mask_logits(self, pixels: torch.Tensor, seg_embedding: torch.Tensor) -> torch.Tensor:
        """(T, 3, S, S) pixels + (T, D) or (1, D) seg embeddings -> (T, S, S) mask logits."""
        return self.decode(*self.encode_image(pixels), seg_embedding)


class DemoGroundingEncoder(nn.Module):
    """Holds ``sam2_model`` so keys read ``grounding_encoder.sam2_model.*`` as in Sa2VA, with Sa2VA's two inference
    entry points: ``get_sam2_embeddings`` (frames -> state) and ``language_embd_inference`` (state + one ``[SEG]``
    embedding per prompted frame -> ``(frames, 1, S, S)`` fp32 mask logits for every frame), so vesselnb's logit
    capture meets the demo exactly where it meets upstream."""

    def __init__(self, image_size: int, low_channels: int, high_channels: int, seg_dim: int) -> None:
        super().__init__()
        self.sam2_model = DemoSAM2(image_size, low_channels, high_channels, seg_dim)

    def get_sam2_embeddings(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """(T, 3, S, S) preprocessed frames -> the inference state (the frozen image features)."""
        storage_device = torch.device("cuda")  # upstream's init_state names CUDA outright, as here
        low, high = self.sam2_model.encode_image(pixels)
        return {"low": low.to(storage_device), "high": high.to(storage_device)}

    def language_embd_inference(self, state: dict[str, torch.Tensor], language_embd: list) -> torch.Tensor:
        """Mask logits for every frame of ``state``; as upstream, the ``[SEG]`` embedding given for the first
        prompted frame conditions them all (upstream propagates it through SAM2's memory)."""
        seg_embedding = language_embd[0].reshape(1, -1)
        return self.sam2_model.decode(state["low"], state["high"], seg_embedding).float()[:, None]
