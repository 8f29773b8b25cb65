"""Pad-to-square pixels, dataset validation errors and the modality-grouped sampler."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from llava_sculpt.data.dataset import ModalityGroupedSampler, expand2square, load_llava_json, mean_colour
from llava_sculpt.errors import UserError


def test_expand2square_exact_pixels(tiny_processor):
    # CLIP mean (0.48145466, 0.4578275, 0.40821073) * 255, truncated as LLaVA does.
    bg = mean_colour(tiny_processor.image_processor)
    assert bg == (122, 116, 104)
    img = Image.new("RGB", (4, 2), (10, 20, 30))  # wide: padded above and below
    sq = expand2square(img, bg)
    assert sq.size == (4, 4)
    rows = [[sq.getpixel((x, y)) for x in range(4)] for y in range(4)]
    assert rows[0] == [bg] * 4 and rows[3] == [bg] * 4  # offset (4 - 2) // 2 = 1
    assert rows[1] == [(10, 20, 30)] * 4 and rows[2] == [(10, 20, 30)] * 4
    tall = expand2square(Image.new("RGB", (1, 4), (1, 2, 3)), bg)  # offset (4 - 1) // 2 = 1
    assert [tall.getpixel((x, 0)) for x in range(4)] == [bg, (1, 2, 3), bg, bg]
    same = Image.new("RGB", (3, 3), (5, 5, 5))
    assert expand2square(same, bg) is same


def write(tmp_path, obj, name="train.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


def sample(image="a.png", human="<image>\nQ", answer="A"):
    s = {"id": "s0", "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]}
    if image:
        s["image"] = image
    return s


@pytest.mark.parametrize("payload, match", [
    ("{not json", r"train.json: not valid JSON .*line 1"),
    ({"a": 1}, r"train.json: expected a JSON list"),
    ([sample(human="Q no image")], r"sample 0 .*exactly one '<image>'.*found 0"),
    ([sample(human="<image>\n<image>\nQ")], r"sample 0 .*exactly one '<image>'.*found 2"),
    ([sample(image=None, human="<image>\nQ")], r"sample 0 .*text-only sample"),
    ([sample(), {"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                                {"from": "human", "value": "again"}]}],
     r"sample 1 .*alternate human/gpt"),
    ([sample(image="missing.png")], r"1 image file\(s\) not found.*missing.png"),
])
def test_bad_training_json(tmp_path, payload, match):
    Image.new("RGB", (2, 2)).save(tmp_path / "a.png")
    with pytest.raises(UserError, match=match):
        load_llava_json(write(tmp_path, payload), str(tmp_path))


def test_valid_json_with_text_only(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "a.png")
    samples = load_llava_json(write(tmp_path, [sample(), sample(image=None, human="hi")]), str(tmp_path))
    assert len(samples) == 2


def test_modality_grouped_sampler_batches_are_homogeneous():
    lengths = [5, -3, 7, -2, 9, 11, -4, 6, -8, 3, 4, -1, 2]
    sampler = ModalityGroupedSampler(lengths, batch_size=2, world_size=1, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))  # a permutation
    n_mm, n_text = 8, 5
    full_batches = [order[i:i + 2] for i in range(0, (n_mm // 2) * 2 + (n_text // 2) * 2, 2)]
    for b in full_batches:
        assert len({lengths[i] > 0 for i in b}) == 1, b  # one modality per batch
        assert abs(lengths[b[0]]) >= abs(lengths[b[1]])  # longest first
    sampler.set_epoch(1)
    assert list(sampler) != order  # reshuffled per epoch
    assert list(ModalityGroupedSampler(lengths, 2, 1, seed=3)) == order  # deterministic
