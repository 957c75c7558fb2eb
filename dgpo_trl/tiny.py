"""Tiny offline models and their tokenizer: what the demo, the notebook, the tests and the benchmarks train.

Nothing here downloads: the tokenizer is a character-level vocabulary built with `tokenizers`, the model a
random-init `LlamaForCausalLM` (a Llama config, because `AutoTokenizer` would swap a Qwen2 model's tokenizer for a
byte-level one that drops whitespace). Both are saved with `save_pretrained` and loaded by path, as TRL loads a
reference model from the policy's `config._name_or_path`. `build_tiny_model(..., architecture=...)` also builds the
other families in `ARCHITECTURES` (tied embeddings, logit softcapping, logit scaling), for the architecture tests.
`build_tiny_vlm` builds a vision-language model (a tiny Qwen2-VL) with an image-only processor
(`tiny_vlm_processor`): no torchvision, nothing downloaded.
"""

from __future__ import annotations

import os
import random
import string
from pathlib import Path

import torch
from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
ALPHABET = string.digits + string.ascii_letters + " \n.,:;!?+-*/=()[]{}<>'\"_^\\$#%&|~@"


def build_tokenizer(alphabet: str = ALPHABET):
    """A character-level `PreTrainedTokenizerFast` (left padding, as GRPO expects) over `alphabet`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Every character, whitespace included, is its own token ("(?s)." fails under Oniguruma; [\s\S] works)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        padding_side="left",
    )


# Architectures `build_tiny_model` can build: each exercises something of the trainer's that Llama does not.
# name: (config class, what the tiny config sets beyond the common fields)
ARCHITECTURES = {
    "llama": ("LlamaConfig", {"tie_word_embeddings": False}),
    # Tied input/output embeddings (one parameter for the embedding and the LM head); q/k/v projections with bias
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    # Per-head RMSNorm on queries and keys; an explicit head_dim
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": False}),
    # Final-logit softcapping (cap * tanh(logits / cap)), attention-logit softcapping, a sliding-window layer, tied.
    # Caps far below the real 30 / 50: a random tiny model's logits are O(1), and the caps must bend them visibly.
    "gemma2": (
        "Gemma2Config",
        {
            "tie_word_embeddings": True,
            "final_logit_softcapping": 2.0,
            "attn_logit_softcapping": 5.0,
            "sliding_window": 4,
            "attn_implementation": "eager",
        },
    ),  # fmt: skip
    # Logits multiplied by logit_scale (Command-R's 0.0625 would flatten a random tiny model's logits), tied
    "cohere": ("CohereConfig", {"tie_word_embeddings": True, "logit_scale": 0.5}),
    # Logits divided by logits_scaling (and Granite's embedding / residual / attention multipliers). Random weights
    # 5x the usual std, so that the scaled-down logits are not flat (at 0.02 their std is ~0.02: near-uniform)
    "granite": (
        "GraniteConfig",
        {
            "tie_word_embeddings": False,
            "logits_scaling": 8.0,
            "embedding_multiplier": 4.0,
            "residual_multiplier": 0.5,
            "attention_multiplier": 1 / 16,
            "initializer_range": 0.1,
        },
    ),  # fmt: skip
}


def build_tiny_model(
    path: str | os.PathLike,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    alphabet: str = ALPHABET,
    architecture: str = "llama",
    initializer_range: float | None = None,
) -> str:
    """Builds and saves a random-init tiny causal LM and its char tokenizer under `path`; returns the path as a string.

    `architecture` is one of `ARCHITECTURES` (default: an untied Llama). The saved tokenizer is always the char-level
    `PreTrainedTokenizerFast` of `build_tokenizer`; for the non-Llama architectures load it with
    `PreTrainedTokenizerFast.from_pretrained(path)` and pass it as `processing_class`: `AutoTokenizer` /
    `AutoProcessor` pick the tokenizer class from the model type (`Qwen2Tokenizer`, `GemmaTokenizer`, ...), which
    rebuilds the pre-tokenizer or decoder (a Qwen2 one drops whitespace). `initializer_range` (default: the config's
    0.02) sets the std of the random weights; a larger one gives a random model sharper next-token distributions.
    """
    import transformers

    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; one of {sorted(ARCHITECTURES)}")
    config_name, specific = ARCHITECTURES[architecture]
    specific = dict(specific)
    attn_implementation = specific.pop("attn_implementation", None)
    path = Path(path)
    tokenizer = build_tokenizer(alphabet)
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **specific,
    )
    if architecture != "llama":
        fields["head_dim"] = hidden_size // num_heads
    if architecture == "gemma2":
        fields["query_pre_attn_scalar"] = fields["head_dim"]
    if initializer_range is not None:
        fields["initializer_range"] = initializer_range
    config = getattr(transformers, config_name)(**fields)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# The char tokenizer's chat template for the tiny VLM: each message's content, an image part as Qwen2-VL marks it
# (the processor expands <|image_pad|> to one token per merged image patch); no roles, as the text tasks have none
VLM_CHAT_TEMPLATE = (
    "{%- for message in messages -%}{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}{%- if part['type'] == 'image' -%}"
    "<|vision_start|><|image_pad|><|vision_end|>{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
)


class TinyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor for images and text only: Qwen2-VL's own needs torchvision for its video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        # Qwen2VLProcessor.__init__ would require a video processor
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


def build_tiny_vlm(
    path: str | os.PathLike,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    alphabet: str = ALPHABET,
) -> str:
    """Builds and saves a random-init tiny `Qwen2VLForConditionalGeneration`, its char tokenizer (with Qwen2-VL's
    vision tokens and a chat template) and a PIL image processor under `path`; returns the path as a string.

    The vision tower is one block (embed 32, patch 14, spatial merge 2); images are resized to 28x28-56x56 pixels, so
    an image takes 1-4 prompt tokens. Load the processor with `tiny_vlm_processor(path)` and pass it as
    `processing_class` (`AutoProcessor` would build Qwen2-VL's, which needs torchvision). A dataset for it has
    conversational prompts and an `image` column of PIL images.
    """
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(path)
    tokenizer = build_tokenizer(alphabet)
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tokenizer.chat_template = VLM_CHAT_TEMPLATE
    vision_start, vision_end, image_pad, video_pad = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    special = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   bos_token_id=tokenizer.bos_token_id)  # fmt: skip
    head_dim = hidden_size // num_heads
    # Multimodal rotary embedding: the temporal, height and width sections split head_dim / 2 frequencies
    sections = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]
    config = transformers.Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
            max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "mrope_section": sections}, **special,
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=hidden_size, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        vision_start_token_id=vision_start, vision_end_token_id=vision_end, image_token_id=image_pad,
        video_token_id=video_pad, tie_word_embeddings=False, **special,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 56).save_pretrained(path)
    return str(path)


def tiny_vlm_processor(path: str | os.PathLike) -> TinyQwen2VLProcessor:
    """The image-and-text processor of a model saved by `build_tiny_vlm` (pass it as `processing_class`)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    return TinyQwen2VLProcessor(
        Qwen2VLImageProcessorPil.from_pretrained(path), tokenizer, chat_template=tokenizer.chat_template
    )


def supervised_warmup(
    path: str | os.PathLike,
    dataset,
    *,
    steps: int = 80,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
) -> str:
    """A short plain-torch SFT on `prompt + answer + <eos>` (loss on the answer), saved back to `path`.

    Gives RL a policy that is sometimes right: after 80 steps the reversal model's sampled accuracy is ~0.2.
    """
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    rows = list(dataset)
    rng = random.Random(seed)
    for _ in range(steps):
        batch = [rows[rng.randrange(len(rows))] for _ in range(batch_size)]
        model(**sft_batch(tokenizer, batch)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    return str(path)


def sft_batch(tokenizer, rows) -> dict[str, torch.Tensor]:
    """Model inputs for `prompt + answer + <eos>` rows, the loss on the answer, left-padded as GRPO pads prompts."""
    ids, labels = [], []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    width = max(map(len, ids))
    return {
        "input_ids": torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids]),
        "attention_mask": (torch.arange(width) >= torch.tensor([[width - len(x)] for x in ids])).long(),
        "labels": torch.tensor([[-100] * (width - len(x)) + x for x in labels]),
    }
