"""`llava-sculpt prepare DATASET --hf-dataset NAME_OR_DIR`: each benchmark's synthetic raw fixture is also
written as a Hugging Face parquet dataset in the schema of the dataset users download (lmms-lab/OK-VQA,
lmms-lab/textvqa, lmms-lab/GQA, lmms-lab/ICON-QA, yerevann/coco-karpathy, lmms-lab/COCO-Caption,
howard-hou/OCR-VQA), with the fixture's real JPEG/PNG bytes as `datasets.Image` cells; the outputs of
`prepare --hf-dataset` are compared with what the raw-format converter writes for the same content."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llava_sculpt.data.prepare.cli import main
from llava_sculpt.data.prepare.synthetic_raw import write_raw_fixture
from llava_sculpt.errors import run_cli

from helpers import REPO, one_line

datasets = pytest.importorskip("datasets")

N = 8


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path, monkeypatch):
    """load_dataset('parquet', ...) caches arrow copies: keep them in the test's folder, never the network."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    datasets.disable_progress_bars()


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _img(path: Path) -> dict:
    return {"bytes": path.read_bytes(), "path": None}


def _parquet(path: Path, rows: list[dict], image_columns=("image",)) -> None:
    """Write rows as a parquet file with `datasets.Image` features for the image columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: [r.get(k) for r in rows] for k in rows[0] if k not in image_columns}
    ds = datasets.Dataset.from_dict(plain)
    for column in image_columns:
        if column in rows[0]:
            ds = ds.add_column(column, [r.get(column) for r in rows], feature=datasets.Image())
    ds.to_parquet(str(path))


def _raw(dataset: str, tmp_path: Path, n: int = N) -> Path:
    raw = tmp_path / f"raw_{dataset}"
    write_raw_fixture(dataset, raw, n=n)
    return raw


def _run(dataset: str, out: Path, *extra) -> None:
    assert run_cli(main, [dataset, "--out-dir", str(out), *map(str, extra)]) == 0


def _same_files(out_raw: Path, out_hf: Path, *names: str) -> None:
    for name in names:
        assert (out_hf / name).read_bytes() == (out_raw / name).read_bytes(), name


def _check_images(out_hf: Path, raw: Path, expect_folder: Path | None = None) -> None:
    """Every image the outputs reference is written under the manifest's image folder with the raw
    fixture's bytes, and nothing else is."""
    manifest = _json(out_hf / "manifest.json")
    folder = Path(manifest["image_folder"])
    assert folder == (expect_folder or out_hf).resolve()
    assert manifest["raw_files"] == [] and manifest["hf_dataset"]
    used = {q["image"] for q in _lines(out_hf / "questions.jsonl")}
    if (out_hf / "train.json").exists():
        used |= {s["image"] for s in _json(out_hf / "train.json")}
    for rel in used:
        assert (folder / rel).read_bytes() == (raw / rel).read_bytes(), rel
    written = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
               if p.is_file() and p.suffix in (".jpg", ".png")}
    assert written == used


# ------------------------------------------------------------------------------------ lmms-lab/OK-VQA
def _okvqa_hf(raw: Path, root: Path, drop: tuple[str, ...] = (), empty_image: int | None = None) -> Path:
    questions = _json(raw / "OpenEnded_mscoco_val2014_questions.json")["questions"]
    annotations = {a["question_id"]: a for a in _json(raw / "mscoco_val2014_annotations.json")["annotations"]}
    rows = []
    for i, q in enumerate(questions):
        a = annotations[q["question_id"]]
        image = raw / f"val2014/COCO_val2014_{q['image_id']:012d}.jpg"
        row = {"question_id": str(q["question_id"]), "image": None if i == empty_image else _img(image),
               "question": q["question"], "answers": [x["answer"] for x in a["answers"]],
               "question_type": a["question_type"], "answer_type": a["answer_type"]}
        rows.append({k: v for k, v in row.items() if k not in drop})
    _parquet(root / "data" / "val2014-00000-of-00001.parquet", rows)
    return root


def _answers_file(path: Path, questions: list[dict], right) -> Path:
    """LLaVA answer lines: the right answer for even questions, 'nothing' for odd ones."""
    with open(path, "w", encoding="utf-8") as f:
        for i, q in enumerate(questions):
            f.write(json.dumps({"question_id": q["question_id"], "prompt": q["text"],
                                "text": right(q) if i % 2 == 0 else "nothing"}) + "\n")
    return path


