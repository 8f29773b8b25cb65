"""Small synthetic datasets in each benchmark's exact OFFICIAL raw format (REFERENCE.md section 6), for
tests and the end-to-end demo.  Every image is a tiny PIL drawing whose answer is known:

  iconqa   white PNG with a coloured square; "What colour is the square?", 3 lettered colour choices
           (plus one fill_in_blank and one choose_img problem per split, which the converter must skip)
  coco     white JPEG with a coloured square; 5 captions "a red square on a white background", ...
  okvqa    coloured square; "What colour is the square?", 10 identical answers (the colour name)
  ocrvqa   a coloured "book cover" with its title written on it; "What is the title of this book?"
           -> "The Red Book", "What is the genre of this book?" -> a genre name
  gqa      coloured square; "What colour is the square?" -> colour (even i),
           "Is there a square in the picture?" -> "yes" (odd i)
  textvqa  a sign with a word written on it; "what is written on the sign?" -> the word (10 answers);
           even entries carry `ocr_tokens` [word, "the"], odd entries none

`n` is the number of items per split (IconQA: train/val/test; COCO: train and test, n//2 restval and
val images; OCR-VQA: n books per split code, 2 questions each; others: n evaluation questions).  The
content depends only on (dataset, seed, n).  `llava_ready=True` also writes LLaVA's ready-made
question file for gqa / textvqa."""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from llava_sculpt.data.prepare.common import SHORT_ANSWER_SUFFIX, write_json, write_jsonl

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (240, 210, 30),
           "black": (20, 20, 20), "orange": (245, 140, 20), "purple": (130, 50, 170), "pink": (240, 120, 180)}
COLOUR_NAMES = list(COLOURS)
COLOUR_QUESTION = "What colour is the square?"
GENRES = ["Travel", "Cookbooks, Food & Wine", "Humor & Entertainment", "Science & Math"]
SIGN_WORDS = ["stop", "exit", "open", "sale", "cafe", "taxi", "bank", "hotel"]


def colour_of(index: int, seed: int) -> str:
    return COLOUR_NAMES[(index + seed) % len(COLOUR_NAMES)]


