"""`llava-sculpt prepare`: each converter run on a synthetic fixture in the official raw format, outputs
checked against values read back from the raw files and hand-written expected strings."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_sculpt.data.prepare.cli import main
from llava_sculpt.data.prepare.common import sample_indices
from llava_sculpt.data.prepare.iconqa import format_prompt
from llava_sculpt.data.prepare.synthetic_raw import caption_sentences, write_raw_fixture
from llava_sculpt.errors import run_cli

from helpers import one_line

SUFFIX = "\nAnswer the question using a single word or phrase."
MC = "Answer with the option's letter from the given choices directly."
DATASETS = ["iconqa", "coco", "okvqa", "ocrvqa", "gqa", "textvqa"]
N = 8


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _run(dataset: str, raw: Path, out: Path, *extra: str) -> None:
    assert main([dataset, "--raw-dir", str(raw), "--out-dir", str(out), *extra]) == 0


@pytest.fixture
def raw_of(tmp_path):
    def make(dataset, **kwargs):
        raw = tmp_path / f"raw_{dataset}"
        write_raw_fixture(dataset, raw, **kwargs)
        return raw
    return make


def test_format_prompt_letters_options_one_per_line():
    assert format_prompt(" How many? ", ["one", "two", "three"]) == (
        "How many?\nA. one\nB. two\nC. three\nAnswer with the option's letter from the given choices directly.")


def test_sample_indices_is_deterministic_sorted_and_complete():
    first = sample_indices(100, 10, seed=3, stream="x")
    assert first == sample_indices(100, 10, seed=3, stream="x")
    assert first == sorted(set(first)) and len(first) == 10 and all(0 <= i < 100 for i in first)
    assert first != sample_indices(100, 10, seed=4, stream="x")
    assert first != sample_indices(100, 10, seed=3, stream="y")
    assert sample_indices(5, 10, seed=0, stream="x") == [0, 1, 2, 3, 4]
    assert sample_indices(5, None, seed=0, stream="x") == [0, 1, 2, 3, 4]


def test_iconqa(raw_of, tmp_path):
    raw, out = raw_of("iconqa", n=N), tmp_path / "out"
    _run("iconqa", raw, out, "--num-train", "5", "--num-test", "4")
    problems = json.loads((raw / "problems.json").read_text())
    splits = json.loads((raw / "pid_splits.json").read_text())

    train = json.loads((out / "train.json").read_text())
    assert len(train) == 5
    for sample in train:
        pid = sample["id"].removeprefix("iconqa_")
        assert pid in splits["choose_txt_train"]
        p = problems[pid]
        assert sample["image"] == f"iconqa/train/choose_txt/{pid}/image.png"
        assert (raw / sample["image"]).is_file()
        human, gpt = sample["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        options = "".join(f"\n{letter}. {c}" for letter, c in zip("ABC", p["choices"]))
        assert human["value"] == "<image>\n" + p["question"] + options + "\n" + MC
        assert gpt["value"] == "ABC"[p["answer"]]

    questions = _lines(out / "questions.jsonl")
    annotations = _lines(out / "annotations.jsonl")
    assert len(questions) == 4 and len(annotations) == 4
    for q, a in zip(questions, annotations):
        p = problems[q["question_id"]]
        assert q["question_id"] in splits["choose_txt_test"]
        assert set(q) == {"question_id", "image", "text", "category"}
        assert q["image"] == f"iconqa/test/choose_txt/{q['question_id']}/image.png"
        assert q["text"] == (f"What colour is the square?\nA. {p['choices'][0]}\nB. {p['choices'][1]}\n"
                             f"C. {p['choices'][2]}\n{MC}")
        assert a == {**q, "answer": "ABC"[p["answer"]]}
    # the fixture's answer: the colour of the square
    first = problems[questions[0]["question_id"]]
    assert first["choices"][first["answer"]] in {"red", "green", "blue", "yellow", "black", "orange", "purple", "pink"}

    _run("iconqa", raw, tmp_path / "all", "--num-train", "all")
    assert len(json.loads((tmp_path / "all" / "train.json").read_text())) == N
    all_questions = _lines(tmp_path / "all" / "questions.jsonl")
    assert [q["question_id"] for q in all_questions] == splits["choose_txt_test"]     # other types skipped

    _run("iconqa", raw, tmp_path / "val", "--split", "val", "--num-train", "0")
    assert not (tmp_path / "val" / "train.json").exists()
    assert [q["question_id"] for q in _lines(tmp_path / "val" / "questions.jsonl")] == splits["choose_txt_val"]


def test_coco(raw_of, tmp_path):
    raw, out = raw_of("coco", n=N), tmp_path / "out"
    _run("coco", raw, out, "--num-train", "10")
    karpathy = json.loads((raw / "dataset_coco.json").read_text())["images"]
    by_image = {f"{im['filepath']}/{im['filename']}": im for im in karpathy}

    train = json.loads((out / "train.json").read_text())
    assert len(train) == 10
    for sample in train:
        im = by_image[sample["image"]]
        assert im["split"] in ("train", "restval")
        human, gpt = sample["conversations"]
        assert human["value"] == "<image>\nProvide a one-sentence caption for the provided image."
        assert gpt["value"] in [s["raw"].strip() for s in im["sentences"]]
    assert len({s["id"] for s in train}) == 10

    test_images = [im for im in karpathy if im["split"] == "test"]
    questions = _lines(out / "questions.jsonl")
    assert len(questions) == N
    assert questions[0] == {"question_id": test_images[0]["cocoid"],
                            "image": f"val2014/COCO_val2014_{test_images[0]['cocoid']:012d}.jpg",
                            "text": "Provide a one-sentence caption for the provided image.", "category": "caption"}
    gt = json.loads((out / "annotations.json").read_text())
    assert [im["id"] for im in gt["images"]] == [im["cocoid"] for im in test_images]
    assert len(gt["annotations"]) == 5 * N and len({a["id"] for a in gt["annotations"]}) == 5 * N
    first = [a["caption"] for a in gt["annotations"] if a["image_id"] == test_images[0]["cocoid"]]
    colour = test_images[0]["sentences"][0]["raw"].split()[1]
    assert first == [c.strip() for c in caption_sentences(colour)]
    assert first[0] == f"A {colour} square on a white background."

    # the ground truth loads in pycocotools and accepts predictions for its images
    from pycocotools.coco import COCO
    coco = COCO(str(out / "annotations.json"))
    result = coco.loadRes([{"image_id": q["question_id"], "caption": "a square"} for q in questions])
    assert sorted(coco.getImgIds()) == sorted(result.getImgIds())

    _run("coco", raw, tmp_path / "all", "--num-train", "all")
    assert len(json.loads((tmp_path / "all" / "train.json").read_text())) == (N + N // 2) * 5


def test_okvqa(raw_of, tmp_path):
    raw, out = raw_of("okvqa", n=N), tmp_path / "out"
    _run("okvqa", raw, out, "--num-test", "5")
    questions = _lines(out / "questions.jsonl")
    assert len(questions) == 5
    official_q = json.loads((raw / "OpenEnded_mscoco_val2014_questions.json").read_text())
    official_a = json.loads((raw / "mscoco_val2014_annotations.json").read_text())
    raw_q = {q["question_id"]: q for q in official_q["questions"]}
    for q in questions:
        image_id = raw_q[q["question_id"]]["image_id"]
        assert q == {"question_id": q["question_id"], "image": f"val2014/COCO_val2014_{image_id:012d}.jpg",
                     "text": "What colour is the square?" + SUFFIX, "category": "default"}
    ids = [q["question_id"] for q in questions]
    restricted_a = json.loads((out / "annotations.json").read_text())
    restricted_q = json.loads((out / "questions_official.json").read_text())
    assert [a["question_id"] for a in restricted_a["annotations"]] == ids
    assert [q["question_id"] for q in restricted_q["questions"]] == ids
    assert {k: v for k, v in restricted_a.items() if k != "annotations"} == \
        {k: v for k, v in official_a.items() if k != "annotations"}
    assert restricted_q["task_type"] == "Open-Ended"
    assert all(len(a["answers"]) == 10 for a in restricted_a["annotations"])


def test_ocrvqa(raw_of, tmp_path):
    raw, out = raw_of("ocrvqa", n=N), tmp_path / "out"
    data = json.loads((raw / "dataset.json").read_text())
    _run("ocrvqa", raw, out)
    questions, annotations = _lines(out / "questions.jsonl"), _lines(out / "annotations.jsonl")
    test_keys = [k for k, v in data.items() if v["split"] == 3]
    assert len(questions) == 2 * len(test_keys) == 2 * N
    key = test_keys[0]
    ext = Path(data[key]["imageURL"]).suffix
    assert questions[0] == {"question_id": f"{key}_0", "image": f"images/{key}{ext}",
                            "text": "What is the title of this book?" + SUFFIX, "category": "default"}
    assert annotations[0] == {**questions[0], "answer": data[key]["answers"][0]}
    assert annotations[0]["answer"].startswith("The ") and annotations[0]["answer"].endswith(" Book")
    assert annotations[1]["answer"] == data[key]["genre"]
    assert any(q["image"].endswith(".png") for q in questions)            # extension from imageURL

    _run("ocrvqa", raw, tmp_path / "sample", "--num-test", "5", "--split", "test")
    assert len(_lines(tmp_path / "sample" / "questions.jsonl")) == 5

    # LLaVA's copy stores every cover as .jpg: the converter falls back to it
    png = next(raw / q["image"] for q in questions if q["image"].endswith(".png"))
    png.rename(png.with_suffix(".jpg"))
    _run("ocrvqa", raw, tmp_path / "jpg", "--split", "test")
    images = [q["image"] for q in _lines(tmp_path / "jpg" / "questions.jsonl")]
    assert f"images/{png.stem}.jpg" in images and f"images/{png.stem}.png" not in images


def test_gqa_official_and_llava_ready(raw_of, tmp_path):
    raw = raw_of("gqa", n=N)
    data = json.loads((raw / "testdev_balanced_questions.json").read_text())
    _run("gqa", raw, tmp_path / "out", "--num-test", "4")
    questions = _lines(tmp_path / "out" / "questions.jsonl")
    assert len(questions) == 4
    for q in questions:
        assert q == {"question_id": q["question_id"], "image": f"images/{data[q['question_id']]['imageId']}.jpg",
                     "text": data[q["question_id"]]["question"] + SUFFIX, "category": "default"}
    restricted = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert list(restricted) == [q["question_id"] for q in questions]
    assert all(restricted[k] == data[k] for k in restricted)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert Path(manifest["image_folder"]) == raw.resolve()

    raw2 = raw_of("gqa", n=N, llava_ready=True)
    _run("gqa", raw2, tmp_path / "llava")
    llava_lines = _lines(raw2 / "llava_gqa_testdev_balanced.jsonl")
    assert _lines(tmp_path / "llava" / "questions.jsonl") == llava_lines
    assert llava_lines[0]["image"] == f"{data[llava_lines[0]['question_id']]['imageId']}.jpg"
    manifest = json.loads((tmp_path / "llava" / "manifest.json").read_text())
    assert Path(manifest["image_folder"]) == (raw2 / "images").resolve()
    assert len(json.loads((tmp_path / "llava" / "annotations.json").read_text())) == N


def test_textvqa_official_and_llava_ready(raw_of, tmp_path):
    raw = raw_of("textvqa", n=N)
    entries = json.loads((raw / "TextVQA_0.5.1_val.json").read_text())["data"]
    _run("textvqa", raw, tmp_path / "out")
    questions = _lines(tmp_path / "out" / "questions.jsonl")
    assert len(questions) == N
    e0, e1 = entries[0], entries[1]
    word = e0["answers"][0]
    assert questions[0] == {"question_id": e0["question_id"], "image": f"train_images/{e0['image_id']}.jpg",
                            "text": f"what is written on the sign?\nReference OCR token: {word}, the" + SUFFIX,
                            "category": "default"}
    assert "ocr_tokens" not in e1 and questions[1]["text"] == "what is written on the sign?" + SUFFIX
    restricted = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert restricted["data"] == entries and restricted["dataset_version"] == "0.5.1"

    raw2 = raw_of("textvqa", n=N, llava_ready=True)
    _run("textvqa", raw2, tmp_path / "llava", "--num-test", "3")
    chosen = _lines(tmp_path / "llava" / "questions.jsonl")
    llava_lines = _lines(raw2 / "llava_textvqa_val_v051_ocr.jsonl")
    assert len(chosen) == 3 and all(line in llava_lines for line in chosen)
    assert [e["question_id"] for e in json.loads((tmp_path / "llava" / "annotations.json").read_text())["data"]] \
        == [q["question_id"] for q in chosen]
    assert json.loads((tmp_path / "llava" / "manifest.json").read_text())["image_folder"] == \
        str((raw2 / "train_images").resolve())


@pytest.mark.parametrize("dataset", DATASETS)
def test_sampling_is_deterministic_and_recorded(dataset, raw_of, tmp_path):
    raw = raw_of(dataset, n=N)
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        _run(dataset, raw, tmp_path / name, "--num-test", "3", "--num-train", "4", "--seed", str(seed))
        runs[name] = json.loads((tmp_path / name / "sampled_ids.json").read_text())
    a, b, c = runs["a"], runs["b"], runs["c"]
    assert a == b
    assert (tmp_path / "a" / "questions.jsonl").read_bytes() == (tmp_path / "b" / "questions.jsonl").read_bytes()
    assert a["seed"] == 0 and c["seed"] == 1 and a["dataset"] == dataset and a["num_test"] == 3
    assert len(a["test_ids"]) == 3 and a["test_ids"] != c["test_ids"]
    assert a["test_ids"] == [q["question_id"] for q in _lines(tmp_path / "a" / "questions.jsonl")]
    if dataset in ("iconqa", "coco"):
        assert len(a["train_ids"]) == 4 and a["train_ids"] != c["train_ids"]
        assert a["train_ids"] == [s["id"] for s in json.loads((tmp_path / "a" / "train.json").read_text())]
    else:
        assert a["train_ids"] == [] and not (tmp_path / "a" / "train.json").exists()


@pytest.mark.parametrize("dataset", DATASETS)
def test_missing_image_is_an_error_naming_it(dataset, raw_of, tmp_path, capsys):
    raw = raw_of(dataset, n=N)
    _run(dataset, raw, tmp_path / "ok")
    all_questions = _lines(tmp_path / "ok" / "questions.jsonl")
    missing = all_questions[0]["image"]
    sharing = sum(q["image"] == missing for q in all_questions)        # OCR-VQA: 2 questions per cover
    (raw / missing).unlink()
    argv = [dataset, "--raw-dir", str(raw), "--out-dir", str(tmp_path / "bad")]
    assert run_cli(main, argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{sharing} of the {len(all_questions)} selected" in err and "1 missing image(s)" in err
    assert missing in err
    assert not (tmp_path / "bad" / "questions.jsonl").exists()

    assert run_cli(main, argv + ["--skip-missing-images"]) == 0
    assert "skipping" in one_line(capsys.readouterr().err)
    kept = _lines(tmp_path / "bad" / "questions.jsonl")
    assert missing not in {q["image"] for q in kept}
    assert len(kept) == len(all_questions) - sharing


RAW_FILE = {"iconqa": "problems.json", "coco": "dataset_coco.json", "okvqa": "mscoco_val2014_annotations.json",
            "ocrvqa": "dataset.json", "gqa": "testdev_balanced_questions.json", "textvqa": "TextVQA_0.5.1_val.json"}


@pytest.mark.parametrize("dataset", DATASETS)
def test_malformed_json_is_an_error_naming_the_file(dataset, raw_of, tmp_path, capsys):
    raw = raw_of(dataset, n=2)
    path = raw / RAW_FILE[dataset]
    path.write_text(path.read_text()[:-5], encoding="utf-8")
    assert run_cli(main, [dataset, "--raw-dir", str(raw), "--out-dir", str(tmp_path / "out")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert RAW_FILE[dataset] in err and "not valid JSON" in err


@pytest.mark.parametrize("dataset,file,drop", [
    ("iconqa", "problems.json", "choices"), ("gqa", "testdev_balanced_questions.json", "imageId"),
    ("ocrvqa", "dataset.json", "imageURL")])
def test_missing_field_is_an_error_naming_file_and_field(dataset, file, drop, raw_of, tmp_path, capsys):
    raw = raw_of(dataset, n=2)
    data = json.loads((raw / file).read_text())
    for entry in data.values():
        entry.pop(drop, None)
    (raw / file).write_text(json.dumps(data))
    assert run_cli(main, [dataset, "--raw-dir", str(raw), "--out-dir", str(tmp_path / "out")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert file in err and repr(drop) in err


def test_missing_field_in_coco_and_textvqa(raw_of, tmp_path, capsys):
    raw = raw_of("coco", n=2)
    data = json.loads((raw / "dataset_coco.json").read_text())
    del data["images"][1]["cocoid"]
    (raw / "dataset_coco.json").write_text(json.dumps(data))
    assert run_cli(main, ["coco", "--raw-dir", str(raw), "--out-dir", str(tmp_path / "o1")]) == 2
    assert "images[1] has no field 'cocoid'" in " ".join(capsys.readouterr().err.split())

    raw = raw_of("textvqa", n=2)
    data = json.loads((raw / "TextVQA_0.5.1_val.json").read_text())
    data["data"][0]["question_id"] = "x"
    (raw / "TextVQA_0.5.1_val.json").write_text(json.dumps(data))
    assert run_cli(main, ["textvqa", "--raw-dir", str(raw), "--out-dir", str(tmp_path / "o2")]) == 2
    assert "field 'question_id' of data[0] should be int" in " ".join(capsys.readouterr().err.split())


def test_bad_flags_and_paths(raw_of, tmp_path, capsys):
    raw = raw_of("iconqa", n=2)
    base = ["iconqa", "--raw-dir", str(raw), "--out-dir", str(tmp_path / "o")]
    assert run_cli(main, base + ["--split", "train"]) == 2
    assert "--split 'train'" in one_line(capsys.readouterr().err)
    assert run_cli(main, ["gqa", "--raw-dir", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "is not a folder" in one_line(capsys.readouterr().err)
    assert run_cli(main, ["gqa", "--raw-dir", str(raw), "--out-dir", str(tmp_path / "o")]) == 2
    assert "testdev_balanced_questions.json" in one_line(capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(base + ["--num-test", "-1"])


def test_image_root_separate_from_raw_dir(raw_of, tmp_path):
    raw = raw_of("okvqa", n=3)
    images = tmp_path / "coco_images"
    images.mkdir()
    (raw / "val2014").rename(images / "val2014")
    _run("okvqa", raw, tmp_path / "out", "--image-root", str(images))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert Path(manifest["image_folder"]) == images.resolve()
    assert all((images / q["image"]).is_file() for q in _lines(tmp_path / "out" / "questions.jsonl"))