def test_okvqa_lmms_lab_schema_matches_raw_converter(tmp_path):
    raw = _raw("okvqa", tmp_path)
    hf = _okvqa_hf(raw, tmp_path / "OK-VQA")
    _run("okvqa", tmp_path / "from_raw", "--raw-dir", raw, "--num-test", 5)
    _run("okvqa", tmp_path / "from_hf", "--hf-dataset", hf, "--num-test", 5)
    out_raw, out_hf = tmp_path / "from_raw", tmp_path / "from_hf"
    _same_files(out_raw, out_hf, "questions.jsonl", "sampled_ids.json")
    # official questions file: identical entries; annotations: the fields the dataset carries
    assert _json(out_hf / "questions_official.json")["questions"] == _json(out_raw / "questions_official.json")["questions"]
    fields = ("question_id", "image_id", "question_type", "answer_type")
    for a_hf, a_raw in zip(_json(out_hf / "annotations.json")["annotations"],
                           _json(out_raw / "annotations.json")["annotations"], strict=True):
        assert {k: a_hf[k] for k in fields} == {k: a_raw[k] for k in fields}
        assert [x["answer"] for x in a_hf["answers"]] == [x["answer"] for x in a_raw["answers"]]
    _check_images(out_hf, raw)

    # the scorer gives the same score on both
    from llava_sculpt.eval.score import score_task
    questions = _lines(out_hf / "questions.jsonl")
    official = {q["question_id"]: q for q in _json(raw / "mscoco_val2014_annotations.json")["annotations"]}
    answers = _answers_file(tmp_path / "answers.jsonl", questions,
                            lambda q: official[q["question_id"]]["answers"][0]["answer"])
    scores = [score_task("okvqa", str(out / "annotations.json"), str(answers),
                         str(out / "questions_official.json"))["score"] for out in (out_raw, out_hf)]
    assert scores[0] == scores[1] == pytest.approx(60.0)


def test_okvqa_save_to_disk_and_single_parquet_file(tmp_path):
    raw = _raw("okvqa", tmp_path, n=4)
    hf = _okvqa_hf(raw, tmp_path / "OK-VQA")
    parquet = hf / "data" / "val2014-00000-of-00001.parquet"
    ds = datasets.load_dataset("parquet", data_files=str(parquet), split="train")
    ds.save_to_disk(str(tmp_path / "saved"))
    _run("okvqa", tmp_path / "a", "--hf-dataset", hf)
    _run("okvqa", tmp_path / "b", "--hf-dataset", tmp_path / "saved")
    _run("okvqa", tmp_path / "c", "--hf-dataset", parquet)
    for other in ("b", "c"):
        _same_files(tmp_path / "a", tmp_path / other, "questions.jsonl", "annotations.json",
                    "questions_official.json", "sampled_ids.json")
        _check_images(tmp_path / other, raw)


def test_image_root_is_where_images_go(tmp_path):
    raw = _raw("okvqa", tmp_path, n=3)
    hf = _okvqa_hf(raw, tmp_path / "OK-VQA")
    _run("okvqa", tmp_path / "out", "--hf-dataset", hf, "--image-root", tmp_path / "images")
    _check_images(tmp_path / "out", raw, expect_folder=tmp_path / "images")
    assert not list((tmp_path / "out").rglob("*.jpg"))


# ----------------------------------------------------------------------------------- lmms-lab/textvqa
def _textvqa_rows(raw: Path) -> list[dict]:
    entries = _json(raw / "TextVQA_0.5.1_val.json")["data"]
    return [{**e, "ocr_tokens": e.get("ocr_tokens"), "image": _img(raw / "train_images" / f"{e['image_id']}.jpg")}
            for e in entries]


def test_textvqa_lmms_lab_schema_and_save_to_disk_match_raw_converter(tmp_path):
    raw = _raw("textvqa", tmp_path)
    rows = _textvqa_rows(raw)
    hf = tmp_path / "textvqa"
    _parquet(hf / "data" / "validation-00000-of-00001.parquet", rows)
    _parquet(hf / "data" / "train-00000-of-00001.parquet", rows[:2])     # another split, ignored
    _run("textvqa", tmp_path / "from_raw", "--raw-dir", raw)
    _run("textvqa", tmp_path / "from_hf", "--hf-dataset", hf)
    out_raw, out_hf = tmp_path / "from_raw", tmp_path / "from_hf"
    _same_files(out_raw, out_hf, "questions.jsonl", "sampled_ids.json")
    assert _json(out_hf / "annotations.json") == _json(out_raw / "annotations.json")
    assert "Reference OCR token" in _lines(out_hf / "questions.jsonl")[0]["text"]
    _check_images(out_hf, raw)

    dd = datasets.load_dataset("parquet", data_files={"validation": str(hf / "data" / "validation-00000-of-00001.parquet")})
    dd.save_to_disk(str(tmp_path / "saved"))
    _run("textvqa", tmp_path / "from_disk", "--hf-dataset", tmp_path / "saved", "--split", "validation")
    _same_files(out_hf, tmp_path / "from_disk", "questions.jsonl", "annotations.json", "sampled_ids.json")


