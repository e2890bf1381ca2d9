"""The demo model's tokenizer: a tiny word-level vocabulary with Sa2VA's special tokens.

Built with the ``tokenizers`` library and wrapped in ``PreTrainedTokenizerFast`` so ``AutoTokenizer.from_pretrained``
loads it offline. Words are split by GPT-2's byte-level pre-tokenizer (as Qwen's tokenizer does), so decoding gives
back exact spacing: the answer decodes to ``"Sure, it is [SEG].<|im_end|>"`` like upstream.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vesselnb.demo.remote_code.demo_templates import PROMPT_TEMPLATES

# Sa2VA's added tokens ([SEG] <p> </p> <vp> </vp>), InternVL's image tokens and Qwen's chat tokens.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "[SEG]",
    "<p>",
    "</p>",
    "<vp>",
    "</vp>",
]
UNK_TOKEN = "[UNK]"
ANSWER = "Sure, it is [SEG]."
TRAINING_PROMPTS = [
    "<image>Please segment the blood vessel.",
    "<image>\nPlease segment the blood vessel.",
    "<image>\n Please segment the blood vessel in this image.",
    "<image>Please segment the blood vessels.",
    "<image>Can you segment the coronary arteries in this image?",
    "<image>Segment the vessel tree in this angiogram frame.",
    "<image>Please segment the blood vessel in this video.",
]
EXTRA_WORDS = (
    "Sure , it is It Here the a an of and in on this that these image images frame frames video angiogram "
    "angiography X-ray coronary artery arteries vessel vessels blood tree Please please segment Segment Can "
    "could Could you What where Where is are show mask masks catheter left right main branch branches "
    "region object Yes No 0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' \" ( ) -"
)


def _corpus() -> list[str]:
    instruction = str(PROMPT_TEMPLATES["qwen_chat"]["INSTRUCTION"])
    texts = [
        instruction.format(input=prompt.replace("<image>", "<img></img>\n")) + ANSWER for prompt in TRAINING_PROMPTS
    ]
    texts.append(EXTRA_WORDS)
    texts.append(" ".join(EXTRA_WORDS.split()))
    return texts


def build_demo_tokenizer() -> PreTrainedTokenizerFast:
    """A deterministic tokenizer: special tokens first (ids 0..10), then ``[UNK]``, then the sorted word pieces."""
    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    split_special = re.compile("|".join(re.escape(token) for token in SPECIAL_TOKENS))
    pieces: set[str] = set()
    for text in _corpus():
        for chunk in split_special.split(text):
            pieces.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(chunk))
        for word in text.split():
            pieces.update(piece for piece, _ in pre_tokenizer.pre_tokenize_str(" " + word))
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, UNK_TOKEN])}
    for piece in sorted(pieces):
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
        clean_up_tokenization_spaces=False,
        model_max_length=512,
        padding_side="right",
    )
    return tokenizer
