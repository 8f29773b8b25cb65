"""COCO captions, Karpathy split (target task): dataset_coco.json -> train.json, questions.jsonl,
annotations.json.

Training pool = every (image, reference sentence) pair of the Karpathy `train` and `restval` images (the
113k-image "Karpathy train"); one training sample = one pair, answer = the sentence's `raw` text stripped
of surrounding white space (case and punctuation as annotated).  Evaluation = one question per image of
the evaluation split (`test`, 5,000 images, by default), question_id = cocoid, and a COCO caption-format
ground truth built from the `raw` sentences of those images (the same content as DataOptim's
`captions_test5k.json`).  Images: `{filepath}/{filename}` relative to the image root."""
from __future__ import annotations

from llava_sculpt.errors import UserError
from llava_sculpt.data.prepare.common import (PrepareOptions, Prepared, expect_type, get_field, llava_sample,
                                              load_json, select)

# LLaVA-1.5's short-caption instruction; used for training and evaluation prompts alike.
CAPTION_INSTRUCTION = "Provide a one-sentence caption for the provided image."
TRAIN_SPLITS = ("train", "restval")
EVAL_SPLITS = ("test", "val")


def _parse(opts: PrepareOptions) -> tuple[list[dict], object]:
    path = opts.raw_dir / "dataset_coco.json"
    data = expect_type(load_json(path, "Karpathy dataset_coco.json"), dict, path, "the top level")
    images = get_field(data, "images", list, path, "the top level")
    parsed = []
    for index, entry in enumerate(images):
        where = f"images[{index}]"
        filepath = get_field(entry, "filepath", str, path, where)
        filename = get_field(entry, "filename", str, path, where)
        cocoid = get_field(entry, "cocoid", int, path, where)
        split = get_field(entry, "split", str, path, where)
        if split not in TRAIN_SPLITS + EVAL_SPLITS:
            raise UserError(f"{path}: field 'split' of {where} is {split!r}; expected train, restval, val or test.")
        sentences = get_field(entry, "sentences", list, path, where)
        raws = [get_field(s, "raw", str, path, f"{where}.sentences[{k}]").strip() for k, s in enumerate(sentences)]
        parsed.append({"cocoid": cocoid, "image": f"{filepath}/{filename}", "split": split, "captions": raws})
    return parsed, path


def prepare(opts: PrepareOptions) -> Prepared:
    split = opts.split or "test"
    if split not in EVAL_SPLITS:
        raise UserError(f"--split {split!r} is not a Karpathy evaluation split; expected test or val "
                        f"(training samples always come from train + restval).")
    images, path = _parse(opts)
    folder = opts.image_root

    train = None
    if opts.num_train != 0:
        pool = [{"id": f"coco_{im['cocoid']}_{k}", "image": im["image"], "caption": caption}
                for im in images if im["split"] in TRAIN_SPLITS for k, caption in enumerate(im["captions"])]
        chosen = select(pool, opts.num_train, opts, "train", folder, what="COCO training captions")
        train = [llava_sample(it["id"], it["image"], CAPTION_INSTRUCTION, it["caption"]) for it in chosen]

    pool = [im for im in images if im["split"] == split]
    chosen = select(pool, opts.num_test, opts, "test", folder, what=f"COCO Karpathy {split} images")
    questions = [{"question_id": im["cocoid"], "image": im["image"], "text": CAPTION_INSTRUCTION,
                  "category": "caption"} for im in chosen]
    ground_truth = {"info": {"description": f"COCO captions, Karpathy {split} split, from {path.name}"},
                    "licenses": [], "type": "captions",
                    "images": [{"id": im["cocoid"], "file_name": im["image"]} for im in chosen],
                    "annotations": []}
    for im in chosen:
        if not im["captions"]:
            raise UserError(f"{path}: image cocoid {im['cocoid']} of the {split} split has no sentences; "
                            f"every evaluation image needs reference captions.")
        for caption in im["captions"]:
            ground_truth["annotations"].append({"image_id": im["cocoid"], "id": len(ground_truth["annotations"]) + 1,
                                                "caption": caption})
    # dataset_coco.json is Karpathy's file: its splits are Karpathy's (scripts/reproduce_table1.sh checks this)
    return Prepared(split=split, image_folder=folder, questions=questions, train=train,
                    json_files={"annotations.json": ground_truth}, raw_files=[path],
                    manifest={"karpathy": True, "coco_split": f"karpathy_{split}"})


# ------------------------------------------------------------------------- is a prepared COCO Karpathy's?
KARPATHY_CHECK_NOT_KARPATHY = 3     # exit status of `python -m llava_sculpt.data.prepare.coco MANIFEST`


def karpathy_status(manifest: dict) -> tuple[bool, str]:
    """(whether a `prepare coco` manifest.json is a Karpathy split, what it is, in words).  `prepare`
    records "karpathy" and "coco_split"; a manifest written before it did is Karpathy when it came from
    --raw-dir (this converter reads only Karpathy's dataset_coco.json) and unknown from --hf-dataset."""
    split = manifest.get("coco_split")
    if "karpathy" in manifest:
        karpathy = manifest["karpathy"] is True
        if not karpathy:
            return False, f"the COCO {split} image set from {manifest.get('hf_dataset') or 'an unknown source'}"
        return True, f"the Karpathy {manifest.get('split')} split"
    if manifest.get("hf_dataset"):
        return False, (f"a COCO split of unknown kind, imported from {manifest['hf_dataset']} by an older "
                       f"llava-sculpt that did not record which split it is (run `llava-sculpt prepare coco "
                       f"--hf-dataset ...` again to record it)")
    return True, f"the Karpathy {manifest.get('split')} split (from dataset_coco.json)"


def _check_main(argv: list[str]) -> int:
    """`python -m llava_sculpt.data.prepare.coco MANIFEST`: one line saying what the prepared COCO is; exit 0
    when it is a Karpathy split, KARPATHY_CHECK_NOT_KARPATHY when not, 2 when the manifest is unreadable."""
    import json
    import sys

    if len(argv) != 1:
        print("usage: python -m llava_sculpt.data.prepare.coco MANIFEST", file=sys.stderr)
        return 2
    try:
        with open(argv[0], encoding="utf-8") as handle:
            manifest = json.load(handle)
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        print(f"{argv[0]}: not a readable `llava-sculpt prepare` manifest ({err})")
        return 2
    karpathy, what = karpathy_status(manifest)
    if karpathy:
        print(f"{argv[0]}: {what}")
        return 0
    print(f"{argv[0]}: {what}, not the Karpathy test split the paper's COCO CIDEr is computed on")
    return KARPATHY_CHECK_NOT_KARPATHY


if __name__ == "__main__":
    import sys

    sys.exit(_check_main(sys.argv[1:]))
