"""Give the embedded tiny model some "general knowledge" so that forgetting can be seen on CPU.

`llava-sculpt tiny --pretrain-steps N` trains every weight of the random tiny LLaVA for N steps on synthetic
general tasks drawn like the source benchmarks' fixtures (`data.prepare.synthetic_raw`): "What colour is the
square?" with LLaVA's short-answer suffix -> the colour word, and captions "a red square on a white
background".  The resulting base answers the fixture OK-VQA / GQA colour questions zero-shot, so fine-tuning
it on the IconQA fixture (answer with a letter) shows the trade-off of the paper's Table 1 in miniature.
A plain PyTorch loop (no Trainer): this is data generation for the demo, not a training recipe.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from llava_sculpt.atomic import write_json_atomic

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


def write_general_data(data_dir: Path, seed: int, num_samples: int) -> Path:
    """pretrain.json + images: colour questions and captions over the fixtures' colour palette."""
    from PIL import Image, ImageDraw

    from llava_sculpt.data.prepare.synthetic_raw import COLOUR_QUESTION, COLOURS, caption_sentences

    rng = random.Random(seed + 1000)
    image_dir = data_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(num_samples):
        colour = rng.choice(sorted(COLOURS))
        size = rng.choice([32, 40, 48, 64])
        image = Image.new("RGB", (size, size), (255, 255, 255))
        ImageDraw.Draw(image).rectangle([size // 4, size // 4, 3 * size // 4 - 1, 3 * size // 4 - 1],
                                        fill=COLOURS[colour])
        name = f"pretrain_{i:05d}.png"
        image.save(image_dir / name)
        if i % 4 == 3:
            turn = ("<image>\nProvide a one-sentence caption for the provided image.",
                    rng.choice(caption_sentences(colour)).strip())
        else:
            turn = ("<image>\n" + COLOUR_QUESTION + SHORT_ANSWER, colour)
        samples.append({"id": f"pretrain-{i}", "image": name,
                        "conversations": [{"from": "human", "value": turn[0]}, {"from": "gpt", "value": turn[1]}]})
    path = data_dir / "pretrain.json"
    write_json_atomic(path, samples, indent=1)
    return path


def pretrain(model, processor, data_dir: Path, steps: int, seed: int = 0, lr: float = 3e-3,
             batch_size: int = 16, num_samples: int = 512) -> list[float]:
    """Full-parameter AdamW on the general data; returns the loss per step."""
    from torch.utils.data import DataLoader

    from llava_sculpt.data.conversation import VICUNA_V1
    from llava_sculpt.data.dataset import LlavaCollator, LlavaSupervisedDataset

    path = write_general_data(data_dir, seed, num_samples)
    dataset = LlavaSupervisedDataset(str(path), str(data_dir / "images"), processor.tokenizer,
                                     processor.image_processor, model.config, VICUNA_V1, 512, "pad")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                        collate_fn=LlavaCollator(processor.tokenizer.pad_token_id))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    model.train()
    losses = []
    while len(losses) < steps:
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.detach().item())
            if len(losses) >= steps:
                break
    model.eval()
    return losses
