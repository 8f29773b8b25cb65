"""LLaVA training data: JSON loading with validation, pad-to-square images, collator, modality-grouped sampler.

Training JSON (LLaVA's format): a list of
    {"id": ..., "image": "relative/path.png" (optional), "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                                         {"from": "gpt", "value": "..."}, ...]}
Image paths are relative to `--image_folder`.  Samples without "image" are text-only.  Each assistant turn
ends with the tokenizer's eos token (`</s>` for LLaVA-1.5), labelled, so training and generation's stopping agree.

With the `plain` template (`--version plain`, LLaVA's stage-1 pretraining) every sample must be an image with
one human turn holding `<image>` and one gpt turn, the caption (LLaVA asserts the same); the human text is
dropped and the sample is tokenised by `conversation.tokenize_plain`.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from llava_sculpt.data.conversation import (IGNORE_INDEX, IMAGE_PLACEHOLDER, ConversationTemplate,
                                            conversations_to_turns, end_of_turn, tokenize_conversation,
                                            tokenize_plain)
from llava_sculpt.errors import UserError, json_error_text


def expand2square(image, background_color: tuple[int, int, int]):
    """Pad a PIL image to a square canvas of side max(w, h), filled with `background_color`, the image centred
    (LLaVA-1.5's `image_aspect_ratio pad`: the offset is (side - short) // 2 on the short axis)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background_color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def mean_colour(image_processor) -> tuple[int, int, int]:
    """The processor's mean colour as 0-255 integers (LLaVA truncates: int(mean * 255))."""
    return tuple(int(m * 255) for m in image_processor.image_mean)


def load_image(path: str, image_processor, aspect_ratio: str) -> torch.Tensor:
    """Open an image, pad it to a square when `aspect_ratio == "pad"`, and return pixel_values [3, H, W]."""
    from PIL import Image

    try:
        image = Image.open(path).convert("RGB")
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None
    if aspect_ratio == "pad":
        image = expand2square(image, mean_colour(image_processor))
    return image_processor(images=image, return_tensors="pt")["pixel_values"][0]


def num_image_tokens(config) -> int:
    """Number of visual features LLaVA inserts per image: one per patch (+1 for CLS with strategy "full")."""
    vision = config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    return n + (1 if config.vision_feature_select_strategy == "full" else 0)


def load_llava_json(data_path: str, image_folder: str | None) -> list[dict]:
    """Read and validate a LLaVA training JSON; every problem names the file and the sample index."""
    try:
        with open(data_path, encoding="utf-8") as f:
            samples = json.load(f)
    except FileNotFoundError:
        raise UserError(f"--data_path {data_path}: file not found") from None
    except json.JSONDecodeError as err:
        raise UserError(f"--data_path {data_path}: not valid JSON ({json_error_text(err)}); "
                        "expected a list of LLaVA samples") from None
    if not isinstance(samples, list):
        raise UserError(f"--data_path {data_path}: expected a JSON list of samples "
                        f"({{'id', 'image', 'conversations'}}), got a {type(samples).__name__}")
    if not samples:
        raise UserError(f"--data_path {data_path}: the list of samples is empty")
    missing = []
    for i, sample in enumerate(samples):
        where = f"{data_path}, sample {i} (id {sample.get('id')!r})" if isinstance(sample, dict) else f"{data_path}, sample {i}"
        if not isinstance(sample, dict):
            raise UserError(f"{where}: expected an object with 'conversations', got {type(sample).__name__}")
        turns = conversations_to_turns(sample.get("conversations"), where)
        n_image = sum(user.count(IMAGE_PLACEHOLDER) + answer.count(IMAGE_PLACEHOLDER) for user, answer in turns)
        if "image" in sample:
            if not isinstance(sample["image"], str):
                raise UserError(f"{where}: 'image' must be one relative path (multi-image samples are not supported)")
            if n_image != 1:
                raise UserError(f"{where}: an image sample must contain exactly one '<image>' in its human turns; "
                                f"found {n_image}")
            if image_folder is None:
                raise UserError(f"{where}: the sample has an image but no --image_folder was given")
            path = os.path.join(image_folder, sample["image"])
            if not os.path.isfile(path):
                missing.append(path)
        elif n_image:
            raise UserError(f"{where}: a text-only sample (no 'image' field) contains '<image>'")
    if missing:
        raise UserError(f"--data_path {data_path}: {len(missing)} image file(s) not found under --image_folder "
                        f"{image_folder}, e.g. {missing[:3]}")
    return samples


def check_plain_samples(samples: list[dict], data_path: str) -> None:
    """`--version plain`: each sample one image, one human turn with `<image>`, one gpt turn (the caption)."""
    for i, sample in enumerate(samples):
        where = f"{data_path}, sample {i} (id {sample.get('id')!r})"
        turns = conversations_to_turns(sample["conversations"], where)
        if "image" not in sample or len(turns) != 1 or IMAGE_PLACEHOLDER not in turns[0][0]:
            raise UserError(f"{where}: --version plain (LLaVA's stage-1 pretraining template) needs an image sample "
                            "with exactly one human turn holding '<image>' and one gpt turn (the caption); got "
                            + ("a text-only sample" if "image" not in sample else f"{len(turns)} exchanges"
                               if len(turns) != 1 else "'<image>' in the gpt turn"))


def normalise_image_turn(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Move `<image>` to the start of the first human turn followed by a newline (LLaVA's convention)."""
    out = []
    for user, answer in turns:
        if IMAGE_PLACEHOLDER in user:
            user = IMAGE_PLACEHOLDER + "\n" + user.replace(IMAGE_PLACEHOLDER, "").strip()
        out.append((user, answer))
    return out


class LlavaSupervisedDataset(Dataset):
    """Tokenises lazily (LLaVA's `--lazy_preprocess`): a sample is tokenised when it is drawn."""

    def __init__(self, data_path: str, image_folder: str | None, tokenizer, image_processor, model_config,
                 template: ConversationTemplate, model_max_length: int, image_aspect_ratio: str = "pad"):
        self.data_path = data_path
        self.end_of_turn = end_of_turn(template, tokenizer)  # fails now, not at the first batch, on a bad eos
        self.samples = load_llava_json(data_path, image_folder)
        if template.style == "plain":
            check_plain_samples(self.samples, data_path)
        self.image_folder = image_folder
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.template, self.max_length, self.aspect_ratio = template, model_max_length, image_aspect_ratio
        self.image_token_id = model_config.image_token_index
        self.num_image_tokens = num_image_tokens(model_config)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def modality_lengths(self) -> list[int]:
        """Approximate lengths (words + image tokens), positive for image samples, negative for text-only."""
        lengths = []
        for s in self.samples:
            words = sum(len(t["value"].split()) for t in s["conversations"])
            lengths.append(words + self.num_image_tokens if "image" in s else -words)
        return lengths

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        where = f"{self.data_path}, sample {i} (id {sample.get('id')!r})"
        turns = normalise_image_turn(conversations_to_turns(sample["conversations"], where))
        if self.template.style == "plain":  # the human turn is replaced by the image alone
            item = tokenize_plain(self.tokenizer, turns[0][1], self.num_image_tokens, self.image_token_id,
                                  self.max_length, where)
        else:
            item = tokenize_conversation(self.tokenizer, self.template, turns, self.num_image_tokens,
                                         self.image_token_id, self.max_length, where)
        item = {k: torch.tensor(v, dtype=torch.long) for k, v in item.items()}
        if "image" in sample:
            item["pixel_values"] = load_image(os.path.join(self.image_folder, sample["image"]),
                                              self.image_processor, self.aspect_ratio)
        return item


@dataclass
class LlavaCollator:
    """Right-pads input_ids (pad token) and labels (IGNORE_INDEX); stacks the images of image samples only."""

    pad_token_id: int

    def __call__(self, items: list[dict]) -> dict:
        longest = max(len(it["input_ids"]) for it in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), longest), dtype=torch.long)
        for row, it in enumerate(items):
            n = len(it["input_ids"])
            input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = it["input_ids"], it["labels"], 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        images = [it["pixel_values"] for it in items if "pixel_values" in it]
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch


class ModalityGroupedSampler(Sampler[int]):
    """`--group_by_modality_length`: every global batch holds only image samples or only text-only samples
    (except the final leftover batch), and within a batch the lengths are similar.

    Per modality: shuffle, cut into global batches of `batch_size * world_size`, sort each by length
    (longest first) so that each device's share has similar lengths; then shuffle the order of batches.
    """

    def __init__(self, lengths: list[int], batch_size: int, world_size: int, seed: int):
        self.lengths, self.global_batch, self.seed, self.epoch = lengths, batch_size * world_size, seed, 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed + self.epoch)
        batches, leftovers = [], []
        for keep in (lambda n: n > 0, lambda n: n <= 0):
            idx = [i for i, n in enumerate(self.lengths) if keep(n)]
            rng.shuffle(idx)
            full = len(idx) - len(idx) % self.global_batch
            for start in range(0, full, self.global_batch):
                chunk = idx[start:start + self.global_batch]
                batches.append(sorted(chunk, key=lambda i: -abs(self.lengths[i])))
            leftovers += idx[full:]
        rng.shuffle(batches)
        if leftovers:
            batches.append(leftovers)
        return iter([i for b in batches for i in b])
