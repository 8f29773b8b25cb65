"""Give the demo's tiny LLaVA the four source skills of the synthetic world (data/world.py), so that
forgetting can be measured on CPU.

`llava-sculpt tiny --shape demo --pretrain-steps N` first trains the vision tower alone for 3N/8 steps to
classify what is where (shapes, colours, words: the role CLIP's own pre-training plays for LLaVA), then every
weight of the tiny LLaVA for N AdamW steps on a fixed pool of examples of the four source skills (split "pretrain", never the evaluation split)
and the text-only "Which option says X?" task, in LLaVA-1.5's `vicuna_v1` format with its short-answer
suffix, so the prompts are exactly those `llava-sculpt prepare` writes for the evaluation files.

This is data generation for the demo, not a training recipe: a plain PyTorch loop that tokenises the pool
once, batches examples of similar length, and computes the language-model head only where there are labels
(the answers: a few tokens of ~95), which makes a step ~2x cheaper than `model(**batch).loss`.
"""
from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from llava_sculpt.data import world

# examples per source skill in the pool (GQA twice as many; OCR-VQA: two questions per cover); the letter
# task gets as many
POOL_PER_SKILL = 1536


def build_pool(processor, model_config, seed: int, per_skill: int = POOL_PER_SKILL) -> list[dict]:
    """Tokenised examples {input_ids, labels, pixel_values | None, skill}: the four skills + letters."""
    from llava_sculpt.data.conversation import VICUNA_V1, tokenize_conversation
    from llava_sculpt.data.dataset import num_image_tokens

    n_image, image_id = num_image_tokens(model_config), model_config.image_token_index
    pool = []
    rng = random.Random(f"pretrain-pool:{seed}")

    def add(skill, prompt, answer, image):
        user = ("<image>\n" + prompt) if image is not None else prompt
        item = tokenize_conversation(processor.tokenizer, VICUNA_V1, [(user, answer)], n_image, image_id, 512)
        pool.append({"skill": skill, "input_ids": item["input_ids"], "labels": item["labels"], "image": image})

    for skill in world.SOURCE_SKILLS:
        # spatial questions (GQA) are learnt last: twice the examples; OCR-VQA asks two questions per cover
        count = 2 * per_skill if skill == "gqa" else per_skill
        for _, ex, _, prompt, answer in world.source_questions(skill, "pretrain", seed, count, rng):
            add(skill, prompt, answer, ex.image)
    for prompt, letter in world.letter_examples("pretrain", seed, per_skill):
        add("letters", prompt, letter, None)
    images = [it["image"] for it in pool if it["image"] is not None]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    k = 0
    for it in pool:
        if it.pop("image") is not None:
            it["pixel_values"] = pixels[k]
            k += 1
        else:
            it["pixel_values"] = None
    return pool


def vision_targets(skill: str, example) -> dict[str, int]:
    """Labels of the vision tower's pre-training (CLIP's role in LLaVA): what is where in the image."""
    s, c = world.SHAPES.index, list(world.COLOURS).index
    if skill == "okvqa":
        return {"shape": s(example.extra["shape"])}
    if skill == "ocrvqa":
        return {"title": world.TITLES.index(example.extra["title"]),
                "colour": list(world.GENRES.values()).index(example.extra["genre"])}
    if skill in ("gqa", "coco"):
        return {"left_shape": s(example.extra["left"][0]), "right_shape": s(example.extra["right"][0]),
                "left_colour": c(example.extra["left"][1]), "right_colour": c(example.extra["right"][1])}
    if skill == "textvqa":
        return {"word": world.SIGN_WORDS.index(example.qa[0][1])}
    return {}


VISION_HEADS = {"shape": 6, "title": 10, "colour": 6, "left_shape": 6, "right_shape": 6, "left_colour": 6,
                "right_colour": 6, "word": 10}


