"""The embedded default: a LLaVA-1.5-shaped model small enough for CPU tests, built with no network.

Same architecture as llava-hf/llava-1.5-7b-hf, scaled down:

    CLIP-ViT tower   image 32 px, patch 8 -> 16 patches (+ CLS), hidden 32, 2 layers, feature layer -2
    projector        2-layer GELU MLP (LLaVA's `mlp2x_gelu`): 32 -> 64 -> 64
    language model   Llama, hidden 64, 2 layers, 4 heads, SwiGLU MLP 128
    tokenizer        byte-level BPE trained here on synthetic text (vocab ~400) with `<s>`, `</s>`, `<unk>`,
                     `<pad>` and `<image>`; BOS is prepended like Llama's tokenizer.  `--eos-token T` makes
                     T (e.g. `<|im_end|>`, as SmolLM2's) the special eos token instead of `</s>`, which is
                     then ordinary text, as for a LLaVA built on a non-Llama language model

`llava-sculpt tiny --output-dir DIR [--seed N]` writes

    DIR/model/              HF checkpoint (LlavaForConditionalGeneration + LlavaProcessor)
    DIR/data/train.json     LLaVA training JSON; image paths relative to DIR/data/images/
    DIR/data/images/*.png

Everything is deterministic for a given seed.
"""
from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from llava_sculpt.atomic import give_normal_modes, write_json_atomic
from llava_sculpt.errors import run_cli

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS = ["<unk>", "<s>", EOS_TOKEN, PAD_TOKEN, IMAGE_TOKEN]

COLOURS = {  # name -> RGB; the synthetic tasks ask about these
    "red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
    "purple": (140, 50, 170), "orange": (245, 140, 20), "black": (10, 10, 10), "white": (245, 245, 245),
}
SHAPES = ("square", "circle", "triangle")

# Text the tokenizer is trained on: the conversation template plus the synthetic tasks' words.
_TEMPLATE_TEXT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: ASSISTANT: Answer the question using a single word or phrase. "
    "Answer with the option's letter from the given choices directly. "
    "Provide a one-sentence caption for the provided image. Reference OCR token: "
    "What colour is the shape? What shape is shown? What is in the image? How many? "
    "A. B. C. D. a an the on of in with background picture photo small large yes no "
    "0 1 2 3 4 5 6 7 8 9 10 , . ? ! : ; ' \" ( ) - "
)


@dataclass(frozen=True)
class TinyShape:
    """Sizes of a tiny LLaVA-1.5-shaped model; `test` is the tests' default, `demo` the demo's (world.py)."""
    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 2
    text_hidden: int = 64
    text_intermediate: int = 128
    text_layers: int = 2
    heads: int = 4
    vocab_size: int = 400
    world_vocabulary: bool = False  # train the tokenizer on the demo world's words too


SHAPE_PRESETS = {
    "test": TinyShape(),
    # ~0.6M parameters: 48x48 images (36 patches), big enough to learn the world's four source skills
    "demo": TinyShape(image_size=48, patch_size=8, vision_hidden=64, vision_layers=3, text_hidden=128,
                      text_intermediate=256, text_layers=2, heads=4, vocab_size=1024, world_vocabulary=True),
}