def _square(path: Path, colour: str, size: int = 32) -> None:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(image).rectangle([size // 4, size // 4, 3 * size // 4 - 1, 3 * size // 4 - 1],
                                    fill=COLOURS[colour])
    _save(image, path)


def _text_image(path: Path, text: str, background: tuple[int, int, int], size=(64, 32)) -> None:
    image = Image.new("RGB", size, background)
    ImageDraw.Draw(image).text((2, 10), text, fill=(255, 255, 255) if sum(background) < 400 else (0, 0, 0))
    _save(image, path)


def _save(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        image.save(path, format="PNG")
    else:
        image.save(path, format="JPEG", quality=95)


def _iconqa(raw: Path, seed: int, n: int) -> None:
    rng = random.Random(f"iconqa-fixture:{seed}")
    problems, pid_splits, pid = {}, {}, 1000
    for split in ("train", "val", "test"):
        pid_splits[split] = []
        for qt in ("choose_txt", "choose_img", "fill_in_blank"):
            pid_splits[f"{qt}_{split}"] = []
        for i in range(n + 2):
            pid += 1
            colour = colour_of(i, seed)
            qt = "choose_txt" if i < n else ("choose_img", "fill_in_blank")[i - n]
            entry = {"question": COLOUR_QUESTION, "ques_type": qt, "grade": "grade1", "label": "colour",
                     "split": split}
            if qt == "choose_txt":
                choices = [colour] + rng.sample([c for c in COLOUR_NAMES if c != colour], 2)
                rng.shuffle(choices)
                entry.update(choices=choices, answer=choices.index(colour))
            elif qt == "choose_img":
                entry.update(choices=["choice_0.png", "choice_1.png"], answer=0)
            else:
                entry.update(question="How many squares are there?", answer="1")
            problems[str(pid)] = entry
            pid_splits[f"{qt}_{split}"].append(str(pid))
            pid_splits[split].append(str(pid))
            _square(raw / "iconqa" / split / qt / str(pid) / "image.png", colour)
    write_json(raw / "problems.json", problems)
    write_json(raw / "pid_splits.json", pid_splits)


def caption_sentences(colour: str) -> list[str]:
    """The five reference captions of a COCO fixture image (raw, as stored in dataset_coco.json)."""
    return [f"A {colour} square on a white background.", f"a {colour} square in the middle of a white picture",
            f"a small {colour} square ", f"a white image with a {colour} square in it",
            f"the {colour} square is centred on white"]


def _coco(raw: Path, seed: int, n: int) -> None:
    images, sentid = [], 0
    layout = [("train", n), ("restval", n // 2), ("val", n // 2), ("test", n)]
    index = 0
    for split, count in layout:
        for _ in range(count):
            cocoid = 100000 + 7 * index
            colour = colour_of(index, seed)
            folder = "train2014" if split == "train" else "val2014"
            filename = f"COCO_{folder}_{cocoid:012d}.jpg"
            sentences = []
            for raw_text in caption_sentences(colour):
                tokens = raw_text.lower().replace(".", "").split()
                sentences.append({"tokens": tokens, "raw": raw_text, "imgid": index, "sentid": sentid})
                sentid += 1
            images.append({"filepath": folder, "sentids": [s["sentid"] for s in sentences], "filename": filename,
                           "imgid": index, "split": split, "sentences": sentences, "cocoid": cocoid})
            _square(raw / folder / filename, colour)
            index += 1
    write_json(raw / "dataset_coco.json", {"images": images, "dataset": "coco"})


def _okvqa(raw: Path, seed: int, n: int) -> None:
    questions, annotations = [], []
    for i in range(n):
        image_id = 200 + 3 * i
        qid = image_id * 10 + 5
        colour = colour_of(i, seed)
        questions.append({"image_id": image_id, "question": COLOUR_QUESTION, "question_id": qid})
        answers = [{"answer_id": k + 1, "raw_answer": colour, "answer_confidence": "yes", "answer": colour}
                   for k in range(10)]
        annotations.append({"image_id": image_id, "answer_type": "other", "question_type": "eight",
                            "question_id": qid, "answers": answers, "confidence": 3})
        _square(raw / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", colour)
    write_okvqa_files(raw, questions, annotations, "synthetic OK-VQA fixture")


def write_okvqa_files(raw: Path, questions: list[dict], annotations: list[dict], description: str) -> None:
    """The two official OK-VQA files (val2014 questions and annotations, with their common header)."""
    common = {"license": {"url": "http://creativecommons.org/licenses/by/4.0/",
                          "name": "Creative Commons Attribution 4.0 International License"},
              "data_subtype": "val2014",
              "info": {"description": description, "version": "1.0", "year": 2019}}
    write_json(raw / "OpenEnded_mscoco_val2014_questions.json",
               {**common, "task_type": "Open-Ended", "data_type": "mscoco", "questions": questions})
    write_json(raw / "mscoco_val2014_annotations.json", {**common, "data_type": "mscoco", "annotations": annotations})


def book_title(colour: str) -> str:
    return f"The {colour.capitalize()} Book"


def _ocrvqa(raw: Path, seed: int, n: int) -> None:
    data, index = {}, 0
    for code in (1, 2, 3):
        for _ in range(n):
            key = f"{1000000000 + 37 * index:010d}"
            colour, genre = colour_of(index, seed), GENRES[(index + seed) % len(GENRES)]
            ext = ".png" if index % 4 == 3 else ".jpg"
            data[key] = {"imageURL": f"http://ecx.images-amazon.com/images/I/{key}{ext}",
                         "questions": ["What is the title of this book?", "What is the genre of this book?"],
                         "answers": [book_title(colour), genre], "title": book_title(colour),
                         "authorName": "A. Writer", "genre": genre, "split": code}
            _text_image(raw / "images" / f"{key}{ext}", book_title(colour), COLOURS[colour], size=(48, 64))
            index += 1
    write_json(raw / "dataset.json", data)


def _gqa(raw: Path, seed: int, n: int, llava_ready: bool) -> None:
    data, lines = {}, []
    for i in range(n):
        qid, image_id, colour = str(20000000 + 11 * i), f"n{100000 + i}", colour_of(i, seed)
        if i % 2 == 0:
            question, answer, full = COLOUR_QUESTION, colour, f"The square is {colour}."
            types = {"structural": "query", "semantic": "attr", "detailed": "colorObj"}
        else:
            question, answer, full = "Is there a square in the picture?", "yes", "Yes, there is a square."
            types = {"structural": "verify", "semantic": "obj", "detailed": "existC"}
        data[qid] = {"semantic": [{"operation": "select", "dependencies": [], "argument": "square (0)"}],
                     "entailed": [], "equivalent": [qid], "question": question, "imageId": image_id,
                     "isBalanced": True, "groups": {"global": None, "local": "10q-square_color"},
                     "answer": answer, "semanticStr": "select: square (0)", "annotations":
                     {"answer": {}, "question": {}, "fullAnswer": {}}, "types": types, "fullAnswer": full}
        lines.append({"question_id": qid, "image": f"{image_id}.jpg", "text": question + SHORT_ANSWER_SUFFIX,
                      "category": "default"})
        _square(raw / "images" / f"{image_id}.jpg", colour)
    write_json(raw / "testdev_balanced_questions.json", data)
    if llava_ready:
        write_jsonl(raw / "llava_gqa_testdev_balanced.jsonl", lines)


def _textvqa(raw: Path, seed: int, n: int, llava_ready: bool) -> None:
    data, lines = [], []
    for i in range(n):
        image_id = f"{0xa0c1 * (i + 1):016x}"
        word = SIGN_WORDS[(i + seed) % len(SIGN_WORDS)]
        question = "what is written on the sign?"
        entry = {"question": question, "image_id": image_id, "image_classes": ["Sign"],
                 "flickr_original_url": f"https://farm1.staticflickr.com/{image_id}_o.jpg",
                 "flickr_300k_url": f"https://farm1.staticflickr.com/{image_id}_z.jpg",
                 "image_width": 64, "image_height": 32, "answers": [word] * 10,
                 "question_tokens": question.rstrip("?").split(), "question_id": 34600 + i, "set_name": "val"}
        text = question
        if i % 2 == 0:
            entry["ocr_tokens"] = [word, "the"]
            text += "\nReference OCR token: " + ", ".join(entry["ocr_tokens"])
        data.append(entry)
        lines.append({"question_id": entry["question_id"], "image": f"{image_id}.jpg",
                      "text": text + SHORT_ANSWER_SUFFIX, "category": "default"})
        _text_image(raw / "train_images" / f"{image_id}.jpg", word, (250, 250, 250))
    write_json(raw / "TextVQA_0.5.1_val.json",
               {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data})
    if llava_ready:
        write_jsonl(raw / "llava_textvqa_val_v051_ocr.jsonl", lines)


def write_raw_fixture(dataset: str, raw_dir: str | Path, seed: int = 0, n: int = 8,
                      llava_ready: bool = False) -> None:
    """Write a small synthetic `dataset` (iconqa, coco, okvqa, ocrvqa, gqa, textvqa) into `raw_dir` in
    the official raw layout, images included (see the module docstring for sizes and answers)."""
    raw = Path(raw_dir)
    raw.mkdir(parents=True, exist_ok=True)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    writers = {"iconqa": _iconqa, "coco": _coco, "okvqa": _okvqa, "ocrvqa": _ocrvqa,
               "gqa": lambda r, s, k: _gqa(r, s, k, llava_ready),
               "textvqa": lambda r, s, k: _textvqa(r, s, k, llava_ready)}
    if dataset not in writers:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(writers)}")
    writers[dataset](raw, seed, n)


if __name__ == "__main__":  # python -m llava_sculpt.data.prepare.synthetic_raw DATASET DIR [N]
    import sys
    write_raw_fixture(sys.argv[1], sys.argv[2], n=int(sys.argv[3]) if len(sys.argv) > 3 else 8)
    print(json.dumps({"dataset": sys.argv[1], "raw_dir": sys.argv[2]}))
