"""Configuration of the tiny Sa2VA *demo* model built by vesselnb (not Sa2VA weights, not a real segmenter).

The layout mirrors ``Sa2VAChatConfig``: a vision part, an ``llm_config`` dict (a Qwen2 config whose ``vocab_size``
equals ``len(tokenizer)``), ``template``, ``downsample_ratio``; plus the SAM2-like grounding sizes and two switches
that let tests provoke the failure modes users meet with real checkpoints.
"""

from __future__ import annotations

from transformers import PretrainedConfig

DEMO_NOTICE = "vesselnb tiny synthetic demo model: Sa2VA-shaped, trained in seconds on synthetic angiograms"


class Sa2VADemoChatConfig(PretrainedConfig):
    """Config of :class:`Sa2VADemoChatModel` (a demo stand-in for ``Sa2VAChatConfig``).

    ``demo_behaviour``: ``"normal"`` or ``"no_seg"`` (generation never emits ``[SEG]``, so no mask is returned, as
    with an under-trained checkpoint). ``demo_fail_on_size``: ``[w, h]`` or ``None``; an image of that size raises
    ``RuntimeError`` (a stand-in for a CUDA OOM / shape error on one frame).
    """

    model_type = "sa2va_demo"

    def __init__(
        self,
        vision_config: dict | None = None,
        llm_config: dict | None = None,
        grounding_config: dict | None = None,
        template: str = "qwen_chat",
        force_image_size: int = 64,
        downsample_ratio: float = 0.5,
        max_new_tokens: int = 16,
        demo_behaviour: str = "normal",
        demo_fail_on_size: list[int] | None = None,
        demo_notice: str = DEMO_NOTICE,
        **kwargs,
    ) -> None:
        self.vision_config = dict(vision_config or {"patch_size": 8, "hidden_size": 32})
        self.llm_config = dict(llm_config or {})
        self.grounding_config = dict(
            grounding_config or {"image_size": 128, "low_channels": 16, "high_channels": 32, "seg_dim": 32}
        )
        self.template = template
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.max_new_tokens = max_new_tokens
        if demo_behaviour not in ("normal", "no_seg"):
            raise ValueError(f"demo_behaviour must be 'normal' or 'no_seg', not {demo_behaviour!r}")
        self.demo_behaviour = demo_behaviour
        self.demo_fail_on_size = list(demo_fail_on_size) if demo_fail_on_size else None
        self.demo_notice = demo_notice
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
