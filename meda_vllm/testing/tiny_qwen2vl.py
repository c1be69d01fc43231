"""Build a tiny random Qwen2-VL checkpoint from config classes (no download).

The checkpoint has random weights, a byte-level BPE tokenizer trained on a
synthetic corpus with Qwen2-VL's special tokens and chat template, and image /
video processor configs. transformers and vLLM both load it; it exists so the
server, the tests and the demo run on any machine without fetching weights.

    python -m meda_vllm.testing.tiny_qwen2vl OUT_DIR [--layers 2] [--max-image-tokens 1024]

A 224x224 image becomes 64 tokens; a 448x448 image 256; the largest image is
capped at ``--max-image-tokens`` merged tokens (each covers 28x28 pixels).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

#: Environment of a `vllm serve` of the tiny model on these machines: loopback only,
#: offline (no hub lookups), no usage reporting.
SERVER_ENV = {
    "VLLM_HOST_IP": "127.0.0.1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}

#: `vllm serve` flags the tiny model is served with by the tests and the dashboard run
#: (eager CPU float32, block size 32 as CPU_ATTN needs, image/video limits of the demos).
SERVE_ARGS = [
    "--enforce-eager",
    "--dtype",
    "float32",
    "--max-model-len",
    "4096",
    "--block-size",
    "32",
    "--limit-mm-per-prompt",
    '{"image": 4, "video": 1}',
]

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split pattern.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_PIXEL_MEAN = [0.48145466, 0.4578275, 0.40821073]
_PIXEL_STD = [0.26862954, 0.26130258, 0.27577711]


def _corpus(n_lines: int, seed: int):
    rng = random.Random(seed)
    words = [
        "the",
        "a",
        "an",
        "image",
        "picture",
        "video",
        "frame",
        "describe",
        "what",
        "is",
        "in",
        "this",
        "of",
        "and",
        "to",
        "red",
        "green",
        "blue",
        "cat",
        "dog",
        "tree",
        "house",
        "car",
        "sky",
        "sun",
        "water",
        "person",
        "left",
        "right",
        "top",
        "bottom",
        "color",
        "shape",
        "small",
        "large",
        "circle",
        "square",
        "hello",
        "world",
        "you",
        "are",
        "helpful",
        "assistant",
        "user",
        "system",
        "answer",
        "question",
        "yes",
        "no",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
    ]
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    words += ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(1500)]
    for _ in range(n_lines):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
        yield f"{line.capitalize()}{rng.choice('.?!,:')} {rng.randint(0, 999)}"


def build_tokenizer(vocab_size: int = 1000, seed: int = 0):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(3000, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(
    out_dir: str | Path,
    *,
    num_layers: int = 2,
    max_image_tokens: int = 1024,
    seed: int = 0,
    vocab_size: int = 1000,
    q_scales: list[float] | None = None,
) -> dict:
    """Write the checkpoint to ``out_dir`` and return a summary dict.

    ``q_scales``: one factor per layer on that layer's query projection (weight and bias).
    The random model attends almost uniformly; scaled queries make each layer's attention
    as sharp as asked, so which tokens a compressed request kept shows in its logprobs.
    """
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = build_tokenizer(vocab_size, seed)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    text_config = dict(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,  # head_dim 32, GQA group 2
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [4, 6, 6],  # sums to head_dim / 2
        },
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        use_sliding_window=False,
    )
    vision_config = dict(
        depth=2,
        embed_dim=64,
        hidden_size=128,  # merger output = text hidden size
        num_heads=2,
        mlp_ratio=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        hidden_act="quick_gelu",
    )
    config = Qwen2VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config.bos_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]

    model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    if q_scales is not None:
        layers = model.model.language_model.layers
        if len(q_scales) != len(layers):
            raise ValueError(f"q_scales needs {len(layers)} factors (got {len(q_scales)})")
        with torch.no_grad():
            for layer, scale in zip(layers, q_scales, strict=True):
                layer.self_attn.q_proj.weight.mul_(scale)
                layer.self_attn.q_proj.bias.mul_(scale)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)

    # One merged visual token covers 28x28 pixels.
    pixels = dict(min_pixels=56 * 56, max_pixels=28 * 28 * max_image_tokens)
    common = dict(
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=_PIXEL_MEAN,
        image_std=_PIXEL_STD,
        **pixels,
    )
    image_processor = Qwen2VLImageProcessor(**common)
    video_processor = Qwen2VLVideoProcessor(**common, min_frames=2, max_frames=16)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    tok.save_pretrained(out)
    image_processor.to_json_file(str(out / "preprocessor_config.json"))
    video_processor.to_json_file(str(out / "video_preprocessor_config.json"))
    summary = {
        "out_dir": str(out),
        "layers": num_layers,
        "q_scales": q_scales,
        "vocab": len(tok),
        "params": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.time() - t0, 2),
    }
    (out / "meda_tiny_model.json").write_text(json.dumps(summary))
    return summary


def ensure(out_dir: str | Path, **kwargs) -> Path:
    """Build the checkpoint unless ``out_dir`` already holds one built with ``kwargs``."""
    out = Path(out_dir)
    marker = out / "meda_tiny_model.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        same = info.get("layers") == kwargs.get("num_layers", 2) and info.get(
            "q_scales"
        ) == kwargs.get("q_scales")
        if same and (out / "config.json").exists():
            return out
    build(out, **kwargs)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--max-image-tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    summary = build(
        args.out_dir,
        num_layers=args.layers,
        max_image_tokens=args.max_image_tokens,
        seed=args.seed,
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