def build_tokenizer(seed: int = 0, eos_token: str = EOS_TOKEN, shape: TinyShape = SHAPE_PRESETS["test"]):
    """Train a byte-level BPE tokenizer on the template and task vocabulary (no network); `eos_token` takes
    `</s>`'s place (same id) among the special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    words = " ".join(list(COLOURS) + list(SHAPES))
    corpus = [_TEMPLATE_TEXT, words, _TEMPLATE_TEXT.lower(), words.upper()] * 4
    if shape.world_vocabulary:  # whole words as single tokens keep the demo's sequences short
        from llava_sculpt.data.world import VOCABULARY

        world = " ".join(VOCABULARY)
        corpus += [world, world.lower(), " " + world] * 8 + [_TEMPLATE_TEXT] * 8
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=shape.vocab_size, special_tokens=[eos_token if t == EOS_TOKEN else t for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token=eos_token, unk_token="<unk>", pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN}, padding_side="right", model_max_length=2048,
    )


def build_tiny_model(seed: int = 0, eos_token: str = EOS_TOKEN, shape: TinyShape | str = "test"):
    """Return (model, processor) with the LLaVA-1.5 architecture at toy size (`shape`: a TinyShape or a
    SHAPE_PRESETS name), weights from `seed`; the tokenizer's, the config's and the generation config's eos
    is `eos_token`."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    shape = SHAPE_PRESETS[shape] if isinstance(shape, str) else shape
    tokenizer = build_tokenizer(seed, eos_token, shape)
    image_size, patch_size = shape.image_size, shape.patch_size
    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=2 * shape.vision_hidden,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=shape.heads,
                              image_size=image_size, patch_size=patch_size, projection_dim=shape.vision_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape.text_hidden,
                       intermediate_size=shape.text_intermediate, num_hidden_layers=shape.text_layers,
                       num_attention_heads=shape.heads, num_key_value_heads=shape.heads, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    num_patches = (image_size // patch_size) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         image_seq_length=num_patches, projector_hidden_act="gelu",
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, processor


def draw_shape(colour: str, shape: str, size: tuple[int, int], background=(255, 255, 255)):
    """A PIL image with one coloured shape: the ground truth of every synthetic task is known."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, background)
    d = ImageDraw.Draw(img)
    w, h = size
    box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
    if shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    else:
        d.polygon([(w // 2, h // 4), (w // 4, 3 * h // 4), (3 * w // 4, 3 * h // 4)], fill=COLOURS[colour])
    return img


def write_synthetic_train(data_dir: Path, seed: int = 0, num_samples: int = 24) -> Path:
    """LLaVA training JSON with PNG images: colour/shape questions (single-word answers), captions,
    a multi-turn sample and text-only samples, with varied (non-square) image sizes."""
    rng = random.Random(seed)
    image_dir = data_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(num_samples):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        size = rng.choice([(32, 32), (48, 32), (32, 40), (40, 24)])
        name = f"{i:05d}.png"
        draw_shape(colour, shape, size).save(image_dir / name)
        kind = i % 6
        if kind == 5:  # text-only sample
            samples.append({"id": f"tiny-{i}", "conversations": [
                {"from": "human", "value": f"What colour is {colour} paint?"},
                {"from": "gpt", "value": colour}]})
            continue
        if kind == 4:
            conv = [{"from": "human", "value": "<image>\nProvide a one-sentence caption for the provided image."},
                    {"from": "gpt", "value": f"a {colour} {shape} on a white background"}]
        elif kind == 3:  # multi-turn
            conv = [{"from": "human", "value": "<image>\nWhat colour is the shape?"},
                    {"from": "gpt", "value": colour},
                    {"from": "human", "value": "What shape is shown?"},
                    {"from": "gpt", "value": shape}]
        else:
            conv = [{"from": "human", "value": "<image>\nWhat colour is the shape?\n"
                     "Answer the question using a single word or phrase."},
                    {"from": "gpt", "value": colour}]
        samples.append({"id": f"tiny-{i}", "image": name, "conversations": conv})
    path = data_dir / "train.json"
    write_json_atomic(path, samples, indent=1)
    return path


def build_tiny(output_dir: str | Path, seed: int = 0, num_samples: int = 24, pretrain_steps: int = 0,
               eos_token: str = EOS_TOKEN, shape: str = "test") -> Path:
    out = Path(output_dir)
    torch.manual_seed(seed)
    model, processor = build_tiny_model(seed, eos_token, shape)
    if pretrain_steps:
        from llava_sculpt.model.pretrain_tiny import pretrain_world

        losses = pretrain_world(model, processor, pretrain_steps, seed)
        print(f"pretrained the tiny model for {pretrain_steps} steps on the source skills of the synthetic world "
              f"(data/world.py): loss {losses[0]:.3f} -> {sum(losses[-10:]) / len(losses[-10:]):.3f}")
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar is noise for a 1 MB model
    try:
        model.save_pretrained(out / "model")
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    processor.save_pretrained(out / "model")
    give_normal_modes(out / "model")  # safetensors writes 0600 files
    write_synthetic_train(out / "data", seed=seed, num_samples=num_samples)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llava-sculpt tiny", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", required=True, help="where to write model/ and data/")
    p.add_argument("--seed", type=int, default=0, help="weights, tokenizer and data seed (default 0)")
    p.add_argument("--num-samples", type=int, default=24, help="synthetic training samples (default 24)")
    p.add_argument("--shape", default="test", choices=sorted(SHAPE_PRESETS), help="model size: test (164k "
                   "parameters, 32 px images; what the tests use) or demo (~0.7M, 48 px; what `llava-sculpt demo` "
                   "pre-trains) (default test)")
    p.add_argument("--pretrain-steps", type=int, default=0, help="train the random model this many steps on "
                   "the four source skills of the synthetic world (data/world.py) so that forgetting can be "
                   "measured; `llava-sculpt demo` uses 800 with --shape demo (default 0: random weights)")
    p.add_argument("--eos-token", default=EOS_TOKEN, help="the tokenizer's eos (end-of-turn) token, e.g. "
                   "'<|im_end|>' to test a non-Vicuna tokenizer (default </s>, as LLaVA-1.5)")
    args = p.parse_args(argv)
    out = build_tiny(args.output_dir, args.seed, args.num_samples, args.pretrain_steps, args.eos_token, args.shape)
    print(f"tiny LLaVA-1.5-shaped model: {out / 'model'}\ntraining JSON: {out / 'data' / 'train.json'} "
          f"(--image_folder {out / 'data' / 'images'})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
