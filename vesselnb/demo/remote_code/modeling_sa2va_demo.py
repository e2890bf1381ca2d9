"""The tiny Sa2VA *demo* model: Sa2VA's structure and ``predict_forward`` contract at a few hundred thousand weights.

Built by vesselnb from synthetic angiograms in seconds so that the notebooks, the converter and the analysis can be
exercised end to end without downloading a real checkpoint. It is not Sa2VA and not a clinical segmenter.

What it shares with Sa2VA's HF remote code (what the rest of vesselnb relies on): the state-dict key families
(``vision_model.*``, ``mlp1.{0,1,3}``, ``language_model.model.*`` / ``language_model.lm_head.weight``,
``grounding_encoder.sam2_model.*``, ``text_hidden_fcs.{0,2}``); ``<image>`` expanding to ``<img>`` +
``<IMG_CONTEXT>`` x N + ``</img>`` inside the chat template; a bare ``AssertionError`` when an image is given but the
prompt has no ``<image>``; greedy generation whose ``[SEG]`` hidden states prompt the mask decoder; masks resized
to the input's size and thresholded at 0.5; special tokens kept in ``prediction``; pixels cast to the dtype set by
``preparing_for_generation`` (bf16 unless told otherwise, as upstream, so an fp32 model must be prepared with
``torch_dtype=torch.float32`` first).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from .configuration_sa2va_demo import Sa2VADemoChatConfig
from .demo_sam2 import IMAGENET_MEAN, IMAGENET_STD, DemoGroundingEncoder
from .demo_templates import PROMPT_TEMPLATES

IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
SEG_TOKEN = "[SEG]"
MAX_LLM_FRAMES = 5  # as upstream: only the first five video frames are shown to the language model


class DemoVisionLayer(nn.Module):
    """A residual conv block standing in for one InternViT layer."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(1, channels)
        self.mlp = nn.Sequential(nn.Conv2d(channels, 2 * channels, 1), nn.GELU(), nn.Conv2d(2 * channels, channels, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.mlp(self.norm1(features))


class DemoVisionEncoder(nn.Module):
    """Patch embedding + one layer, keys ``vision_model.embeddings.*`` / ``vision_model.encoder.layers.N.*``."""

    def __init__(self, patch_size: int, hidden_size: int) -> None:
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(3, hidden_size, patch_size, stride=patch_size)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([DemoVisionLayer(hidden_size)])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.embeddings.patch_embedding(pixel_values)
        for layer in self.encoder.layers:
            features = layer(features)
        return features


class Sa2VADemoChatModel(PreTrainedModel):
    """Demo stand-in for ``Sa2VAChatModel`` (see the module docstring for what it mirrors)."""

    config_class = Sa2VADemoChatConfig
    base_model_prefix = "sa2va_demo"
    main_input_name = "pixel_values"
    _no_split_modules = ["Qwen2DecoderLayer", "DemoVisionLayer", "DemoSAM2"]

    def __init__(self, config: Sa2VADemoChatConfig) -> None:
        super().__init__(config)
        vision = config.vision_config
        llm_config = Qwen2Config(**config.llm_config)
        llm_config._attn_implementation = "eager"
        hidden = llm_config.hidden_size
        shuffled = int(vision["hidden_size"] / config.downsample_ratio**2)
        grid = config.force_image_size // vision["patch_size"]
        self.num_image_token = int((grid * config.downsample_ratio) ** 2)
        self.template = config.template

        self.vision_model = DemoVisionEncoder(vision["patch_size"], vision["hidden_size"])
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(shuffled), nn.Linear(shuffled, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )
        self.language_model = Qwen2ForCausalLM(llm_config)
        grounding = config.grounding_config
        self.grounding_encoder = DemoGroundingEncoder(
            grounding["image_size"], grounding["low_channels"], grounding["high_channels"], grounding["seg_dim"]
        )
        self.text_hidden_fcs = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, grounding["seg_dim"])
        )
        self.init_prediction_config = False
        self.torch_dtype = torch.bfloat16
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Keep torch's (seeded) default initialisation; every demo folder ships all weights anyway."""

    # --- pieces shared by training (vesselnb.demo.train) and predict_forward ------------------------------------
    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) pixels -> (B, num_image_token, hidden) image embeddings (pixel shuffle, then ``mlp1``)."""
        features = self.vision_model(pixel_values)
        features = F.pixel_unshuffle(features, round(1 / self.config.downsample_ratio))
        return self.mlp1(features.flatten(2).transpose(1, 2))

    def input_embeddings(self, input_ids: torch.Tensor, vit_embeds: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the ``<IMG_CONTEXT>`` rows replaced by image embeddings (in order)."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if vit_embeds is None:
            return embeds
        selected = input_ids == self.img_context_token_id
        assert selected.sum() != 0  # as upstream: an image without '<image>' in the prompt fails here
        embeds = embeds.clone()
        embeds[selected] = vit_embeds.reshape(-1, vit_embeds.shape[-1]).to(embeds.dtype)
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
    ):
        """Language-model pass with image embeddings spliced in (training and teacher forcing)."""
        vit_embeds = self.extract_feature(pixel_values) if pixel_values is not None else None
        return self.language_model(
            inputs_embeds=self.input_embeddings(input_ids, vit_embeds),
            attention_mask=attention_mask,
            labels=labels,
            output_hidden_states=output_hidden_states,
        )

    def vision_pixels(self, frames_uint8: torch.Tensor) -> torch.Tensor:
        """(T, H, W, 3) uint8 -> (T, 3, s, s) pixels for ``vision_model`` (direct resize, ImageNet norm)."""
        size = self.config.force_image_size
        pixels = frames_uint8.permute(0, 3, 1, 2).float() / 255.0
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (pixels - mean) / std

    # --- inference, upstream-compatible ---------------------------------------------------------------------------
    def preparing_for_generation(
        self, tokenizer, max_new_tokens: int | None = None, torch_dtype=torch.bfloat16
    ) -> None:
        """Remember token ids, stop words and the pixel dtype (upstream defaults to bf16, so do we)."""
        template = PROMPT_TEMPLATES[self.template]
        self.instruction = template["INSTRUCTION"]
        self.stop_token_ids = [tokenizer.convert_tokens_to_ids(word) for word in template["STOP_WORDS"]]
        self.seg_token_idx = tokenizer.convert_tokens_to_ids(SEG_TOKEN)
        self.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        self.max_new_tokens = max_new_tokens or self.config.max_new_tokens
        self.torch_dtype = torch_dtype
        self.init_prediction_config = True

    def _frames(self, image, video) -> list:
        if image is not None and video is not None:
            raise ValueError("give either image or video, not both")
        frames = [image] if image is not None else list(video or [])
        fail_size = self.config.demo_fail_on_size
        for frame in frames:
            if fail_size and list(frame.size) == list(fail_size):
                raise RuntimeError(f"demo model configured to fail on images of size {frame.size} (demo_fail_on_size)")
        return frames

    @torch.no_grad()
    def _greedy_generate(self, input_ids: torch.Tensor, vit_embeds: torch.Tensor | None) -> torch.Tensor:
        """Greedy decoding (no cache: sequences are a few dozen tokens). Returns prompt + generated ids.

        Only this step carries ``@torch.no_grad()``, as upstream decorates only ``generate``: the hidden-state pass,
        ``text_hidden_fcs`` and the SAM2 path of :meth:`predict_forward` run with autograd on unless the caller
        guards the call, so the demo shows the memory cost of an unguarded call as upstream does.
        """
        ids = input_ids
        for _ in range(self.max_new_tokens):
            logits = self.language_model(inputs_embeds=self.input_embeddings(ids, vit_embeds)).logits[0, -1].float()
            if self.config.demo_behaviour == "no_seg":
                logits[self.seg_token_idx] = float("-inf")
            next_id = int(logits.argmax())
            ids = torch.cat([ids, torch.tensor([[next_id]], device=ids.device)], dim=1)
            if next_id in self.stop_token_ids:
                break
        return ids

    def predict_forward(
        self,
        image=None,
        video=None,
        text: str | None = None,
        past_text: str = "",
        mask_prompts=None,
        tokenizer=None,
        processor=None,
    ) -> dict:
        """Answer ``text`` about an image (PIL) or a video (list of PIL); one mask stack (T, H, W) per ``[SEG]``.

        As upstream: thresholded masks only (``sigmoid > 0.5`` of the logits resized bilinearly to the size of the
        image or of the first video frame); the soft map is not returned.
        """
        if not self.init_prediction_config:
            self.preparing_for_generation(tokenizer)
        if mask_prompts is not None:
            raise NotImplementedError("the demo model has no visual-prompt (mask_prompts) support")
        frames = self._frames(image, video)
        device = self.device
        text = text or ""
        pixel_values = None
        if frames:
            arrays = [torch.from_numpy(np.array(frame.convert("RGB"))) for frame in frames]
            llm_frames = arrays[:MAX_LLM_FRAMES]
            pixel_values = torch.cat([self.vision_pixels(a[None]) for a in llm_frames]).to(device, self.torch_dtype)
            block = "".join(
                f"{IMG_START_TOKEN}{IMG_CONTEXT_TOKEN * self.num_image_token}{IMG_END_TOKEN}\n" for _ in llm_frames
            )
            text = text.replace("<image>", block)
        prompt = past_text + self.instruction.format(input=text)
        # Upstream's idiom, kept on purpose: the ids go to the GPU with a bare ``.cuda()`` (on a CPU a caller needs
        # vesselnb's CUDA shim, exactly as with the real code).
        input_ids = torch.tensor(tokenizer.encode(prompt, add_special_tokens=False)).cuda().unsqueeze(0)
        vit_embeds = self.extract_feature(pixel_values) if pixel_values is not None else None
        ids = self._greedy_generate(input_ids, vit_embeds)
        generated = ids[0, input_ids.shape[1] :]
        prediction = tokenizer.decode(generated, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        result: dict = {"prediction": prediction, "prediction_masks": []}
        seg_positions = (generated == self.seg_token_idx).nonzero()[:, 0] + input_ids.shape[1]
        if not frames or len(seg_positions) == 0:
            return result

        hidden = self.language_model(
            inputs_embeds=self.input_embeddings(ids, vit_embeds), output_hidden_states=True
        ).hidden_states[-1][0, seg_positions]
        seg_embeddings = self.text_hidden_fcs(hidden)
        sam2 = self.grounding_encoder.sam2_model
        sam_pixels = torch.cat([sam2.preprocess(a[None], self.torch_dtype) for a in arrays]).cuda()
        height, width = arrays[0].shape[:2]
        num_frames = len(llm_frames)
        for seg_embedding in seg_embeddings:
            # As upstream: SAM2's mask path under a CUDA bf16 autocast (a no-op on a CPU unless a shim maps it).
            with torch.autocast("cuda", dtype=torch.bfloat16):
                state = self.grounding_encoder.get_sam2_embeddings(sam_pixels)
                pred_masks = self.grounding_encoder.language_embd_inference(state, [seg_embedding[None]] * num_frames)
            masks = F.interpolate(pred_masks, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
            result["prediction_masks"].append((masks.sigmoid() > 0.5).cpu().numpy())
        return result
