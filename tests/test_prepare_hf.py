"""`llava-sculpt prepare DATASET --hf-dataset NAME_OR_DIR`: each benchmark's synthetic raw fixture is also
written as a Hugging Face parquet dataset in the schema of the dataset users download (lmms-lab/OK-VQA,
lmms-lab/textvqa, lmms-lab/GQA, lmms-lab/ICON-QA, yerevann/coco-karpathy, lmms-lab/COCO-Caption,
howard-hou/OCR-VQA), with the fixture's real JPEG/PNG bytes as `datasets.Image` cells; the outputs of
`prepare --hf-dataset` are compared with what the raw-format converter writes for the same content."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_sculpt.data.prepare.cli import main
from llava_sculpt.data.prepare.synthetic_raw import write_raw_fixture
from llava_sculpt.errors import run_cli

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
def _iconqa_hf(raw: Path, root: Path, splits=("val", "test"), answer_as="index") -> Path:
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
                         "choice_image_0": None, "choice_image_1": None})
        _parquet(root / "data" / f"{split}-00000-of-00001.parquet", rows,
                 image_columns=("query_image", "choice_image_0", "choice_image_1"))
    return root


def test_iconqa_lmms_lab_schema_without_train_split(tmp_path, capsys):
    raw = _raw("iconqa", tmp_path)
    hf = _iconqa_hf(raw, tmp_path / "ICON-QA")
    _run("iconqa", tmp_path / "from_raw", "--raw-dir", raw, "--num-train", 0)
    capsys.readouterr()
    _run("iconqa", tmp_path / "from_hf", "--hf-dataset", hf)           # default --num-train 10000
    assert "no train split" in capsys.readouterr().err
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
    _same_files(tmp_path / "from_raw", tmp_path / "from_hf", "train.json", "questions.jsonl", "annotations.json",
                "sampled_ids.json")
    manifest = _json(tmp_path / "from_hf" / "manifest.json")
    assert Path(manifest["image_folder"]) == raw.resolve()

    # without --image-root the missing image column is named
    assert run_cli(main, ["coco", "--hf-dataset", str(hf), "--out-dir", str(tmp_path / "o")]) == 2


def test_coco_lmms_lab_caption_layout(tmp_path):
    """lmms-lab/COCO-Caption: question_id = image file name, answer = the captions, image."""
    raw = _raw("coco", tmp_path)
    images = [im for im in _json(raw / "dataset_coco.json")["images"] if im["split"] == "test"]
    rows = [{"question_id": im["filename"], "image": _img(raw / im["filepath"] / im["filename"]),
             "question": "Provide a one-sentence caption for the provided image.",
             "answer": [s["raw"] for s in im["sentences"]], "id": im["cocoid"], "file_name": im["filename"]}
            for im in images]
    _parquet(tmp_path / "COCO-Caption" / "data" / "test-00000-of-00001.parquet", rows)
    _run("coco", tmp_path / "from_raw", "--raw-dir", raw, "--num-train", 0)
    _run("coco", tmp_path / "from_hf", "--hf-dataset", tmp_path / "COCO-Caption", "--num-train", 0)
    _same_files(tmp_path / "from_raw", tmp_path / "from_hf", "questions.jsonl", "annotations.json",
                "sampled_ids.json")
    _check_images(tmp_path / "from_hf", raw)


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
        if name != "lmms-lab/GQA":
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed.")
        if split != "testdev":
            raise ValueError(f'Unknown split "{split}". Should be one of [\'testdev\'].')
        part = config.removeprefix("testdev_balanced_")
        return real("parquet", data_files=str(local / f"{part}.parquet"), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    _run("gqa", tmp_path / "out", "--hf-dataset", "lmms-lab/GQA")
    assert calls == [("lmms-lab/GQA", "testdev_balanced_instructions", "testdev"),
                     ("lmms-lab/GQA", "testdev_balanced_images", "testdev")]
    assert [q["question_id"] for q in _lines(tmp_path / "out" / "questions.jsonl")] == list(data)
    assert _json(tmp_path / "out" / "manifest.json")["hf_dataset"] == "lmms-lab/GQA"


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
    assert "--split 'val2015'" in capsys.readouterr().err
    assert run_cli(main, ["gqa", "--hf-dataset", str(tmp_path / "tv"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "no split 'testdev'" in " ".join(capsys.readouterr().err.split())
    _parquet(tmp_path / "tv" / "data" / "testdev-00000-of-00001.parquet", _textvqa_rows(raw))
    assert run_cli(main, ["gqa", "--hf-dataset", str(tmp_path / "tv"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "missing column(s) 'id', 'imageId'" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "o").exists()


def test_unknown_benchmark_and_bad_source_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["vqav2", "--hf-dataset", "lmms-lab/VQAv2", "--out-dir", str(tmp_path / "o")])
    assert exit_info.value.code == 2 and "invalid choice: 'vqav2'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["okvqa", "--hf-dataset", "x/y", "--raw-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")])
    assert "not allowed with" in capsys.readouterr().err
    assert run_cli(main, ["okvqa", "--hf-dataset", "./no/such/folder", "--out-dir", str(tmp_path / "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli(main, ["okvqa", "--hf-dataset", str(empty), "--out-dir", str(tmp_path / "o")]) == 2
    assert "no parquet files" in capsys.readouterr().err
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