def pretrain_vision(model, processor, steps: int, seed: int = 0, lr: float = 1e-3, batch_size: int = 64,
                    per_skill: int | None = None, log=print) -> list[float]:
    """Stage 1: train the vision tower alone with linear heads on its selected layer's patch grid (the
    classes of `vision_targets`).  Through the language model the same tower learns these features ~10x
    slower, since its gradient then passes through attention that does not yet look at the image."""
    per_skill = per_skill or min(1024, max(32, 16 * steps))
    images, labels = [], []
    for skill in world.SOURCE_SKILLS:
        for ex in world.examples(skill, "pretrain-vision", seed, per_skill):
            images.append(ex.image)
            labels.append(vision_targets(skill, ex))
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    target = {name: torch.tensor([lab.get(name, -100) for lab in labels]) for name in VISION_HEADS}
    tower, config = model.model.vision_tower, model.config
    grid = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    torch.manual_seed(seed)
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(grid * config.vision_config.hidden_size, n)
                                 for name, n in VISION_HEADS.items()})
    optimizer = torch.optim.AdamW(list(tower.parameters()) + list(heads.parameters()), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    tower.train()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=generator)
        features = tower(pixels[idx], output_hidden_states=True).hidden_states[config.vision_feature_layer][:, 1:]
        flat = features.reshape(batch_size, -1)
        loss = sum(torch.nn.functional.cross_entropy(head(flat), target[name][idx], ignore_index=-100)
                   for name, head in heads.items() if (target[name][idx] != -100).any())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"vision pre-training step {step + 1}/{steps}: loss {sum(losses[-100:]) / len(losses[-100:]):.3f}")
    return losses


def _batches(pool: list[dict], batch_size: int, generator: random.Random):
    """Shuffled batches that never mix image and text-only examples (one forward per batch)."""
    groups = [[i for i, it in enumerate(pool) if (it["pixel_values"] is None) == text] for text in (False, True)]
    batches = []
    for group in groups:
        order = group[:]
        generator.shuffle(order)
        batches += [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    generator.shuffle(batches)
    return batches


def _collate(pool, indices, pad_id):
    from llava_sculpt.data.conversation import IGNORE_INDEX

    longest = max(len(pool[i]["input_ids"]) for i in indices)
    ids = torch.full((len(indices), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(indices), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(indices), longest), dtype=torch.long)
    for row, i in enumerate(indices):
        n = len(pool[i]["input_ids"])
        ids[row, :n] = torch.tensor(pool[i]["input_ids"])
        labels[row, :n] = torch.tensor(pool[i]["labels"])
        mask[row, :n] = 1
    pixels = None if pool[indices[0]]["pixel_values"] is None else torch.stack([pool[i]["pixel_values"] for i in indices])
    return ids, labels, mask, pixels


def answer_loss(model, ids, labels, mask, pixels) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens, with the LM head applied to those only (the
    training loss of every run, model/labelled_loss.py)."""
    from llava_sculpt.model.labelled_loss import labelled_loss

    return labelled_loss(model, labels, input_ids=ids, attention_mask=mask, pixel_values=pixels)


def pretrain_world(model, processor, steps: int, seed: int = 0, log=print) -> list[float]:
    """Both stages: the vision tower for 3/8 x `steps` steps (cheap: no language model), then the whole model
    for `steps` steps; returns the second stage's losses."""
    pretrain_vision(model, processor, max(1, (3 * steps) // 8), seed, log=log)
    return pretrain(model, processor, steps, seed, log=log)


def pretrain(model, processor, steps: int, seed: int = 0, lr: float = 1e-3, batch_size: int = 32,
             log=print) -> list[float]:
    """Full-parameter AdamW (warm-up 5%, cosine to 5%) on the source-skill pool; returns the loss per step.
    lr 1e-3: at 3e-3 the language model stays at chance on every skill that needs the image for 1,200 steps."""
    start = time.time()
    pool = build_pool(processor, model.config, seed, per_skill=min(POOL_PER_SKILL, max(32, 8 * steps)))
    log(f"pre-training pool: {len(pool)} examples ({', '.join(world.SOURCE_SKILLS)}, letters) "
        f"built in {time.time() - start:.0f}s")
    order = random.Random(f"pretrain-order:{seed}")
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    pad_id = processor.tokenizer.pad_token_id
    model.train()
    losses = []
    while len(losses) < steps:
        for indices in _batches(pool, batch_size, order):
            loss = answer_loss(model, *_collate(pool, indices, pad_id))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if len(losses) % 100 == 0 or len(losses) == steps:
                recent = losses[-100:]
                log(f"pre-training step {len(losses)}/{steps}: loss {sum(recent) / len(recent):.3f} "
                    f"({time.time() - start:.0f}s)")
            if len(losses) >= steps:
                break
    model.eval()
    return losses
