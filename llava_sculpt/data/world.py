"""The demo's synthetic world: four source skills and two target tasks on 48x48 PIL drawings, written in the
official raw formats of the paper's six benchmarks, so that `llava-sculpt prepare`, `generate`, `score` and
`table` run on them unchanged.

Every image is drawn from a few primitives (six shapes in six colours, words in Pillow's default font), and
every answer follows from the image and the question by a fixed rule:

  source  okvqa    one object; "What can you do with this object?" / "Where is this object usually found?"
                   -> a fact about the object's shape (circle = ball -> play / park, ...): knowledge that is
                   not in the pixels, learnt in pre-training only
          ocrvqa   a book cover: a title word written on a coloured background; "What is the title of this
                   book?" -> the word (reading), "What is the genre of this book?" -> the genre of the cover
                   colour (red = Travel, ...)
          gqa      two objects side by side; "Is the circle to the left or to the right of the star?",
                   "Which shape is on the left side?", "What colour is the object on the right side?"
          textvqa  a white sign with a word, and an object elsewhere; "what is written on the sign?" -> the
                   word; every other question carries LLaVA's "Reference OCR token:" line (the word and a
                   distractor, in random order)
  target  iconqa   1 to 4 small objects on a 3x3 grid; "How many shapes are there?" with the options
                   A. 1, B. 2, C. 3, D. 4; the answer is the letter (counting: never taught in pre-training)
          coco     two objects; five reference captions "a red circle and a blue star", ...; never taught

Pre-training (model/pretrain_tiny.py) draws its samples from the same generators with other seeds ("pretrain"
split), plus a text-only multiple-choice task ("Which option says moon?" -> the letter) so that answering
with a letter exists before the target is seen, as it does for LLaVA-1.5.  The source skills cannot be
re-derived from the target data: counting and captions ask neither for facts, reading, nor sides.

Everything depends only on (dataset, split, seed, n): `random.Random` seeded by strings, Pillow's built-in
font.  Test questions use split "test", pre-training split "pretrain", fine-tuning split "train", and the
source samples of CorDA's covariance statistics (`write_source_training`) split "source".
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from llava_sculpt.data.prepare.common import SHORT_ANSWER_SUFFIX, write_json
from llava_sculpt.data.prepare.synthetic_raw import write_okvqa_files

IMAGE_SIZE = 48
BACKGROUND = (255, 255, 255)
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 230), "yellow": (235, 200, 20),
           "purple": (140, 50, 180), "orange": (250, 130, 20)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")
# OK-VQA-style knowledge: each shape is an object with facts that are not visible
OBJECT_FACTS = {  # shape -> (what you can do with it, where it is usually found)
    "circle": ("play", "park"), "square": ("store", "attic"), "triangle": ("camp", "forest"),
    "diamond": ("fly", "beach"), "cross": ("heal", "hospital"), "star": ("wish", "sky")}
FACT_QUESTIONS = ("What can you do with this object?", "Where is this object usually found?")
TITLES = ("Moon", "River", "Storm", "Garden", "Winter", "Castle", "Ocean", "Forest", "Dream", "Night")
GENRES = {"red": "Travel", "green": "Cooking", "blue": "Science", "yellow": "Humor", "purple": "Poetry",
          "orange": "History"}
SIGN_WORDS = ("stop", "exit", "open", "sale", "cafe", "taxi", "bank", "hotel", "park", "shop")
COUNT_QUESTION = "How many shapes are there?"
SHAPE_QUESTION = "Which shape is in the picture?"
COUNT_CHOICES = ("1", "2", "3", "4")  # always these four options, in this order: A = 1 ... D = 4
LETTER_QUESTION = "Which option says {}?"
CAPTION_TEMPLATES = ("{a1} {c1} {s1} and {a2} {c2} {s2}", "{a1} {c1} {s1} next to {a2} {c2} {s2}",
                     "{a1} {c1} {s1} on the left and {a2} {c2} {s2} on the right",
                     "two shapes: {a1} {c1} {s1} and {a2} {c2} {s2}", "{a2} {c2} {s2} to the right of {a1} {c1} {s1}")
SOURCE_SKILLS = ("okvqa", "ocrvqa", "gqa", "textvqa")
TARGET_TASKS = ("iconqa", "coco")
# every word the world uses, for the tiny tokenizer
VOCABULARY = (list(COLOURS) + list(SHAPES) + [w for f in OBJECT_FACTS.values() for w in f] + list(TITLES)
              + list(GENRES.values()) + list(SIGN_WORDS) + list(COUNT_CHOICES)
              + " ".join(FACT_QUESTIONS + (COUNT_QUESTION, LETTER_QUESTION)).split()
              + "Is the to left or right of Which shape is on side What colour object title this book genre "
                "written sign next and an a two shapes: picture".split())


def font(size: int = 12):
    return ImageFont.load_default(size=size)


@dataclass
class Example:
    """One image (None for text-only) with its question(s) and answer(s); `extra` carries task fields."""
    image: Image.Image | None
    qa: list[tuple[str, str]]
    extra: dict = field(default_factory=dict)


def draw_object(draw: ImageDraw.ImageDraw, shape: str, colour: str, cx: float, cy: float, r: float) -> None:
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    elif shape == "star":
        import math
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _canvas(colour=BACKGROUND):
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), colour)
    return image, ImageDraw.Draw(image)


def _grid(rng: random.Random, cells) -> float:
    """A centre on the 8-pixel patch grid: objects cover whole patches, which a ViT of this size learns to
    recognise in a few hundred steps (with free sub-patch positions and sizes it needs thousands)."""
    return 8.0 * rng.choice(cells) - 0.5


def _two_objects(rng: random.Random):
    """Two objects of different shapes, one in each half: ((shape, colour) left, (shape, colour) right)."""
    image, draw = _canvas()
    s1, s2 = rng.sample(SHAPES, 2)
    c1, c2 = rng.choice(list(COLOURS)), rng.choice(list(COLOURS))
    for shape, colour, cx in ((s1, c1, _grid(rng, (1, 2))), (s2, c2, _grid(rng, (4, 5)))):
        draw_object(draw, shape, colour, cx, _grid(rng, (1, 2, 3, 4, 5)), 7)
    return image, (s1, c1), (s2, c2)


def okvqa_example(rng: random.Random) -> Example:
    image, draw = _canvas()
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    draw_object(draw, shape, colour, _grid(rng, (2, 3, 4)), _grid(rng, (2, 3, 4)), 8)
    k = rng.randrange(2)
    return Example(image, [(FACT_QUESTIONS[k], OBJECT_FACTS[shape][k])], {"shape": shape})


def ocrvqa_example(rng: random.Random) -> Example:
    """A cover of the genre's colour with the title in black on a white label (a title straight on the
    coloured cover is read by the vision tower alone, but this 2-layer language model does not learn to find it
    within the pre-training budget)."""
    colour, title = rng.choice(list(COLOURS)), rng.choice(TITLES)
    image, draw = _canvas(COLOURS[colour])
    f = font(12)
    left, top, right, bottom = draw.textbbox((0, 0), title, font=f)
    x0, y0 = rng.choice((0, 8 if right - left <= 38 else 0)), 8 * rng.randint(0, 4)
    draw.rectangle([x0, y0, min(IMAGE_SIZE - 1, x0 + right - left + 5), y0 + 15], fill=(250, 250, 250))
    draw.text((x0 + 2 - left, y0 + 2 - top), title, fill=(0, 0, 0), font=f)
    return Example(image, [("What is the title of this book?", title),
                           ("What is the genre of this book?", GENRES[colour])],
                   {"title": title, "genre": GENRES[colour]})


def gqa_example(rng: random.Random) -> Example:
    image, (s1, c1), (s2, c2) = _two_objects(rng)
    kind = rng.randrange(3)
    if kind == 0:
        if rng.random() < 0.5:
            qa = (f"Is the {s1} to the left or to the right of the {s2}?", "left")
        else:
            qa = (f"Is the {s2} to the left or to the right of the {s1}?", "right")
        types = {"structural": "choose", "semantic": "rel", "detailed": "relChooser"}
    elif kind == 1:
        side = rng.choice(("left", "right"))
        qa = (f"Which shape is on the {side} side?", s1 if side == "left" else s2)
        types = {"structural": "query", "semantic": "obj", "detailed": "positionQuery"}
    else:
        side = rng.choice(("left", "right"))
        qa = (f"What colour is the object on the {side} side?", c1 if side == "left" else c2)
        types = {"structural": "query", "semantic": "attr", "detailed": "colorPosition"}
    return Example(image, [qa], {"types": types, "left": (s1, c1), "right": (s2, c2)})


def textvqa_example(rng: random.Random) -> Example:
    image, draw = _canvas()
    word = rng.choice(SIGN_WORDS)
    f = font(11)
    left, top, right, bottom = draw.textbbox((0, 0), word, font=f)
    w = right - left + 6
    sign_top = rng.choice((0, 8, 24, 32))
    sign_left = 8 * rng.randint(0, (IMAGE_SIZE - w) // 8)
    draw.rectangle([sign_left, sign_top, sign_left + w - 1, sign_top + 15], fill=(250, 250, 250), outline=(0, 0, 0))
    draw.text((sign_left + 3 - left, sign_top + 3 - top), word, fill=(0, 0, 0), font=f)
    # an object in the other half
    cy = _grid(rng, (4, 5)) if sign_top < 16 else _grid(rng, (1, 2))
    draw_object(draw, rng.choice(SHAPES), rng.choice(list(COLOURS)), _grid(rng, (1, 2, 3, 4, 5)), cy, 6)
    distractor = rng.choice([s for s in SIGN_WORDS if s != word])
    ocr = [word, distractor]
    rng.shuffle(ocr)
    return Example(image, [("what is written on the sign?", word)], {"ocr_tokens": ocr})


def iconqa_example(rng: random.Random) -> Example:
    """One small object in a cell of the 3x3 grid; "Which shape is in the picture?" with the six shapes as
    options A-F (always in this order); the answer is the letter."""
    image, draw = _canvas()
    shape, cell = rng.choice(SHAPES), rng.randrange(9)
    draw_object(draw, shape, rng.choice(list(COLOURS)), 8 + 16 * (cell % 3) - 0.5, 8 + 16 * (cell // 3) - 0.5, 6)
    choices = list(SHAPES)
    return Example(image, [(SHAPE_QUESTION, shape)], {"choices": choices, "answer": choices.index(shape)})


def coco_example(rng: random.Random) -> Example:
    image, (s1, c1), (s2, c2) = _two_objects(rng)
    a1, a2 = ("an" if c1 == "orange" else "a"), ("an" if c2 == "orange" else "a")
    captions = [t.format(a1=a1, c1=c1, s1=s1, a2=a2, c2=c2, s2=s2) for t in CAPTION_TEMPLATES]
    return Example(image, [("Provide a one-sentence caption for the provided image.", captions[0])],
                   {"captions": captions, "left": (s1, c1), "right": (s2, c2)})


GENERATORS = {"okvqa": okvqa_example, "ocrvqa": ocrvqa_example, "gqa": gqa_example, "textvqa": textvqa_example,
              "iconqa": iconqa_example, "coco": coco_example}


def examples(task: str, split: str, seed: int, n: int) -> list[Example]:
    """n examples of `task`, the same for the same (task, split, seed, n)."""
    rng = random.Random(f"world:{task}:{split}:{seed}")
    return [GENERATORS[task](rng) for _ in range(n)]


def letter_examples(split: str, seed: int, n: int) -> list[tuple[str, str]]:
    """Text-only multiple choice: 'Which option says X?' with 3 to 6 lettered options -> the letter (every
    letter the targets use exists before fine-tuning, as it does for LLaVA-1.5)."""
    from llava_sculpt.data.prepare.iconqa import format_prompt

    rng = random.Random(f"world:letters:{split}:{seed}")
    words = sorted(set(VOCABULARY))
    out = []
    for _ in range(n):
        options = rng.sample(words if rng.random() < 0.7 else list(COUNT_CHOICES) + ["5", "6"], rng.choice((3, 4, 5, 6)))
        k = rng.randrange(len(options))
        out.append((format_prompt(LETTER_QUESTION.format(options[k]), options), string.ascii_uppercase[k]))
    return out


def source_prompt(task: str, example: Example, k: int) -> str:
    """The prompt `llava-sculpt prepare` writes for question k of a source example (without `<image>`)."""
    question = example.qa[k][0]
    if task == "textvqa" and example.extra.get("with_ocr", True):
        question += "\nReference OCR token: " + ", ".join(example.extra["ocr_tokens"])
    return question + SHORT_ANSWER_SUFFIX


def source_questions(skill: str, split: str, seed: int, n: int, rng: random.Random):
    """(example index, example, question index, prompt, answer) for every question of `examples(skill, split,
    seed, n)`, prompts as `prepare` writes them; a TextVQA example carries LLaVA's OCR line with probability 1/2
    (drawn from `rng`, one draw per example)."""
    for i, ex in enumerate(examples(skill, split, seed, n)):
        if skill == "textvqa":
            ex.extra["with_ocr"] = rng.random() < 0.5
        for k, (_, answer) in enumerate(ex.qa):
            yield i, ex, k, source_prompt(skill, ex, k), answer


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        image.save(path, format="PNG")
    else:
        image.save(path, format="JPEG", quality=95)


# ---------------------------------------------------------------------------------------------------------
# raw formats (REFERENCE.md section 6; the same layouts as data/prepare/synthetic_raw.py)

def _write_okvqa(raw: Path, seed: int, n: int) -> None:
    questions, annotations = [], []
    for i, ex in enumerate(examples("okvqa", "test", seed, n)):
        image_id = 300 + 7 * i
        qid = image_id * 10 + 3
        question, answer = ex.qa[0]
        questions.append({"image_id": image_id, "question": question, "question_id": qid})
        annotations.append({"image_id": image_id, "answer_type": "other", "question_type": "other",
                            "question_id": qid, "confidence": 3,
                            "answers": [{"answer_id": k + 1, "raw_answer": answer, "answer_confidence": "yes",
                                         "answer": answer} for k in range(10)]})
        _save(ex.image, raw / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    write_okvqa_files(raw, questions, annotations, "llava-sculpt synthetic world")


def _write_ocrvqa(raw: Path, seed: int, n: int) -> None:
    """n questions in the test split (n // 2 books, two questions each), plus a few train/val books."""
    data, index = {}, 0
    for code, split, count in ((1, "train", 2), (2, "val", 2), (3, "test", (n + 1) // 2)):
        for ex in examples("ocrvqa", split, seed, count):
            key = f"{2000000000 + 41 * index:010d}"
            data[key] = {"imageURL": f"http://ecx.images-amazon.com/images/I/{key}.jpg",
                         "questions": [q for q, _ in ex.qa], "answers": [a for _, a in ex.qa],
                         "title": ex.extra["title"], "authorName": "A. Writer", "genre": ex.extra["genre"],
                         "split": code}
            _save(ex.image, raw / "images" / f"{key}.jpg")
            index += 1
    write_json(raw / "dataset.json", data)


def _write_gqa(raw: Path, seed: int, n: int) -> None:
    data = {}
    for i, ex in enumerate(examples("gqa", "test", seed, n)):
        qid, image_id = str(30000000 + 13 * i), f"w{200000 + i}"
        question, answer = ex.qa[0]
        data[qid] = {"semantic": [], "entailed": [], "equivalent": [qid], "question": question,
                     "imageId": image_id, "isBalanced": True, "groups": {"global": None, "local": None},
                     "answer": answer, "semanticStr": "", "annotations": {"answer": {}, "question": {},
                                                                          "fullAnswer": {}},
                     "types": ex.extra["types"], "fullAnswer": f"{answer}."}
        _save(ex.image, raw / "images" / f"{image_id}.jpg")
    write_json(raw / "testdev_balanced_questions.json", data)


def _write_textvqa(raw: Path, seed: int, n: int) -> None:
    data = []
    for i, ex in enumerate(examples("textvqa", "test", seed, n)):
        image_id = f"{0xb0d3 * (i + 1):016x}"
        question, answer = ex.qa[0]
        entry = {"question": question, "image_id": image_id, "image_classes": ["Sign"],
                 "flickr_original_url": f"https://farm1.staticflickr.com/{image_id}_o.jpg",
                 "flickr_300k_url": f"https://farm1.staticflickr.com/{image_id}_z.jpg",
                 "image_width": IMAGE_SIZE, "image_height": IMAGE_SIZE, "answers": [answer] * 10,
                 "question_tokens": question.rstrip("?").split(), "question_id": 45600 + i, "set_name": "val"}
        if i % 2 == 0:
            entry["ocr_tokens"] = ex.extra["ocr_tokens"]
        data.append(entry)
        _save(ex.image, raw / "train_images" / f"{image_id}.jpg")
    write_json(raw / "TextVQA_0.5.1_val.json",
               {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data})


def _write_iconqa(raw: Path, seed: int, n: int, num_train: int) -> None:
    problems, pid_splits, pid = {}, {}, 5000
    for split, count in (("train", num_train), ("val", max(2, n // 4)), ("test", n)):
        pid_splits[split] = []
        for qt in ("choose_txt", "choose_img", "fill_in_blank"):
            pid_splits[f"{qt}_{split}"] = []
        for ex in examples("iconqa", split, seed, count):
            pid += 1
            problems[str(pid)] = {"question": ex.qa[0][0], "choices": ex.extra["choices"],
                                  "answer": ex.extra["answer"], "ques_type": "choose_txt", "grade": "grade1",
                                  "label": "count", "split": split}
            pid_splits[f"choose_txt_{split}"].append(str(pid))
            pid_splits[split].append(str(pid))
            _save(ex.image, raw / "iconqa" / split / "choose_txt" / str(pid) / "image.png")
    write_json(raw / "problems.json", problems)
    write_json(raw / "pid_splits.json", pid_splits)


def _write_coco(raw: Path, seed: int, n: int, num_train: int) -> None:
    images, sentid, index = [], 0, 0
    for split, count in (("train", num_train), ("restval", 0), ("val", max(2, n // 4)), ("test", n)):
        for ex in examples("coco", split, seed, count):
            cocoid = 400000 + 11 * index
            folder = "train2014" if split in ("train", "restval") else "val2014"
            filename = f"COCO_{folder}_{cocoid:012d}.jpg"
            sentences = []
            for text in ex.extra["captions"]:
                sentences.append({"tokens": text.replace(":", "").split(), "raw": text, "imgid": index,
                                  "sentid": sentid})
                sentid += 1
            images.append({"filepath": folder, "sentids": [s["sentid"] for s in sentences], "filename": filename,
                           "imgid": index, "split": split, "sentences": sentences, "cocoid": cocoid})
            _save(ex.image, raw / folder / filename)
            index += 1
    write_json(raw / "dataset_coco.json", {"images": images, "dataset": "coco"})


def write_world_raw(dataset: str, raw_dir: str | Path, seed: int = 0, n: int = 100, num_train: int = 0) -> None:
    """Write `dataset` of the synthetic world into `raw_dir` in its official raw layout: n evaluation
    questions (OCR-VQA: n questions on n // 2 books), and for the targets `num_train` training items."""
    if dataset not in GENERATORS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(GENERATORS)}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    raw = Path(raw_dir)
    raw.mkdir(parents=True, exist_ok=True)
    if dataset == "iconqa":
        _write_iconqa(raw, seed, n, num_train)
    elif dataset == "coco":
        _write_coco(raw, seed, n, num_train)
    else:
        {"okvqa": _write_okvqa, "ocrvqa": _write_ocrvqa, "gqa": _write_gqa, "textvqa": _write_textvqa}[dataset](
            raw, seed, n)


def write_source_training(out_dir: str | Path, seed: int = 0, per_skill: int = 64) -> Path:
    """A LLaVA training JSON of SOURCE-skill samples (`per_skill` images per skill, every question of each,
    split "source": neither the test questions nor pre-training's) in OUT_DIR/train.json, images in
    OUT_DIR/images: what `--init_lora_weights corda --corda_data` reads (the source knowledge to preserve).
    Returns the JSON's path."""
    out = Path(out_dir)
    rng = random.Random(f"world:source-ocr:{seed}")
    records = []
    for skill in SOURCE_SKILLS:
        for i, ex, k, prompt, answer in source_questions(skill, "source", seed, per_skill, rng):
            image = f"{skill}_{i:05d}.png"
            if k == 0:
                _save(ex.image, out / "images" / image)
            records.append({"id": f"{skill}_{i}_{k}", "image": image, "conversations": [
                {"from": "human", "value": "<image>\n" + prompt}, {"from": "gpt", "value": answer}]})
    random.Random(f"world:source-order:{seed}").shuffle(records)  # the first --corda_samples cover every skill
    write_json(out / "train.json", records)
    return out / "train.json"
