"""Chat templates of the tiny demo model (the subset of Sa2VA's ``templates.py`` the demo needs).

``config.json`` names one of these keys in ``template``, as a converted Sa2VA folder does.
"""

PROMPT_TEMPLATES: dict[str, dict[str, object]] = {
    "qwen_chat": {
        "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "STOP_WORDS": ["<|im_end|>", "<|endoftext|>"],
    },
    "internlm2_chat": {
        "INSTRUCTION": "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "STOP_WORDS": ["<|im_end|>"],
    },
}