# --------------------------------------------------------------------------------------- lmms-lab/GQA
def test_gqa_two_configurations_match_raw_converter(tmp_path):
    raw = _raw("gqa", tmp_path)
    data = _json(raw / "testdev_balanced_questions.json")
    hf = tmp_path / "GQA"
    # annotations (dicts of empty dicts) has no parquet form: the dataset carries every other field
    _parquet(hf / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet",
             [{"id": qid, **{k: v for k, v in e.items() if k != "annotations"}} for qid, e in data.items()])
    _parquet(hf / "testdev_balanced_images" / "testdev-00000-of-00001.parquet",
             [{"id": e["imageId"], "image": _img(raw / "images" / f"{e['imageId']}.jpg")} for e in data.values()])
    _run("gqa", tmp_path / "from_raw", "--raw-dir", raw, "--num-test", 5)
    _run("gqa", tmp_path / "from_hf", "--hf-dataset", hf, "--num-test", 5)
    out_raw, out_hf = tmp_path / "from_raw", tmp_path / "from_hf"
    _same_files(out_raw, out_hf, "questions.jsonl", "sampled_ids.json")
    restricted = _json(out_raw / "annotations.json")
    assert _json(out_hf / "annotations.json") == {
        qid: {k: v for k, v in e.items() if k != "annotations"} for qid, e in restricted.items()}
    _check_images(out_hf, raw)

    from llava_sculpt.eval.score import score_task
    questions = _lines(out_hf / "questions.jsonl")
    answers = _answers_file(tmp_path / "answers.jsonl", questions, lambda q: data[q["question_id"]]["answer"])
    scores = [score_task("gqa", str(out / "annotations.json"), str(answers))["score"] for out in (out_raw, out_hf)]
    assert scores[0] == scores[1] == pytest.approx(60.0)


# ----------------------------------------------------------------------------------- lmms-lab/ICON-QA
def _iconqa_hf(raw: Path, root: Path, splits=("val", "test"), answer_as="index", count_column=None) -> Path:
    problems, pid_splits = _json(raw / "problems.json"), _json(raw / "pid_splits.json")
    for split in splits:
        rows = []
        for pid in pid_splits[split]:
            p = problems[pid]
            choices = p.get("choices", [])
            answer = p["answer"] if p["ques_type"] == "fill_in_blank" else (
                str(p["answer"]) if answer_as == "index" else choices[p["answer"]])
            rows.append({"question_id": pid, "question": p["question"], "choices": ",".join(choices),
                         "answer": str(answer), "ques_type": p["ques_type"], "label": p["label"],
                         "grade": p["grade"], "skills": None,
                         "query_image": _img(raw / "iconqa" / split / p["ques_type"] / pid / "image.png"),
                         "choice_image_0": None, "choice_image_1": None,
                         **({count_column: len(choices)} if count_column else {})})
        _parquet(root / "data" / f"{split}-00000-of-00001.parquet", rows,
                 image_columns=("query_image", "choice_image_0", "choice_image_1"))
    return root


def test_iconqa_lmms_lab_schema_without_train_split(tmp_path, capsys):
    raw = _raw("iconqa", tmp_path)
    hf = _iconqa_hf(raw, tmp_path / "ICON-QA")
    _run("iconqa", tmp_path / "from_raw", "--raw-dir", raw, "--num-train", 0)
    capsys.readouterr()
    _run("iconqa", tmp_path / "from_hf", "--hf-dataset", hf)           # default --num-train 10000
    assert "no train split" in one_line(capsys.readouterr().err)
    out_raw, out_hf = tmp_path / "from_raw", tmp_path / "from_hf"
    _same_files(out_raw, out_hf, "questions.jsonl", "annotations.jsonl", "sampled_ids.json")
    assert not (out_hf / "train.json").exists()
    _check_images(out_hf, raw)


def test_iconqa_with_train_split_and_answer_as_text(tmp_path):
    raw = _raw("iconqa", tmp_path)
    hf = _iconqa_hf(raw, tmp_path / "iconqa_text", splits=("train", "val", "test"), answer_as="text")
    args = ("--num-train", 5, "--num-test", 4, "--seed", 3)
    _run("iconqa", tmp_path / "from_raw", "--raw-dir", raw, *args)
    _run("iconqa", tmp_path / "from_hf", "--hf-dataset", hf, *args)
    _same_files(tmp_path / "from_raw", tmp_path / "from_hf", "train.json", "questions.jsonl",
                "annotations.jsonl", "sampled_ids.json")
    _check_images(tmp_path / "from_hf", raw)


