"""`llava-sculpt prepare DATASET --raw-dir RAW --out-dir OUT`: convert a benchmark's OFFICIAL raw files
into LLaVA-1.5 training JSON and evaluation question JSON lines.

    llava-sculpt prepare {iconqa,coco,okvqa,ocrvqa,gqa,textvqa} (--raw-dir RAW | --hf-dataset NAME_OR_DIR)
        --out-dir OUT [--split S] [--num-train 10000] [--num-test N|all] [--seed 0] [--image-root DIR]
        [--skip-missing-images]
    llava-sculpt prepare knowledge --out-dir OUT [--num-test N|all] [--seed 0]

knowledge needs no raw files: its text-only factual questions ship with llava-sculpt (see
llava_sculpt/eval/knowledge.py); it writes questions.jsonl, annotations.jsonl, sampled_ids.json and
manifest.json (image_folder = OUT, unused).

--hf-dataset reads the benchmark as a Hugging Face dataset instead (a hub name such as
lmms-lab-encoder/OK-VQA, lmms-lab-encoder/textvqa, lmms-lab-encoder/GQA, lmms-lab-encoder/ICON-QA,
yerevann/coco-karpathy, lmms-lab-encoder/COCO-Caption2017, howard-hou/OCR-VQA; a local folder of its
parquet files; or a save_to_disk folder) and writes the same files as the raw converter does; its images
are written under --image-root (default: OUT).  See hf.py for the columns used per benchmark.
  Names: lmms-eval moved its datasets from lmms-lab/X to lmms-lab-encoder/X in 2026-07.  Both names
  work: when one cannot be loaded (e.g. a local Hugging Face cache made under the old name, with
  HF_HUB_OFFLINE=1) the other is tried, with a warning; a local folder works whatever it is called.
  okvqa: `answers` must hold the PROCESSED `answer` strings of the official annotations (what
  GT-Vision-Lab's vqaEval.py and `llava-sculpt score okvqa` expect; the scorer normalises them itself),
  not `raw_answer`; of {"answer", "raw_answer"} dicts `answer` is read.
  coco: only the Karpathy layout (yerevann/coco-karpathy) is the Karpathy split the paper's CIDEr uses;
  lmms-lab(-encoder)/COCO-Caption `val` is all 40,504 val2014 images, `test` is test2014 (no published
  captions: an error), COCO-Caption2017 `val` is val2017.  manifest.json records "karpathy" and
  "coco_split" (e.g. karpathy_test, val2014), a non-Karpathy import prints a warning naming it, and
  scripts/reproduce_table1.sh refuses it unless ALLOW_NON_KARPATHY=1.
  iconqa: lmms-lab(-encoder)/ICON-QA joins `choices` with commas; a choice holding a comma ("1,000") is
  detected with a choice-count column (num_choices) when the dataset has one, else from the answer text
  or a thousands separator (with a warning naming the rows); other commas inside a non-answer choice
  cannot be seen.

Raw files expected in RAW (names as distributed):
  iconqa   problems.json, pid_splits.json                    images iconqa/{split}/choose_txt/{pid}/image.png
  coco     dataset_coco.json (Karpathy)                      images {filepath}/{filename}, e.g. val2014/COCO_val2014_...jpg
  okvqa    OpenEnded_mscoco_val2014_questions.json,          images val2014/COCO_val2014_{image_id:012d}.jpg
           mscoco_val2014_annotations.json
  ocrvqa   dataset.json                                      images images/{key}{ext of imageURL} (or images/{key}.jpg)
  gqa      testdev_balanced_questions.json                   images images/{imageId}.jpg
           [+ LLaVA's llava_gqa_testdev_balanced.jsonl]
  textvqa  TextVQA_0.5.1_val.json                            images train_images/{image_id}.jpg
           [+ LLaVA's llava_textvqa_val_v051_ocr.jsonl]
Image paths are relative to --image-root (default: RAW).  When LLaVA's ready-made question file is in
RAW (gqa, textvqa) it is validated (JSON lines with question_id, image, text; every question_id present in
the official file) and used as questions.jsonl, its lines unchanged (only sampled when --num-test is
given); the image folder is then --image-root or its images/ (gqa) / train_images/ (textvqa) sub-folder,
whichever holds the images.

--split is the EVALUATION split: iconqa test|val (default test), coco test|val (default test), okvqa
val2014, ocrvqa test|val|train (default test), gqa testdev_balanced (any {S}_questions.json), textvqa val.
Training samples (target tasks only) always come from IconQA `choose_txt_train` and COCO Karpathy
train + restval.

Outputs in OUT (all written atomically):
  train.json         iconqa, coco only (omitted with --num-train 0): LLaVA training list
                     [{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n" + prompt},
                                                        {"from": "gpt", "value": answer}]}],
                     --num-train samples (default 10000; all when fewer exist), in raw-file order.
                       iconqa: id "iconqa_{pid}"; prompt = question, "A. choice" lines, then
                               "Answer with the option's letter from the given choices directly."; answer = letter.
                       coco:   one sample per (image, reference sentence); id "coco_{cocoid}_{k}";
                               prompt = "Provide a one-sentence caption for the provided image."; answer = raw sentence.
  questions.jsonl    every dataset: {"question_id", "image", "text", "category"} per line, no "<image>" token
                     (the generator adds it), in raw-file order.
                       iconqa  question_id = pid (str), text = the multiple-choice prompt above, category "choose_txt"
                       coco    question_id = cocoid (int), text = the caption instruction, category "caption"
                       okvqa   question_id (int), text = question + "\\nAnswer the question using a single word or phrase."
                       ocrvqa  question_id = "{key}_{index}" (str), text = question + the same suffix
                       gqa     question_id = qid (str), text = question + the same suffix
                       textvqa question_id (int), text = question [+ "\\nReference OCR token: a, b, c"] + the same suffix
                     (category "default" for the four short-answer datasets)
  annotations.jsonl  iconqa, ocrvqa: the questions.jsonl lines plus "answer" (iconqa: the letter;
                     ocrvqa: the answer string)
  annotations.json   okvqa: the official annotations file restricted to the sampled questions;
                     gqa: the official {S}_questions.json (dict qid -> entry) restricted;
                     textvqa: the official TextVQA_0.5.1_{S}.json with "data" restricted;
                     coco: COCO caption format {"images": [{"id", "file_name"}],
                           "annotations": [{"image_id", "id", "caption"}], "info", "licenses", "type"}
                           from the raw Karpathy sentences of the sampled images
  questions_official.json  okvqa only: the official questions file restricted to the sample
  sampled_ids.json   {"dataset", "split", "seed", "num_train", "num_test" (as requested, null = all),
                      "train_ids": [...], "test_ids": [...]} (train_ids empty for source datasets)
  manifest.json      {"dataset", "split", "seed", "image_folder" (absolute: pass it as --image_folder /
                      --image-folder), "raw_files", "files": {role: file name}, "counts": {...}}
                     (+ "hf_dataset", "tables" with --hf-dataset; coco: "karpathy" true/false and
                     "coco_split", e.g. karpathy_test, or val2014 for lmms-lab/COCO-Caption val)

Sampling: --num-train / --num-test items are drawn without replacement by `random.Random("{dataset}:
{train|test}:{seed}")` and kept in raw-file order, so the same seed gives the same ids on every machine.
--num-test defaults to all questions; the LoRASculpt paper used 2,000 random OCR-VQA test questions
(`--num-test 2000`).  Every image referenced by a chosen sample must exist, else this is an error listing
how many are missing and the first few paths; --skip-missing-images instead drops such samples (before
sampling) with a warning.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Sequence

from llava_sculpt.errors import UserError, run_cli
from llava_sculpt.data.prepare.common import PrepareOptions, Prepared, warn, write_json, write_jsonl

DATASETS = ("iconqa", "coco", "okvqa", "ocrvqa", "gqa", "textvqa", "knowledge")
BUILT_IN_DATASETS = ("knowledge",)  # ship with llava-sculpt: no --raw-dir / --hf-dataset
TARGET_DATASETS = ("iconqa", "coco")
DEFAULT_NUM_TRAIN = 10000


def _count(text: str) -> int | None:
    if text.lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer or 'all', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer or 'all', got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llava-sculpt prepare", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("dataset", choices=DATASETS)
    source = parser.add_mutually_exclusive_group()  # one is required, except for the built-in datasets
    source.add_argument("--raw-dir", type=Path, help="folder with the official raw files")
    source.add_argument("--hf-dataset", metavar="NAME_OR_DIR",
                        help="the benchmark as a Hugging Face dataset: a hub name (lmms-eval's are now "
                             "lmms-lab-encoder/X, formerly lmms-lab/X: both work), a local folder of parquet "
                             "files, or a save_to_disk folder (instead of --raw-dir)")
    parser.add_argument("--out-dir", required=True, type=Path, help="folder to write the outputs to")
    parser.add_argument("--split", default=None, help="evaluation split (dataset-specific default)")
    parser.add_argument("--num-train", type=_count, default=DEFAULT_NUM_TRAIN,
                        help="training samples for iconqa/coco (default 10000; 'all'; 0 = no train.json)")
    parser.add_argument("--num-test", type=_count, default=None,
                        help="evaluation questions to sample (default all; the paper used 2000 for ocrvqa)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--image-root", type=Path, default=None,
                        help="folder the image paths are relative to (default: --raw-dir; with --hf-dataset: "
                             "the folder the dataset's images are written to, default --out-dir)")
    parser.add_argument("--skip-missing-images", action="store_true",
                        help="drop samples whose image is missing (with a warning) instead of failing")
    return parser


def prepare(opts: PrepareOptions) -> Prepared:
    """Run the converter of `opts.dataset` (returns the result without writing it)."""
    module = importlib.import_module(f"llava_sculpt.data.prepare.{opts.dataset}")
    return module.prepare(opts)


def write_outputs(opts: PrepareOptions, result: Prepared, source: dict | None = None) -> dict[str, str]:
    """Write a converter's result to opts.out_dir; returns {role: file name}.  `source` (--hf-dataset:
    the dataset and the splits read) is recorded in manifest.json."""
    out = opts.out_dir
    files = {}
    if result.train is not None:
        write_json(out / "train.json", result.train, indent=1)
        files["train"] = "train.json"
    write_jsonl(out / "questions.jsonl", result.questions)
    files["questions"] = "questions.jsonl"
    for name, rows in result.jsonl_files.items():
        write_jsonl(out / name, rows)
        files[name.split(".")[0]] = name
    for name, obj in result.json_files.items():
        write_json(out / name, obj)
        files[name.split(".")[0]] = name
    train_ids = [sample["id"] for sample in result.train or []]
    test_ids = [q["question_id"] for q in result.questions]
    write_json(out / "sampled_ids.json", {
        "dataset": opts.dataset, "split": result.split, "seed": opts.seed,
        "num_train": opts.num_train if opts.dataset in TARGET_DATASETS else 0, "num_test": opts.num_test,
        "train_ids": train_ids, "test_ids": test_ids}, indent=1)
    files["sampled_ids"] = "sampled_ids.json"
    files["manifest"] = "manifest.json"
    write_json(out / "manifest.json", {
        "dataset": opts.dataset, "split": result.split, "seed": opts.seed,
        "image_folder": str(result.image_folder.resolve()),
        "raw_files": [str(p.resolve()) for p in result.raw_files], **(source or {}), **result.manifest,
        "files": files,
        "counts": {"train": len(train_ids), "test": len(test_ids)}}, indent=1)
    return files


def _main_hf(args: argparse.Namespace) -> tuple[PrepareOptions, Prepared, dict]:
    """--hf-dataset: rebuild the raw files from the dataset and run the same converter."""
    from llava_sculpt.data.prepare.hf import prepare_hf

    image_root = args.image_root if args.image_root is not None else args.out_dir
    if image_root.exists() and not image_root.is_dir():
        raise UserError(f"--image-root {image_root} is not a folder.")
    opts = PrepareOptions(dataset=args.dataset, raw_dir=Path("."), out_dir=args.out_dir, image_root=image_root,
                          split=args.split, num_train=args.num_train, num_test=args.num_test, seed=args.seed,
                          skip_missing_images=args.skip_missing_images)
    converter = importlib.import_module(f"llava_sculpt.data.prepare.{args.dataset}").prepare
    result = prepare_hf(opts, args.hf_dataset, converter, image_root_given=args.image_root is not None)
    opts.num_train, opts.split = result.num_train, result.prepared.split
    print(f"wrote {result.images_written} images under {image_root}")
    return opts, result.prepared, result.source


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.num_test == 0:
        raise UserError("--num-test 0 would write no questions; give a positive number or 'all'.")
    if args.dataset not in TARGET_DATASETS and args.num_train not in (0, DEFAULT_NUM_TRAIN):
        warn(f"--num-train is ignored for {args.dataset}: only iconqa and coco get a train.json.")
    if args.dataset in BUILT_IN_DATASETS:
        if args.raw_dir is not None or args.hf_dataset is not None:
            raise UserError(f"{args.dataset} ships with llava-sculpt: give only --out-dir (no --raw-dir / --hf-dataset).")
        opts = PrepareOptions(dataset=args.dataset, raw_dir=Path("."), out_dir=args.out_dir, image_root=args.out_dir,
                              split=args.split, num_train=0, num_test=args.num_test, seed=args.seed)
        result = prepare(opts)
        files = write_outputs(opts, result)
        _report(opts, result, files)
        return 0
    if args.raw_dir is None and args.hf_dataset is None:
        raise UserError(f"prepare {args.dataset}: give --raw-dir RAW (the official files) or --hf-dataset NAME_OR_DIR.")
    if args.hf_dataset is not None:
        opts, result, source = _main_hf(args)
        files = write_outputs(opts, result, source)
        _report(opts, result, files)
        return 0
    if not args.raw_dir.is_dir():
        raise UserError(f"--raw-dir {args.raw_dir} is not a folder; expected the folder holding the "
                        f"official {args.dataset} files.")
    image_root = args.image_root if args.image_root is not None else args.raw_dir
    if not image_root.is_dir():
        raise UserError(f"--image-root {image_root} is not a folder; expected the folder the image paths "
                        f"are relative to.")
    opts = PrepareOptions(dataset=args.dataset, raw_dir=args.raw_dir, out_dir=args.out_dir,
                          image_root=image_root, split=args.split, num_train=args.num_train,
                          num_test=args.num_test, seed=args.seed, skip_missing_images=args.skip_missing_images)
    result = prepare(opts)
    files = write_outputs(opts, result)
    _report(opts, result, files)
    return 0


def _report(opts: PrepareOptions, result: Prepared, files: dict[str, str]) -> None:
    out = opts.out_dir
    if result.train is not None:
        print(f"wrote {out / files['train']} ({len(result.train)} training samples)")
    print(f"wrote {out / files['questions']} ({len(result.questions)} {result.split} questions)")
    for role in ("annotations", "questions_official"):
        if role in files:
            print(f"wrote {out / files[role]}")
    print(f"wrote {out / 'sampled_ids.json'} and {out / 'manifest.json'}")
    print(f"image folder: {result.image_folder.resolve()}  (pass it as --image_folder / --image-folder)")


if __name__ == "__main__":
    sys.exit(run_cli(main))