def test_iconqa_answer_fitting_neither_reading_is_an_error(tmp_path, capsys):
    raw = _raw("iconqa", tmp_path, n=3)
    hf = _iconqa_hf(raw, tmp_path / "ICON-QA", splits=("test",))
    table = datasets.load_dataset("parquet", data_files=str(hf / "data" / "test-00000-of-00001.parquet"),
                                  split="train").to_list()
    table[0]["answer"] = "seven"
    _parquet(hf / "data" / "test-00000-of-00001.parquet", table,
             image_columns=("query_image", "choice_image_0", "choice_image_1"))
    assert run_cli(main, ["iconqa", "--hf-dataset", str(hf), "--out-dir", str(tmp_path / "o")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "'seven'" in err and "neither an index" in err
    assert not (tmp_path / "o").exists()


def _iconqa_choices(raw: Path, new_choices: list[tuple[list[str], int]]) -> list[str]:
    """Give the first choose_txt test problems of the raw fixture these (choices, answer index); their pids."""
    problems, pid_splits = _json(raw / "problems.json"), _json(raw / "pid_splits.json")
    pids = pid_splits["choose_txt_test"][:len(new_choices)]
    for pid, (choices, answer) in zip(pids, new_choices):
        problems[pid].update(choices=choices, answer=answer)
    (raw / "problems.json").write_text(json.dumps(problems))
    return pids


def _letters_and_options(out: Path) -> dict[str, tuple[str, list[str]]]:
    """question_id -> (answer letter, the option lines of the prompt), from annotations.jsonl."""
    return {a["question_id"]: (a["answer"], [l for l in a["text"].splitlines() if l[:3] in
                                             {f"{c}. " for c in "ABCDEFGH"}])
            for a in _lines(out / "annotations.jsonl")}


@pytest.mark.parametrize("answer_as", ["index", "text"])
def test_iconqa_comma_inside_a_choice(tmp_path, capsys, answer_as):
    """lmms-lab/ICON-QA joins the choices with ","; a choice holding a comma must not become two options.
    The raw converter (choices as a JSON list) is the reference: the prompts and answer letters must match."""
    raw = _raw("iconqa", tmp_path, n=4)
    edits = [(["999", "1,000", "1,001"], 0),      # thousands separators in choices that are not the answer
             (["2,500", "250"], 1)]
    if answer_as == "text":                       # a comma in a text choice can be seen when it is the answer
        edits.append((["red, blue", "green"], 0))
    pids = _iconqa_choices(raw, edits)
    hf = _iconqa_hf(raw, tmp_path / "ICON-QA", splits=("test",), answer_as=answer_as)
    _run("iconqa", tmp_path / "from_raw", "--raw-dir", raw, "--num-train", 0)
    capsys.readouterr()
    _run("iconqa", tmp_path / "from_hf", "--hf-dataset", hf, "--num-train", 0)
    err = one_line(capsys.readouterr().err)
    want = _letters_and_options(tmp_path / "from_raw")
    assert want[pids[0]] == ("A", ["A. 999", "B. 1,000", "C. 1,001"])          # what the reference says
    assert _letters_and_options(tmp_path / "from_hf") == want
    _same_files(tmp_path / "from_raw", tmp_path / "from_hf", "questions.jsonl", "annotations.jsonl")
    # the guessed rows are named in a warning
    assert "comma inside a choice" in err and "thousands separator" in err
    assert f"question_id {pids[0]!r}" in err and f"question_id {pids[1]!r}" in err
    if answer_as == "text":
        assert "the answer text holds the comma" in err and f"question_id {pids[2]!r}" in err


def test_iconqa_choice_count_column_settles_the_commas(tmp_path, capsys):
    """With a choice-count column the split is no guess: "1", "500" stay two choices where the row says 3,
    "1,500" is one where it says 2; a count no reading gives is an error."""
    raw = _raw("iconqa", tmp_path, n=4)
    _iconqa_choices(raw, [(["1", "500", "2"], 2), (["1,500", "2"], 0)])
    hf = _iconqa_hf(raw, tmp_path / "ICON-QA", splits=("test",), count_column="num_choices")
    _run("iconqa", tmp_path / "from_raw", "--raw-dir", raw, "--num-train", 0)
    _run("iconqa", tmp_path / "from_hf", "--hf-dataset", hf, "--num-train", 0)
    _same_files(tmp_path / "from_raw", tmp_path / "from_hf", "questions.jsonl", "annotations.jsonl")
    assert "'num_choices' column gives the number of choices" in one_line(capsys.readouterr().err)

    parquet = hf / "data" / "test-00000-of-00001.parquet"
    table = datasets.load_dataset("parquet", data_files=str(parquet), split="train").to_list()
    table[0]["num_choices"] = 4                       # "1,500,2" cannot be read as four choices
    _parquet(parquet, table, image_columns=("query_image", "choice_image_0", "choice_image_1"))
    assert run_cli(main, ["iconqa", "--hf-dataset", str(hf), "--num-train", "0", "--out-dir", str(tmp_path / "o")]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"question_id {table[0]['question_id']!r}" in err and "gives 3 choices, but the row says 4" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ COCO
def test_coco_karpathy_without_images_reads_image_root(tmp_path):
    """yerevann/coco-karpathy (lmms-eval's coco_karpathy_test): no image column, images from --image-root."""
    raw = _raw("coco", tmp_path)
    images = _json(raw / "dataset_coco.json")["images"]
    hf = tmp_path / "coco-karpathy"
    for split, name in (("train", "train"), ("restval", "restval"), ("val", "validation"), ("test", "test")):
        rows = [{"filepath": im["filepath"], "sentids": im["sentids"], "filename": im["filename"],
                 "imgid": im["imgid"], "split": im["split"], "sentences": [s["raw"] for s in im["sentences"]],
                 "cocoid": im["cocoid"], "url": f"http://images.cocodataset.org/{im['filepath']}/{im['filename']}"}
                for im in images if im["split"] == split]
        _parquet(hf / "data" / f"{name}-00000-of-00001.parquet", rows)
    args = ("--num-train", 10, "--num-test", 5)
    _run("coco", tmp_path / "from_raw", "--raw-dir", raw, *args)
    _run("coco", tmp_path / "from_hf", "--hf-dataset", hf, "--image-root", raw, *args)
    _same_files(tmp_path / "from_raw", tmp_path / "from_hf", "train.json", "questions.jsonl", "sampled_ids.json")
    _same_captions(tmp_path / "from_raw", tmp_path / "from_hf")
    manifest = _json(tmp_path / "from_hf" / "manifest.json")
    assert Path(manifest["image_folder"]) == raw.resolve()
    # the Karpathy layout is the Karpathy split, like dataset_coco.json from --raw-dir
    for out in ("from_raw", "from_hf"):
        assert {k: _json(tmp_path / out / "manifest.json")[k] for k in ("karpathy", "coco_split")} == {
            "karpathy": True, "coco_split": "karpathy_test"}
        assert _json(tmp_path / out / "annotations.json")["info"]["description"].startswith(
            "COCO captions, Karpathy test split")

    # without --image-root the missing image column is named
    assert run_cli(main, ["coco", "--hf-dataset", str(hf), "--out-dir", str(tmp_path / "o")]) == 2


def _same_captions(out_raw: Path, out_hf: Path) -> None:
    """annotations.json of both: the same images and captions (its "info" says where they came from)."""
    a_raw, a_hf = _json(out_raw / "annotations.json"), _json(out_hf / "annotations.json")
    assert {k: v for k, v in a_hf.items() if k != "info"} == {k: v for k, v in a_raw.items() if k != "info"}


def _caption_rows(raw: Path, split: str = "test", name=lambda im: im["filename"]) -> list[dict]:
    """The fixture's Karpathy `split` images in the lmms-lab/COCO-Caption layout."""
    images = [im for im in _json(raw / "dataset_coco.json")["images"] if im["split"] == split]
    return [{"question_id": name(im), "image": _img(raw / im["filepath"] / im["filename"]),
             "question": "Provide a one-sentence caption for the provided image.",
             "answer": [s["raw"] for s in im["sentences"]], "id": im["cocoid"], "file_name": name(im)}
            for im in images]


def test_coco_lmms_lab_caption_layout(tmp_path, capsys):
    """lmms-lab/COCO-Caption: question_id = image file name, answer = the captions, image.  Its splits are
    not Karpathy's: the import says which COCO image set it is (read from the COCO_{set}_ file names)."""
    raw = _raw("coco", tmp_path)
    rows = _caption_rows(raw)
    _parquet(tmp_path / "COCO-Caption" / "data" / "test-00000-of-00001.parquet", rows)
    _run("coco", tmp_path / "from_raw", "--raw-dir", raw, "--num-train", 0)
    capsys.readouterr()
    _run("coco", tmp_path / "from_hf", "--hf-dataset", tmp_path / "COCO-Caption", "--num-train", 0)
    warning = one_line(capsys.readouterr().err)
    _same_files(tmp_path / "from_raw", tmp_path / "from_hf", "questions.jsonl", "sampled_ids.json")
    _same_captions(tmp_path / "from_raw", tmp_path / "from_hf")
    _check_images(tmp_path / "from_hf", raw)

    folders = {im["filepath"] for im in _json(raw / "dataset_coco.json")["images"] if im["split"] == "test"}
    assert len(folders) == 1
    image_set = folders.pop()                     # the fixture's Karpathy test images sit in val2014/
    manifest = _json(tmp_path / "from_hf" / "manifest.json")
    assert (manifest["karpathy"], manifest["coco_split"]) == (False, image_set)
    info = _json(tmp_path / "from_hf" / "annotations.json")["info"]
    assert "Karpathy" not in info["description"].replace("NOT the Karpathy", "")
    assert info["coco_split"] == image_set and info["karpathy"] is False
    assert f"is the COCO {image_set} image set" in warning and "NOT the Karpathy test split" in warning
    assert "ALLOW_NON_KARPATHY=1" in warning


def test_coco_caption2017_layout_is_labelled_val2017(tmp_path, capsys):
    """lmms-lab/COCO-Caption2017 `val`: 2017 file names ({id:012d}.jpg) -> val2017, not Karpathy."""
    raw = _raw("coco", tmp_path, n=4)
    rows = _caption_rows(raw, name=lambda im: f"{im['cocoid']:012d}.jpg")
    _parquet(tmp_path / "COCO-Caption2017" / "data" / "val-00000-of-00001.parquet", rows)
    _run("coco", tmp_path / "o", "--hf-dataset", tmp_path / "COCO-Caption2017", "--split", "val", "--num-train", 0)
    manifest = _json(tmp_path / "o" / "manifest.json")
    assert (manifest["karpathy"], manifest["coco_split"], manifest["split"]) == (False, "val2017", "val")
    assert "is the COCO val2017 image set" in one_line(capsys.readouterr().err)
    assert [q["question_id"] for q in _lines(tmp_path / "o" / "questions.jsonl")] == [r["id"] for r in rows]


def test_coco_caption_without_references_is_an_error(tmp_path, capsys):
    """lmms-lab/COCO-Caption `test` is test2014, whose captions were never published: a clear error; so is
    one evaluation image without a caption (null and blank captions count as none)."""
    raw = _raw("coco", tmp_path, n=4)
    rows = _caption_rows(raw, name=lambda im: f"COCO_test2014_{im['cocoid']:012d}.jpg")
    hf = tmp_path / "COCO-Caption" / "data" / "test-00000-of-00001.parquet"
    _parquet(hf, [{**r, "answer": [] if i % 2 else [" "]} for i, r in enumerate(rows)])
    argv = ["coco", "--hf-dataset", str(tmp_path / "COCO-Caption"), "--num-train", "0", "--out-dir",
            str(tmp_path / "o")]
    assert run_cli(main, argv) == 2
    err = one_line(capsys.readouterr().err)
    assert f"none of its {len(rows)} images has reference captions" in err and "test2014" in err
    _parquet(hf, [{**r, "answer": [None, ""]} if i == 1 else r for i, r in enumerate(rows)])
    assert run_cli(main, argv) == 2
    assert f"image cocoid {rows[1]['id']} of the test split has no sentences" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------- reproduce_table1.sh and the COCO split
def _reproduce_table1(cwd: Path, data_root: Path, **env) -> subprocess.CompletedProcess:
    """scripts/reproduce_table1.sh on COCO alone, as tests/test_scripts.py runs the scripts (a subprocess, this
    interpreter first on PATH); the model is a stand-in, so anything past the input checks fails."""
    model = cwd / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    full = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", NUM_GPUS="0",
                HF_HUB_OFFLINE="1", MODEL_BASE=str(model), DATA_ROOT=str(data_root), RUNS_DIR=str(cwd / "runs"),
                BENCHMARKS="coco", TARGETS="coco", METHODS="lora", RANKS="4")
    for name in ("PYTHON", "ALLOW_NON_KARPATHY", "CORDA_DATA"):
        full.pop(name, None)
    full.update(env)
    return subprocess.run(["bash", str(REPO / "scripts" / "reproduce_table1.sh")], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=300)


def test_reproduce_table1_refuses_a_coco_that_is_not_karpathy(tmp_path):
    raw = _raw("coco", tmp_path, n=4)
    _parquet(tmp_path / "COCO-Caption" / "data" / "val-00000-of-00001.parquet", _caption_rows(raw))
    non_karpathy, karpathy = tmp_path / "lmms" / "coco", tmp_path / "karpathy" / "coco"
    _run("coco", non_karpathy, "--hf-dataset", tmp_path / "COCO-Caption", "--split", "val", "--num-train", 0)
    _run("coco", karpathy, "--raw-dir", raw, "--num-train", 2)
    (non_karpathy / "train.json").write_bytes((karpathy / "train.json").read_bytes())  # a target needs one

    proc = _reproduce_table1(tmp_path, non_karpathy.parent)
    message = one_line(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert "the COCO val2014 image set" in message and "not the Karpathy test split" in message
    assert "ALLOW_NON_KARPATHY=1" in message and "== zero-shot" not in proc.stderr
    assert not (tmp_path / "runs").exists()

    # ALLOW_NON_KARPATHY=1: a warning, and the run goes on (to the zero-shot stage, where the stand-in fails)
    proc = _reproduce_table1(tmp_path, non_karpathy.parent, ALLOW_NON_KARPATHY="1")
    assert "warning:" in proc.stderr and "val2014" in proc.stderr and "== zero-shot" in proc.stderr

    # the Karpathy split from dataset_coco.json passes the check without a word about it
    proc = _reproduce_table1(tmp_path, karpathy.parent)
    assert "== zero-shot" in proc.stderr and "Karpathy" not in proc.stderr

    # a manifest of an --hf-dataset import written before the split was recorded: unknown, so refused
    manifest = _json(non_karpathy / "manifest.json")
    (non_karpathy / "manifest.json").write_text(json.dumps(
        {k: v for k, v in manifest.items() if k not in ("karpathy", "coco_split")}))
    proc = _reproduce_table1(tmp_path, non_karpathy.parent)
    assert proc.returncode == 2 and "did not record which split" in one_line(proc.stderr)


# --------------------------------------------------------------------------------- howard-hou/OCR-VQA
def test_ocrvqa_schema_matches_raw_converter(tmp_path):
    raw = _raw("ocrvqa", tmp_path)
    data = _json(raw / "dataset.json")
    hf = tmp_path / "OCR-VQA"
    for code, name in ((1, "train"), (2, "validation"), (3, "test")):
        rows = []
        for key, e in data.items():
            if e["split"] != code:
                continue
            ext = Path(e["imageURL"]).suffix
            rows.append({"image": _img(raw / "images" / f"{key}{ext}"), "image_id": key,
                         "questions": e["questions"], "answers": e["answers"], "ocr_tokens": [],
                         "title": e["title"], "authorName": e["authorName"], "genre": e["genre"],
                         "image_url": e["imageURL"], "set_name": name})
        _parquet(hf / "data" / f"{name}-00000-of-00001.parquet", rows)
    for split in ("test", "val"):
        _run("ocrvqa", tmp_path / f"raw_{split}", "--raw-dir", raw, "--num-test", 5, "--split", split)
        _run("ocrvqa", tmp_path / f"hf_{split}", "--hf-dataset", hf, "--num-test", 5, "--split", split)
        _same_files(tmp_path / f"raw_{split}", tmp_path / f"hf_{split}", "questions.jsonl", "annotations.jsonl",
                    "sampled_ids.json")
        _check_images(tmp_path / f"hf_{split}", raw)


# ------------------------------------------------------------------------------------------ the hub path
def test_hub_names_go_through_load_dataset_with_configs_and_split_names(tmp_path, monkeypatch):
    data, calls = _gqa_hub(tmp_path, monkeypatch, known="lmms-lab/GQA")
    _run("gqa", tmp_path / "out", "--hf-dataset", "lmms-lab/GQA")
    assert calls == [("lmms-lab/GQA", "testdev_balanced_instructions", "testdev"),
                     ("lmms-lab/GQA", "testdev_balanced_images", "testdev")]
    assert [q["question_id"] for q in _lines(tmp_path / "out" / "questions.jsonl")] == list(data)
    assert _json(tmp_path / "out" / "manifest.json")["hf_dataset"] == "lmms-lab/GQA"


def _gqa_hub(tmp_path: Path, monkeypatch, known: str) -> tuple[dict, list]:
    """datasets.load_dataset that knows the GQA fixture under the hub name `known` only (as a local Hugging
    Face cache made under that name does, offline); returns the fixture's questions and the calls made
    (name, configuration, split)."""
    raw = _raw("gqa", tmp_path, n=3)
    data = _json(raw / "testdev_balanced_questions.json")
    local = tmp_path / "local"
    _parquet(local / "instructions.parquet", [{"id": q, "imageId": e["imageId"], "question": e["question"],
                                               "answer": e["answer"], "isBalanced": True} for q, e in data.items()])
    _parquet(local / "images.parquet", [{"id": e["imageId"], "image": _img(raw / "images" / f"{e['imageId']}.jpg")}
                                        for e in data.values()])
    real, calls = datasets.load_dataset, []

    def fake(name, config=None, split=None, **kwargs):
        if name == "parquet":
            return real(name, config, split=split, **kwargs)
        calls.append((name, config, split))
        if name != known:
            raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")
        if split != "testdev":
            raise ValueError(f'Unknown split "{split}". Should be one of [\'testdev\'].')
        part = config.removeprefix("testdev_balanced_")
        return real("parquet", data_files=str(local / f"{part}.parquet"), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    return data, calls


@pytest.mark.parametrize("cached,asked", [("lmms-lab/GQA", "lmms-lab-encoder/GQA"),
                                          ("lmms-lab-encoder/GQA", "lmms-lab/GQA")])
def test_lmms_eval_old_and_new_organisation_names_both_work(tmp_path, monkeypatch, capsys, cached, asked):
    """lmms-eval moved its datasets from lmms-lab/X to lmms-lab-encoder/X (2026-07): a copy cached under one
    name is found when the other is asked for, with a warning, and the manifest records the name loaded."""
    data, calls = _gqa_hub(tmp_path, monkeypatch, known=cached)
    names = lambda: [call[0] for call in calls]  # noqa: E731
    _run("gqa", tmp_path / "out", "--hf-dataset", asked)
    assert [q["question_id"] for q in _lines(tmp_path / "out" / "questions.jsonl")] == list(data)
    assert _json(tmp_path / "out" / "manifest.json")["hf_dataset"] == cached
    assert names() == [asked, cached, cached]        # the other name once; then straight to the one that loaded
    err = one_line(capsys.readouterr().err)
    assert f"--hf-dataset {asked} could not be loaded" in err and f"loaded {cached}" in err
    # the name asked for, when it is the one cached: no detour, no warning
    calls.clear()
    _run("gqa", tmp_path / "again", "--hf-dataset", cached)
    assert names() == [cached, cached] and "could not be loaded" not in capsys.readouterr().err


def test_hub_name_of_another_organisation_gets_no_alternative(tmp_path, monkeypatch, capsys):
    _, calls = _gqa_hub(tmp_path, monkeypatch, known="lmms-lab/GQA")
    assert run_cli(main, ["gqa", "--hf-dataset", "someone/GQA", "--out-dir", str(tmp_path / "o")]) == 2
    assert [c[0] for c in calls] == ["someone/GQA"] and "someone/GQA" in one_line(capsys.readouterr().err)
    assert run_cli(main, ["gqa", "--hf-dataset", "lmms-lab-encoder/nothing", "--out-dir", str(tmp_path / "o")]) == 2
    err = one_line(capsys.readouterr().err)
    assert [c[0] for c in calls[1:]] == ["lmms-lab-encoder/nothing", "lmms-lab/nothing"]
    assert "lmms-lab-encoder/nothing" in err and "lmms-lab/nothing" in err and "Hugging Face hub" in err


def test_help_names_the_new_organisation_and_the_okvqa_answer_field(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = one_line(capsys.readouterr().out)
    assert "from lmms-lab/X to lmms-lab-encoder/X in 2026-07" in text
    assert "PROCESSED `answer` strings" in text and "not `raw_answer`" in text
    assert "ALLOW_NON_KARPATHY=1" in text


def test_okvqa_answer_dicts_without_the_processed_answer_are_an_error(tmp_path, capsys):
    raw = _raw("okvqa", tmp_path, n=2)
    annotations = {a["question_id"]: a for a in _json(raw / "mscoco_val2014_annotations.json")["annotations"]}
    rows = [{"question_id": q["question_id"], "question": q["question"],
             "answers": [{"raw_answer": x["raw_answer"], "answer_id": x["answer_id"]}
                         for x in annotations[q["question_id"]]["answers"]],
             "image": _img(raw / f"val2014/COCO_val2014_{q['image_id']:012d}.jpg")}
            for q in _json(raw / "OpenEnded_mscoco_val2014_questions.json")["questions"]]
    _parquet(tmp_path / "OK-VQA" / "val2014.parquet", rows)
    assert run_cli(main, ["okvqa", "--hf-dataset", str(tmp_path / "OK-VQA"), "--out-dir", str(tmp_path / "o")]) == 2
    err = one_line(capsys.readouterr().err)
    assert "has no 'answer' field" in err and "not 'raw_answer'" in err
    assert not (tmp_path / "o").exists()


def test_unknown_hub_dataset_is_a_user_error(tmp_path, capsys):
    assert run_cli(main, ["okvqa", "--hf-dataset", "lmms-lab/no-such-dataset-xyz",
                          "--out-dir", str(tmp_path / "o")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "lmms-lab/no-such-dataset-xyz" in err and "Hugging Face hub" in err
    assert not (tmp_path / "o").exists()


# -------------------------------------------------------------------------------------------- errors
def test_missing_column_names_it_and_the_columns_present(tmp_path, capsys):
    raw = _raw("okvqa", tmp_path, n=2)
    hf = _okvqa_hf(raw, tmp_path / "OK-VQA", drop=("question", "answers"))
    assert run_cli(main, ["okvqa", "--hf-dataset", str(hf), "--out-dir", str(tmp_path / "o")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "missing column(s) 'question', 'answers'" in err
    assert "'question_id', 'question_type', 'answer_type', 'image'" in err
    assert not (tmp_path / "o").exists()


def test_missing_split_names_it_and_the_splits_found(tmp_path, capsys):
    raw = _raw("textvqa", tmp_path, n=2)
    _parquet(tmp_path / "tv" / "data" / "train-00000-of-00001.parquet", _textvqa_rows(raw))
    assert run_cli(main, ["textvqa", "--hf-dataset", str(tmp_path / "tv"), "--out-dir", str(tmp_path / "o")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no split 'validation' or 'val'" in err and "'train'" in err
    assert run_cli(main, ["okvqa", "--hf-dataset", str(tmp_path / "tv"), "--split", "val2015",
                          "--out-dir", str(tmp_path / "o")]) == 2
    assert "--split 'val2015'" in one_line(capsys.readouterr().err)
    assert run_cli(main, ["gqa", "--hf-dataset", str(tmp_path / "tv"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "no split 'testdev'" in " ".join(capsys.readouterr().err.split())
    _parquet(tmp_path / "tv" / "data" / "testdev-00000-of-00001.parquet", _textvqa_rows(raw))
    assert run_cli(main, ["gqa", "--hf-dataset", str(tmp_path / "tv"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "missing column(s) 'id', 'imageId'" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "o").exists()


def test_unknown_benchmark_and_bad_source_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["vqav2", "--hf-dataset", "lmms-lab/VQAv2", "--out-dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "invalid choice: 'vqav2'" in one_line(capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(["okvqa", "--hf-dataset", "x/y", "--raw-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")])
    assert "not allowed with" in one_line(capsys.readouterr().err)
    assert run_cli(main, ["okvqa", "--hf-dataset", "./no/such/folder", "--out-dir", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in one_line(capsys.readouterr().err)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(main, ["okvqa", "--hf-dataset", str(empty), "--out-dir", str(tmp_path / "o")]) == 2
    assert "no parquet files" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_null_image_cell_is_a_missing_image(tmp_path, capsys):
    raw = _raw("okvqa", tmp_path, n=4)
    hf = _okvqa_hf(raw, tmp_path / "OK-VQA", empty_image=1)
    argv = ["okvqa", "--hf-dataset", str(hf), "--out-dir", str(tmp_path / "o")]
    assert run_cli(main, argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "1 of the 4 selected" in err and "val2014/COCO_val2014_" in err and "--skip-missing-images" in err
    assert "/tmp/llava-sculpt-hf-" not in err
    assert not (tmp_path / "o").exists()
    assert run_cli(main, argv + ["--skip-missing-images"]) == 0
    assert len(_lines(tmp_path / "o" / "questions.jsonl")) == 3
