"""`llava-sculpt prepare DATASET --hf-dataset NAME_OR_DIR`: the same outputs as the raw-format converters,
from the benchmark as a Hugging Face dataset (the parquet datasets lmms-eval evaluates on).

NAME_OR_DIR is either
  * a dataset name on the Hugging Face hub (`datasets.load_dataset`; needs network access, or the dataset
    already in the local Hugging Face cache, e.g. with HF_HUB_OFFLINE=1).  lmms-eval moved its datasets from
    lmms-lab/X to lmms-lab-encoder/X in 2026-07: either name is accepted, and when one cannot be loaded (e.g.
    a cache made under the old name) the other is tried, with a warning; manifest.json records the name
    that loaded,
  * a local folder of parquet files (a clone or `hf download` of the dataset repository: files named
    `{split}-00000-of-0000N[-hash].parquet` or `{split}.parquet`, in any sub-folder; `0000.parquet` files
    take the split from their folder name), or a single parquet file (taken as the requested split),
  * a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (`datasets.load_from_disk`).
A dataset with several configurations (GQA) is a folder with one sub-folder per configuration.

How it works: the rows are rewritten into the benchmark's official raw files (REFERENCE.md section 6) in a
temporary folder, and the raw-format converter of the benchmark (iconqa.py, coco.py, ...) runs on them, so
the question / annotation / training files are exactly what that converter writes for the same content.
Images (`datasets.Image` columns: {"bytes", "path"} or PIL images) are written, their bytes unchanged, to
the image folder (--image-root, default --out-dir) under the relative path the converter gives them (e.g.
`val2014/COCO_val2014_000000000042.jpg`); only the images of the sampled questions / training samples are
written.  A dataset without an image column (yerevann/coco-karpathy) reads its images from --image-root,
as the raw converters do.

Columns read, per benchmark, and where that schema comes from (facts read from lmms-eval's task files
under lmms_eval/tasks/ and from the dataset cards' `dataset_info` blocks):

  okvqa    lmms-lab/OK-VQA, split val2014 (lmms-eval ok_vqa_val2014: doc["question"], doc["answers"],
           doc["question_id"], doc["image"]; card features question_id (string), image, question,
           answers (list of string), question_type, answer_type).  Used: question_id (int or a string of
           digits), question, answers (10 strings, or official {"answer", ...} dicts), image; image_id when
           the dataset has it, else question_id // 10 (OK-VQA numbers a question image_id * 10 + k); every
           other column (question_type, answer_type, ...) is copied into the annotation entry.  The
           answers must be the PROCESSED `answer` strings of the official annotations (what GT-Vision-Lab's
           vqaEval.py and `llava-sculpt score okvqa` compare against, normalising them only as that
           evaluator does), not `raw_answer`; of {"answer", "raw_answer", ...} dicts `answer` is read.
  textvqa  lmms-lab/textvqa, split validation (lmms-eval textvqa_val: doc["question"], doc["answers"],
           doc["ocr_tokens"], doc["question_id"], doc["image"]; card features image_id, question_id,
           question, question_tokens, image, image_width, image_height, flickr_original_url,
           flickr_300k_url, answers, image_classes, set_name, ocr_tokens, i.e. the official
           TextVQA_0.5.1 entry plus the image).  Used: question_id, question, image_id, answers, image;
           every other column is kept in the entry (ocr_tokens gives LLaVA's "Reference OCR token" line).
  gqa      lmms-lab/GQA, configurations {S}_instructions and {S}_images, split testdev for S =
           testdev_balanced (lmms-eval gqa: dataset_name testdev_balanced_instructions, doc["question"],
           doc["imageId"], target "answer", images from testdev_balanced_images joined on its "id";
           card: the *_images configurations have id, image; the *_instructions ones id, imageId,
           question, isBalanced, ...).  Used: id (the question id), imageId, question, answer; every
           other column (fullAnswer, isBalanced, types, ...) is kept in the entry.  Images: the
           `image` column of {S}_images rows, matched by id == imageId (or an `image` column of the
           instructions themselves).
  iconqa   lmms-lab/ICON-QA, splits val and test (lmms-eval iconqa: doc["question"], doc["ques_type"],
           doc["choices"].split(","), doc["query_image"]; card features question_id, question, choices
           (string), answer (string), query_image, choice_image_0, choice_image_1, ques_type, label,
           grade, skills).  Used: question_id, question, choices (comma-separated string or a list),
           answer, ques_type (rows other than choose_txt are skipped, as the raw converter skips them),
           query_image (or image).  `choices` is one comma-joined string there, so a choice holding a
           comma ("1,000") comes back as two: a choice-count column (num_choices, choice_count,
           n_choices, num_options), when present, settles each row (an unresolvable mismatch is an
           error); otherwise an answer text holding the comma, or digits split at a thousands separator,
           are joined back with a warning listing the rows (split_iconqa_choices).  A comma inside a
           non-numeric choice that is not the answer cannot be detected: a list-valued `choices` avoids it.
           The card does not say how `answer` encodes the right choice: it is
           read as an index into the choices (the official problems.json convention) or as the choice
           text, whichever fits every choose_txt row (index when both do, with a warning if that changes
           an answer).  lmms-lab/ICON-QA has no train split: train.json needs a dataset with one.
  coco     yerevann/coco-karpathy, split test (lmms-eval coco_karpathy_test: doc["filename"],
           doc["sentences"] (the reference captions), doc["imgid"], doc["url"]; no image column, so the
           images come from --image-root, e.g. a COCO 2014 folder holding val2014/...).  Used: filename,
           sentences (strings, or {"raw"} dicts), filepath and cocoid when present (else the folder and
           the id parsed from a COCO_{folder}_{id}.jpg file name), image when present.  Training samples
           come from the train and restval splits.  Also accepted: the lmms-lab/COCO-Caption and
           lmms-lab/COCO-Caption2017 layout (lmms-eval coco2014_cap_val / coco2017_cap_val:
           doc["question_id"] = the image file name, the image id parsed from it, doc["answer"] = the
           reference captions, doc["image"]); each row is one evaluation image, the folder is the one in a
           COCO_{folder}_ file name, else the split name.  Only the Karpathy layout is the Karpathy split:
           lmms-lab/COCO-Caption `val` is all 40,504 val2014 images, its `test` is test2014 (no published
           references: an error), COCO-Caption2017 `val` is val2017.  manifest.json records "karpathy"
           (true/false) and "coco_split" (karpathy_test, karpathy_val, or the image set read from the file
           names: val2014, test2014, val2017, ...), annotations.json's "info" says the same, and a
           non-Karpathy import prints a warning naming the split used (scripts/reproduce_table1.sh refuses
           it unless ALLOW_NON_KARPATHY=1).  Null or blank captions are dropped; an evaluation image left
           without any is an error.
  ocrvqa   howard-hou/OCR-VQA, splits train / validation / test (not in lmms-eval; card features image,
           image_id, questions, answers, ocr_tokens, ocr_info, title, authorName, genre, image_width,
           image_height, image_url, set_name).  Used: image_id (the book key), questions, answers, image,
           image_url (its extension names the image file; .jpg when the column is missing), title,
           authorName, genre when present.

Schemas not confirmed by the material above (stated in the README): the columns of GQA's
*_instructions configurations beyond id, imageId, question, isBalanced and answer; the encoding of
ICON-QA's `answer`; the columns of lmms-lab/COCO-Caption beyond question_id, answer, id and image; the
form of COCO-Caption2017's file names (taken as COCO 2017's {id:012d}.jpg when they have no COCO_{set}_
prefix, which labels the split {split}2017); whether any lmms-lab ICON-QA copy has a choice-count column.
A dataset that lacks a column a benchmark needs is a UserError naming the missing column(s) and the
columns present.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from llava_sculpt.atomic import atomic_open
from llava_sculpt.errors import UserError
from llava_sculpt.data.prepare.common import PrepareOptions, Prepared, warn, write_json

# Hub split names tried, in order, for each split name of the raw converters.
SPLIT_ALIASES = {"val": ("validation", "val"), "test": ("test",), "train": ("train",), "restval": ("restval",)}
DEFAULT_SPLIT = {"okvqa": "val2014", "textvqa": "val", "gqa": "testdev_balanced", "iconqa": "test",
                 "coco": "test", "ocrvqa": "test"}
EVAL_SPLITS = {"okvqa": ("val2014", "train2014"), "textvqa": ("val", "train", "test"),
               "iconqa": ("test", "val"), "coco": ("test", "val"), "ocrvqa": ("test", "val", "train")}
OCRVQA_SPLIT_CODES = {"train": 1, "val": 2, "test": 3}
COCO_FILE_NAME = re.compile(r"COCO_([A-Za-z0-9]+)_0*(\d+)\.\w+$")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("--hf-dataset needs the `datasets` library, which is not installed: "
                        "pip install 'llava-sculpt[eval]' (or pip install datasets).") from None
    return datasets


# ------------------------------------------------------------------------------------------- loading
def canonical_split(dataset: str, split: str | None) -> str:
    """The raw converter's split name for --split (hub spellings such as 'validation' accepted)."""
    split = split or DEFAULT_SPLIT[dataset]
    if dataset == "gqa":
        if not re.fullmatch(r"[A-Za-z]+_(balanced|all)", split):
            raise UserError(f"--split {split!r} is not a GQA split; expected e.g. testdev_balanced (the "
                            f"lmms-lab/GQA configurations {split}_instructions / {split}_images).")
        return split
    if split == "validation":
        split = "val"
    if split not in EVAL_SPLITS[dataset]:
        raise UserError(f"--split {split!r} is not a {dataset} split for --hf-dataset; expected one of "
                        f"{', '.join(EVAL_SPLITS[dataset])}.")
    return split


@dataclass
class Table:
    """One loaded split of the Hugging Face dataset."""
    ds: Any                 # datasets.Dataset
    label: str              # "lmms-lab/OK-VQA [val2014]", for messages and the manifest
    split: str              # the raw converter's split name this table provides

    @property
    def columns(self) -> list[str]:
        return list(self.ds.column_names)

    def require(self, columns: Sequence[str], schema: str) -> None:
        missing = [c for c in columns if c not in self.columns]
        if missing:
            raise UserError(f"--hf-dataset {self.label}: missing column(s) {', '.join(map(repr, missing))}; "
                            f"the columns present are {', '.join(map(repr, self.columns)) or 'none'}. "
                            f"Expected {schema}.")

    def rows(self, drop: Sequence[str] = ()) -> list[dict]:
        """Every row as a dict, without the columns in `drop` and without any image column."""
        image_type = _datasets().Image
        drop = [c for c in self.columns
                if c in drop or isinstance(self.ds.features.get(c), image_type)]
        return (self.ds.remove_columns(drop) if drop else self.ds).to_list()


# lmms-eval's hub organisations: its datasets moved from lmms-lab/X to lmms-lab-encoder/X in 2026-07 (same
# repositories, same files); either name is accepted and the other is tried when one cannot be loaded.
LMMS_EVAL_ORGS = ("lmms-lab", "lmms-lab-encoder")


def other_hub_names(spec: str) -> list[str]:
    """The same dataset under lmms-eval's other organisation(s): 'lmms-lab/X' <-> 'lmms-lab-encoder/X'."""
    org, slash, rest = spec.partition("/")
    if not slash or org not in LMMS_EVAL_ORGS:
        return []
    return [f"{other}/{rest}" for other in LMMS_EVAL_ORGS if other != org]


class _HubUnavailable(Exception):
    """A hub name could not be loaded at all (not on the hub, not in the cache, no network)."""

    def __init__(self, cause: Exception):
        super().__init__(str(cause))
        self.cause = cause


def _short(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"


class Source:
    """--hf-dataset: a hub name, a local folder / parquet file, or a save_to_disk folder."""

    def __init__(self, spec: str):
        self.spec = spec
        self.path = Path(spec).expanduser()
        self.local = self.path.exists()
        self.resolved: str | None = None      # the hub name that loaded (spec, or its other organisation)
        if not self.local and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
            raise UserError(f"--hf-dataset {spec}: no such file or folder (a local dataset must be a folder of "
                            f"parquet files, a parquet file or a save_to_disk folder; a hub dataset is "
                            f"named like lmms-lab-encoder/OK-VQA, formerly lmms-lab/OK-VQA).")

    def name(self) -> str:
        return str(self.path.resolve()) if self.local else (self.resolved or self.spec)

    def load(self, names: Sequence[str], config: str | None = None, required: bool = True,
             split: str | None = None, config_optional: bool = False) -> Table | None:
        """The first of the split `names` the dataset has (None, or a UserError when `required`)."""
        if self.local:
            return self._load_local(names, config, required, split, config_optional)
        return self._load_hub(names, config, required, split)

    # -- hub
    def _load_hub(self, names, config, required, split) -> Table | None:
        """Load from the hub (or the local Hugging Face cache).  A name under one of lmms-eval's two
        organisations (LMMS_EVAL_ORGS) that cannot be loaded is tried under the other one, so a cache or
        mirror made before or after the 2026-07 move works with either name."""
        repos = [self.resolved] if self.resolved else [self.spec, *other_hub_names(self.spec)]
        failures = []
        for repo in repos:
            try:
                table = self._load_hub_repo(repo, names, config, required, split)
            except _HubUnavailable as err:
                failures.append((repo, err.cause))
                continue
            if self.resolved is None and repo != self.spec:
                warn(f"--hf-dataset {self.spec} could not be loaded ({_short(failures[0][1])}); loaded {repo}, the "
                     f"same dataset under lmms-eval's other organisation name (lmms-eval moved its datasets from "
                     f"lmms-lab/X to lmms-lab-encoder/X in 2026-07). manifest.json records {repo}.")
            self.resolved = repo
            return table
        what = " nor ".join(f"{repo}" + (f" (configuration {config})" if config else "") for repo, _ in failures)
        tried = "; ".join(f"{repo}: {_short(cause)}" for repo, cause in failures)
        raise UserError(f"--hf-dataset {what}: cannot load it from the Hugging Face hub ({tried}). A hub dataset "
                        f"needs network access or a copy in the local Hugging Face cache; or give a local folder "
                        f"of parquet files or a save_to_disk folder.")

    def _load_hub_repo(self, repo, names, config, required, split) -> Table | None:
        datasets = _datasets()
        what = f"{repo}" + (f" (configuration {config})" if config else "")
        last = None
        for name in names:
            try:
                args = (repo, config) if config else (repo,)
                ds = datasets.load_dataset(*args, split=name)
            except ValueError as err:
                if "Unknown split" in str(err):
                    last = err
                    continue
                raise UserError(f"--hf-dataset {what}: cannot load split {name!r}: {err}") from None
            except Exception as err:  # network, not on the hub, not in the cache, ...
                raise _HubUnavailable(err) from None
            return Table(ds, f"{what} [{name}]", split or names[0])
        if required:
            raise UserError(f"--hf-dataset {what}: no split {' or '.join(map(repr, names))} ({last}).")
        return None

    # -- local
    def _load_local(self, names, config, required, split, config_optional) -> Table | None:
        datasets = _datasets()
        root = self.path
        what = str(root)
        if config:
            if (root / config).is_dir():
                root, what = root / config, f"{root}/{config}"
            elif not config_optional and not required:
                return None
            elif not config_optional:
                raise UserError(f"--hf-dataset {self.path}: no sub-folder {config!r}; a dataset with several "
                                f"configurations must be a folder with one sub-folder per configuration "
                                f"(as in the hub repository).")
        found = _local_splits(root, datasets)
        for name in names:
            if name in found:
                return Table(_open_split(found[name], name, datasets), f"{what} [{name}]", split or names[0])
        if None in found:       # a single parquet file or a save_to_disk Dataset: the split asked for
            ds = _open_split(found[None], names[0], datasets)
            recorded = getattr(ds, "split", None) if not isinstance(found[None], list) else None
            if recorded is not None and str(recorded) not in names:
                warn(f"--hf-dataset {what} holds one split, recorded as {str(recorded)!r}; using it as the "
                     f"{names[0]!r} split.")
            return Table(ds, f"{what}", split or names[0])
        if required:
            have = ", ".join(sorted(map(repr, found))) or "none"
            raise UserError(f"--hf-dataset {what}: no split {' or '.join(map(repr, names))}; the splits found "
                            f"are {have} (parquet files are named {{split}}-00000-of-00001.parquet).")
        return None


def _local_splits(root: Path, datasets) -> dict[str | None, Any]:
    """{split: a Dataset or a list of parquet files}; key None = one unnamed split."""
    if root.is_file():
        if root.suffix != ".parquet":
            raise UserError(f"--hf-dataset {root}: expected a parquet file, a folder of parquet files or a "
                            f"save_to_disk folder.")
        return {None: [root]}
    if (root / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(root))
        return dict(loaded.items())
    if (root / "state.json").is_file():        # one Dataset: it is the split asked for
        return {None: datasets.load_from_disk(str(root))}
    groups: dict[str | None, list[Path]] = {}
    for path in sorted(root.rglob("*.parquet")):
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        stem = path.stem
        name = path.parent.name if stem.isdigit() else stem.split("-")[0]
        groups.setdefault(name, []).append(path)
    if not groups:
        raise UserError(f"--hf-dataset {root}: no parquet files and no save_to_disk dataset in this folder.")
    return groups


def _open_split(found: Any, name: str, datasets) -> Any:
    if isinstance(found, list):
        return datasets.load_dataset("parquet", data_files={name: [str(p) for p in found]}, split=name)
    return found


# -------------------------------------------------------------------------------------------- images
def _safe_rel(rel: str) -> str:
    parts = Path(rel).parts
    if Path(rel).is_absolute() or ".." in parts or not parts:
        raise UserError(f"image path {rel!r} built from the dataset's ids leaves the image folder.")
    return rel


def _image_bytes(value: Any, where: str) -> bytes | None:
    """Bytes of one image cell (a {"bytes", "path"} dict, raw bytes or a PIL image); None when empty."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        path = value.get("path")
        if path and os.path.isfile(path):
            with open(path, "rb") as handle:
                return handle.read()
        if path:
            raise UserError(f"{where}: the image refers to the file {path!r}, which does not exist here.")
        return None
    if hasattr(value, "save"):          # PIL image (a column decoded by the caller)
        import io
        buffer = io.BytesIO()
        value.save(buffer, format=getattr(value, "format", None) or "PNG")
        return buffer.getvalue()
    raise UserError(f"{where}: expected an image ({{'bytes', 'path'}} or PIL), got {type(value).__name__}.")


@dataclass
class Build:
    """The raw files rebuilt from the dataset, and where each image comes from."""
    raw_files: dict[str, Any] = field(default_factory=dict)            # name -> JSON written to the raw dir
    jobs: dict[str, list[tuple[str, str, int]]] = field(default_factory=dict)   # rel -> [(table, column, row)]
    external: set[str] = field(default_factory=set)                     # rel paths found under --image-root
    tables: dict[str, Table] = field(default_factory=dict)
    has_train: bool = True
    manifest: dict[str, Any] = field(default_factory=dict)             # extra manifest.json entries
    coco: dict[str, Any] | None = None                                  # COCO: what the evaluation split is

    def add_table(self, key: str, table: Table) -> None:
        self.tables[key] = table

    def image(self, rel: str, key: str, column: str | None, row: int, cell_empty: bool = False,
              image_folder: Path | None = None, fallbacks: Sequence[str] = ()) -> str:
        """Register the image of `row` of table `key` at `rel` (returns the rel path used).  Without an
        image column the image must already be in the image folder (rel, else the first fallback there)."""
        rel = _safe_rel(rel)
        if column is None:
            for candidate in (rel, *fallbacks):
                if (image_folder / candidate).is_file():
                    self.external.add(candidate)
                    return candidate
            return rel
        if not cell_empty:
            self.jobs.setdefault(rel, []).append((key, column, row))
        return rel


class Context:
    """What a per-benchmark builder needs: the options, the source and the image folder."""

    def __init__(self, opts: PrepareOptions, source: Source, image_folder: Path, image_root_given: bool):
        self.opts, self.source, self.image_folder = opts, source, image_folder
        self.image_root_given = image_root_given

    def image_column(self, table: Table, names: Sequence[str]) -> str | None:
        """The table's image column (first of `names` present), or None when images come from --image-root."""
        for name in names:
            if name in table.columns:
                return name
        if not self.image_root_given:
            raise UserError(f"--hf-dataset {table.label}: missing column(s) {' / '.join(map(repr, names))} "
                            f"(the images); the columns present are {', '.join(map(repr, table.columns))}. "
                            f"Either use a dataset with the images, or pass the folder holding them as "
                            f"--image-root.")
        return None

    def empty_cells(self, table: Table, column: str | None) -> set[int]:
        """Rows whose image cell is null (their images count as missing)."""
        if column is None:
            return set()
        data = table.ds.data.column(column)
        if data.null_count == 0:
            return set()
        return {i for i, is_null in enumerate(data.is_null().to_pylist()) if is_null}


def _as_int(value: Any, column: str, table: Table, row: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise UserError(f"--hf-dataset {table.label}: column {column!r} of row {row} is {value!r}; expected an "
                    f"integer (or a string of digits).")


def _present(row: dict, skip: Sequence[str] = ()) -> dict:
    """The row's non-null values, without the `skip` columns (a null cell is an absent field)."""
    return {k: v for k, v in row.items() if v is not None and k not in skip}


# ---------------------------------------------------------------------------------------- benchmarks
def _okvqa(ctx: Context, split: str, build: Build) -> None:
    table = ctx.source.load([split])
    table.require(["question_id", "question", "answers"], "the lmms-lab/OK-VQA schema: question_id, image, "
                  "question, answers (10 strings), question_type, answer_type")
    column = ctx.image_column(table, ["image"])
    build.add_table("eval", table)
    empty = ctx.empty_cells(table, column)
    questions, annotations = [], []
    for i, row in enumerate(table.rows(drop=[column] if column else [])):
        qid = _as_int(row["question_id"], "question_id", table, i)
        image_id = (_as_int(row["image_id"], "image_id", table, i) if row.get("image_id") is not None
                    else qid // 10)
        answers = row["answers"]
        if isinstance(answers, list):
            answers = [{"answer_id": k + 1, "answer": a} if not isinstance(a, dict) else a
                       for k, a in enumerate(answers)]
            if any("answer" not in a for a in answers):
                raise UserError(f"--hf-dataset {table.label}: row {i} (question_id {qid}): an entry of 'answers' "
                                f"has no 'answer' field ({answers[0]!r}); the scorer reads the processed "
                                f"'answer' strings of the official annotations, not 'raw_answer'.")
        questions.append({"image_id": image_id, "question": row["question"], "question_id": qid})
        annotations.append({"image_id": image_id, "question_id": qid,
                            **_present(row, ("question", "answers", "image_id", "question_id")),
                            "answers": answers})
        build.image(f"{split}/COCO_{split}_{image_id:012d}.jpg", "eval", column, i, i in empty, ctx.image_folder)
    common = {"info": {"description": f"OK-VQA {split}, rebuilt from a Hugging Face dataset"},
              "data_type": "mscoco", "data_subtype": split}
    build.raw_files[f"OpenEnded_mscoco_{split}_questions.json"] = {**common, "task_type": "Open-Ended",
                                                                   "questions": questions}
    build.raw_files[f"mscoco_{split}_annotations.json"] = {**common, "annotations": annotations}


def _textvqa(ctx: Context, split: str, build: Build) -> None:
    table = ctx.source.load(SPLIT_ALIASES[split], split=split)
    table.require(["question_id", "question", "image_id", "answers"], "the lmms-lab/textvqa schema (the "
                  "official TextVQA 0.5.1 entry): image_id, question_id, question, answers, ocr_tokens, image, ...")
    column = ctx.image_column(table, ["image"])
    build.add_table("eval", table)
    empty = ctx.empty_cells(table, column)
    folder = "test_images" if split == "test" else "train_images"
    entries = []
    for i, row in enumerate(table.rows(drop=[column] if column else [])):
        entry = _present(row)
        entry["question_id"] = _as_int(row["question_id"], "question_id", table, i)
        entries.append(entry)
        build.image(f"{folder}/{row['image_id']}.jpg", "eval", column, i, i in empty, ctx.image_folder)
    build.raw_files[f"TextVQA_0.5.1_{split}.json"] = {"dataset_type": split, "dataset_name": "textvqa",
                                                      "dataset_version": "0.5.1", "data": entries}


def _gqa(ctx: Context, split: str, build: Build) -> None:
    part = split.split("_")[0]
    table = ctx.source.load([part], config=f"{split}_instructions", split=split, config_optional=True)
    table.require(["id", "imageId", "question", "answer"], "the lmms-lab/GQA {S}_instructions schema: id "
                  "(the question id), imageId, question, answer, fullAnswer, isBalanced, ...")
    build.add_table("eval", table)
    if "image" in table.columns:                      # instructions already joined with their images
        images, column = table, "image"
    else:
        images = ctx.source.load([part], config=f"{split}_images", split=split, required=False)
        if images is None:
            if not ctx.image_root_given:
                raise UserError(f"--hf-dataset {ctx.source.name()}: the GQA questions have no 'image' column and "
                                f"there is no {split}_images configuration (sub-folder) with the images; pass "
                                f"the folder holding images/{{imageId}}.jpg as --image-root instead.")
            column = None
        else:
            images.require(["id"], "the lmms-lab/GQA {S}_images schema: id, image")
            column = ctx.image_column(images, ["image"])
            build.add_table("images", images)
    empty = ctx.empty_cells(images, column) if column else set()
    if images is table or column is None:
        row_of = None
    else:
        row_of = {str(image_id): i for i, image_id in enumerate(images.ds["id"])}
    data = {}
    for i, row in enumerate(table.rows(drop=["image"])):
        qid = str(row["id"])
        if qid in data:
            raise UserError(f"--hf-dataset {table.label}: question id {qid!r} appears twice (column 'id').")
        data[qid] = _present(row, ("id",))
        rel = f"images/{row['imageId']}.jpg"
        if column is None:
            build.image(rel, "eval", None, i, image_folder=ctx.image_folder)
        elif row_of is None:
            build.image(rel, "eval", column, i, i in empty)
        elif str(row["imageId"]) in row_of:
            k = row_of[str(row["imageId"])]
            build.image(rel, "images", column, k, k in empty)
    build.raw_files[f"{split}_questions.json"] = data


def _iconqa_answers(rows: list[tuple[Table, int, dict, list[str]]]) -> list[int]:
    """Index of the right choice of each choose_txt row: `answer` read as an index or as the choice text."""
    as_index, as_text = [], []
    for _, _, row, choices in rows:
        answer = row["answer"]
        if isinstance(answer, int) and not isinstance(answer, bool):
            as_index.append(answer if 0 <= answer < len(choices) else None)
            as_text.append(answer if 0 <= answer < len(choices) else None)
            continue
        text = str(answer).strip()
        as_index.append(int(text) if text.isdigit() and int(text) < len(choices) else None)
        as_text.append(choices.index(text) if text in choices else None)
    index_fits, text_fits = None not in as_index, None not in as_text
    if index_fits and text_fits:
        if as_index != as_text:
            warn("IconQA: every 'answer' is both a valid choice index and one of the choices; reading it as "
                 "the index (the official problems.json convention).")
        return as_index
    if index_fits:
        return as_index
    if text_fits:
        return as_text
    def describe(k: int) -> str:
        table, i, row, choices = rows[k]
        return f"{table.label} row {i} (question_id {row['question_id']!r}): answer {row['answer']!r}, choices {choices}"
    raise UserError(f"--hf-dataset: the IconQA 'answer' column is neither an index into the choices for every "
                    f"choose_txt row ({describe(as_index.index(None))}) nor the text of one of them for every "
                    f"row ({describe(as_text.index(None))}).")


# A column giving each row's number of choices, when the dataset has one (lmms-lab/ICON-QA does not).
ICONQA_COUNT_COLUMNS = ("num_choices", "choice_count", "n_choices", "num_options")
# a number written with thousands separators: "1,000", "$12,500", "-3,000,000.5"
_THOUSANDS = re.compile(r"[^\d,\s]{0,3}\d{1,3}(,\d{3})+(\.\d+)?")
_MAX_PIECES = 16


def _readings(pieces: list[str]) -> list[list[str]]:
    """Every way to join runs of consecutive pieces back into numbers with thousands separators (a run of
    one piece is always allowed), the plain split last; in order of preference among equally long ones:
    the earliest, longest joins first."""
    out: list[list[str]] = []

    def walk(start: int, done: list[str]) -> None:
        if start == len(pieces):
            out.append(done)
            return
        for end in range(len(pieces), start, -1):
            run = ",".join(pieces[start:end])
            if end - start == 1 or _THOUSANDS.fullmatch(run):
                walk(end, done + [run])

    walk(0, [])
    return out


def split_iconqa_choices(text: str, count: int | None = None, answer: Any = None) -> tuple[list[str], str | None]:
    """The choices of a comma-joined ICON-QA `choices` string, and how a comma inside a choice was found
    (None when the plain split is taken as it is).  lmms-lab/ICON-QA joins the choices with "," (lmms-eval
    splits them back with split(",")), so a choice holding a comma ("1,000") silently becomes two.  Used
    where the data allow it:
      * the answer text: an `answer` holding a comma that equals consecutive pieces joins them ("answer");
      * `count` (a choice-count column): the reading with `count` choices (the plain split when it has
        them), where pieces may be joined back only into numbers with thousands separators ("count"); no
        such reading is a ValueError;
      * otherwise, pieces that join back into such numbers ("1", "000") are joined ("thousands"; a guess
        the caller warns about): the reading with the fewest choices that still has two (IconQA's
        minimum) and keeps the answer (an index in range, or one of the choices), earliest joins first.
    A comma inside a non-numeric choice that is not the answer cannot be seen."""
    pieces = [c.strip() for c in text.split(",")]
    how = None
    answer_text = "" if answer is None or isinstance(answer, (bool, float)) else str(answer).strip()
    if "," in answer_text and answer_text not in pieces:
        parts = [c.strip() for c in answer_text.split(",")]
        for start in range(len(pieces) - len(parts) + 1):
            if pieces[start:start + len(parts)] == parts:
                pieces = pieces[:start] + [answer_text] + pieces[start + len(parts):]
                how = "answer"
                break
    if count is not None and len(pieces) == count:
        return pieces, how
    if len(pieces) > _MAX_PIECES:
        if count is not None:
            raise ValueError(f"choices {text!r} split at its commas gives {len(pieces)} choices, but the row says "
                             f"{count}")
        return pieces, how
    readings = _readings(pieces)

    def keeps_answer(choices: list[str]) -> bool:
        if not answer_text:
            return True
        return answer_text in choices or (answer_text.isdigit() and int(answer_text) < len(choices))

    if count is not None:
        fits = [r for r in readings if len(r) == count]
        if not fits:
            raise ValueError(f"choices {text!r} split at its commas gives {len(pieces)} choices, but the row says "
                             f"{count}")
        return fits[0], "count"
    fits = [r for r in readings if len(r) >= 2 and keeps_answer(r)]
    if not fits:
        return pieces, how
    best = min(fits, key=len)           # min keeps the first of the shortest: the preferred order
    return (best, "thousands") if best != pieces else (pieces, how)


def _iconqa(ctx: Context, split: str, build: Build) -> None:
    schema = ("the lmms-lab/ICON-QA schema: question_id, question, choices (comma-separated), answer, "
              "query_image, ques_type, ...")
    splits = [split]
    if ctx.opts.num_train != 0:
        splits.insert(0, "train")
    tables = []
    for name in splits:
        table = ctx.source.load(SPLIT_ALIASES[name], split=name, required=name == split)
        if table is None:
            build.has_train = False
            continue
        table.require(["question_id", "question", "choices", "answer", "ques_type"], schema)
        tables.append(table)
    pid_splits: dict[str, list[str]] = {f"choose_txt_{t.split}": [] for t in tables}
    chosen: list[tuple[Table, int, dict, list[str]]] = []
    columns, empty = {}, {}
    commas: dict[str, list[str]] = {}          # how a comma inside a choice was found -> the rows
    for table in tables:
        column = ctx.image_column(table, ["query_image", "image"])
        columns[table.split], empty[table.split] = column, ctx.empty_cells(table, column)
        build.add_table(table.split, table)
        count_column = next((c for c in ICONQA_COUNT_COLUMNS if c in table.columns), None)
        drop = [c for c in table.columns if c.startswith("choice_image_")] + ([column] if column else [])
        for i, row in enumerate(table.rows(drop=drop)):
            if row["ques_type"] != "choose_txt":
                continue
            choices = row["choices"]
            if isinstance(choices, str):
                count = row.get(count_column) if count_column else None
                count = None if count is None else _as_int(count, count_column, table, i)
                try:
                    choices, how = split_iconqa_choices(choices, count, row["answer"])
                except ValueError as err:
                    raise UserError(f"--hf-dataset {table.label}: row {i} (question_id {row['question_id']!r}): "
                                    f"{err} (column {count_column!r}); a comma inside a choice that is not a "
                                    f"thousands separator cannot be told apart from the separator.") from None
                if how:
                    commas.setdefault(how, []).append(
                        f"question_id {row['question_id']!r}: {row['choices']!r} -> {choices}")
            elif not isinstance(choices, list):
                raise UserError(f"--hf-dataset {table.label}: column 'choices' of row {i} is {choices!r}; expected "
                                f"a comma-separated string or a list of strings.")
            chosen.append((table, i, row, choices))
    reasons = {"count": f"the {{}} column gives the number of choices",
               "answer": "the answer text holds the comma",
               "thousands": "read as a thousands separator; a GUESS (a list-valued 'choices' column or a "
                            "choice-count column such as num_choices would settle it): check these rows"}
    for how, rows in commas.items():
        reason = reasons[how].format(repr(count_column))
        warn(f"IconQA: {len(rows)} choose_txt row(s) have a comma inside a choice of the comma-joined 'choices' "
             f"string ({reason}): {'; '.join(rows[:5])}{'; ...' if len(rows) > 5 else ''}.")
    answers = _iconqa_answers(chosen) if chosen else []
    problems = {}
    for (table, i, row, choices), answer in zip(chosen, answers):
        pid = str(row["question_id"])
        if pid in problems:
            raise UserError(f"--hf-dataset {table.label}: question_id {pid!r} appears twice.")
        problems[pid] = {**_present(row, ("question_id", "choices", "answer")), "choices": choices,
                         "answer": answer, "split": table.split}
        pid_splits[f"choose_txt_{table.split}"].append(pid)
        build.image(f"iconqa/{table.split}/choose_txt/{pid}/image.png", table.split, columns[table.split], i,
                    i in empty[table.split], ctx.image_folder)
    build.raw_files["problems.json"] = problems
    build.raw_files["pid_splits.json"] = pid_splits


def _coco_entry(table: Table, i: int, row: dict, split: str) -> dict:
    if "sentences" in row:                              # Karpathy layout (yerevann/coco-karpathy)
        filename = str(row["filename"])
        sentences = row["sentences"]
        if isinstance(sentences, dict) and isinstance(sentences.get("raw"), list):
            sentences = sentences["raw"]
        if not isinstance(sentences, list):
            raise UserError(f"--hf-dataset {table.label}: column 'sentences' of row {i} is {sentences!r}; "
                            f"expected a list of captions.")
        sentences = [s if isinstance(s, dict) else {"raw": s} for s in sentences]
    else:                                               # lmms-lab/COCO-Caption layout
        filename = str(row.get("file_name") or row["question_id"])
        answer = row["answer"]
        answer = answer if isinstance(answer, list) else [] if answer is None else [answer]
        # a null or blank caption is no reference: a row without any is caught below / by the converter
        sentences = [{"raw": a} for a in answer if a is not None and str(a).strip()]
    match = COCO_FILE_NAME.search(filename)
    filepath = row.get("filepath") or (match.group(1) if match else None)
    if filepath is None:
        filepath = table.split if "sentences" not in row else None
    if filepath is None:
        raise UserError(f"--hf-dataset {table.label}: row {i} has no 'filepath' column and its file name "
                        f"{filename!r} is not COCO_{{folder}}_{{id}}.jpg, so its image folder is unknown.")
    if row.get("cocoid") is not None:
        cocoid = _as_int(row["cocoid"], "cocoid", table, i)
    else:
        digits = re.findall(r"\d+", Path(filename).stem)
        if digits:
            cocoid = int(digits[-1])
        elif row.get("id") is not None:
            cocoid = _as_int(row["id"], "id", table, i)
        else:
            raise UserError(f"--hf-dataset {table.label}: row {i} has no 'cocoid' column and no image id in "
                            f"its file name {filename!r}.")
    return {"filepath": str(filepath), "filename": filename, "cocoid": cocoid, "split": split,
            "sentences": sentences}


def _coco(ctx: Context, split: str, build: Build) -> None:
    schema = ("the yerevann/coco-karpathy schema (filepath, filename, cocoid, sentences, ...; images from "
              "--image-root) or the lmms-lab/COCO-Caption one (question_id = the image file name, answer = "
              "the captions, image)")
    tables = [ctx.source.load(SPLIT_ALIASES[split], split=split)]
    if ctx.opts.num_train != 0:
        for name in ("train", "restval"):
            table = ctx.source.load(SPLIT_ALIASES[name], split=name, required=False)
            if table is not None:
                tables.append(table)
        build.has_train = len(tables) > 1
    images = []
    for table in tables:
        if "sentences" in table.columns:
            table.require(["filename", "sentences"], schema)
        else:
            table.require(["question_id", "answer"], schema)
        column = ctx.image_column(table, ["image"])
        build.add_table(table.split, table)
        empty = ctx.empty_cells(table, column)
        entries = []
        for i, row in enumerate(table.rows(drop=[column] if column else [])):
            entry = _coco_entry(table, i, row, table.split)
            rel = build.image(f"{entry['filepath']}/{entry['filename']}", table.split, column, i, i in empty,
                              ctx.image_folder)
            entry["filepath"], entry["filename"] = rel.rsplit("/", 1)
            entries.append(entry)
        if table.split == split:
            build.coco = coco_split_of(table, entries)
            if entries and not any(e["sentences"] for e in entries):
                note = (" (COCO test2014: its reference captions were never published)"
                        if build.coco["coco_split"] == "test2014" else "")
                raise UserError(f"--hf-dataset {table.label}: none of its {len(entries)} images has reference "
                                f"captions{note}, and CIDEr needs them. Use a split with references: the "
                                f"Karpathy test split (yerevann/coco-karpathy, --split test) for the paper's "
                                f"numbers, or lmms-lab-encoder/COCO-Caption --split val (all of val2014).")
        images.extend(entries)
    build.raw_files["dataset_coco.json"] = {"images": images, "dataset": "coco"}
    build.manifest.update({k: build.coco[k] for k in ("karpathy", "coco_split")})


def coco_split_of(table: Table, entries: list[dict]) -> dict[str, Any]:
    """What the COCO evaluation table really is: {"karpathy", "coco_split", "hub_split", "description"}.
    The Karpathy layout (a `sentences` column: yerevann/coco-karpathy) is the Karpathy split it was loaded
    as.  The lmms-lab/COCO-Caption layout never is: lmms-lab/COCO-Caption `val` is all 40,504 val2014
    images, its `test` is test2014 (no references), COCO-Caption2017 `val` is val2017; the image set is read
    from the file names (COCO_{set}_{id}.jpg; 2017 images are named {id:012d}.jpg)."""
    hub_split = table.label.rsplit("[", 1)[-1].rstrip("]") if table.label.endswith("]") else table.split
    if "sentences" in table.columns:
        name = f"karpathy_{table.split}"
        return {"karpathy": True, "coco_split": name, "hub_split": hub_split,
                "description": f"COCO captions, Karpathy {table.split} split, from {table.label}"}
    folders = sorted({m.group(1) for m in (COCO_FILE_NAME.search(e["filename"]) for e in entries) if m})
    unprefixed = [e["filename"] for e in entries if not COCO_FILE_NAME.search(e["filename"])]
    if unprefixed and all(re.fullmatch(r"\d{12}\.\w+", f) for f in unprefixed):
        folders.append(f"{table.split}2017")
    elif unprefixed:
        folders.append(f"'{hub_split}' split")
    name = "+".join(folders) or f"'{hub_split}' split"
    return {"karpathy": False, "coco_split": name, "hub_split": hub_split,
            "description": f"COCO captions, {name} images from {table.label} ({len(entries)} images); NOT the "
                           f"Karpathy split"}


def _ocrvqa(ctx: Context, split: str, build: Build) -> None:
    from llava_sculpt.data.prepare.ocrvqa import image_path

    table = ctx.source.load(SPLIT_ALIASES[split], split=split)
    table.require(["image_id", "questions", "answers"], "the howard-hou/OCR-VQA schema: image, image_id (the "
                  "book key), questions, answers, title, authorName, genre, image_url, ...")
    column = ctx.image_column(table, ["image"])
    build.add_table("eval", table)
    empty = ctx.empty_cells(table, column)
    data = {}
    for i, row in enumerate(table.rows(drop=[column] if column else [])):
        key = str(row["image_id"])
        if key in data:
            raise UserError(f"--hf-dataset {table.label}: image_id {key!r} appears twice.")
        url = row.get("image_url") or row.get("imageURL") or ""
        entry = {"imageURL": url, "questions": row["questions"], "answers": row["answers"]}
        entry.update({k: row[k] for k in ("title", "authorName", "genre") if row.get(k) is not None})
        entry["split"] = OCRVQA_SPLIT_CODES[split]
        data[key] = entry
        rel = image_path(key, url)
        build.image(rel, "eval", column, i, i in empty, ctx.image_folder,
                    fallbacks=[os.path.splitext(rel)[0] + ".jpg"])
    build.raw_files["dataset.json"] = data


BUILDERS = {"okvqa": _okvqa, "textvqa": _textvqa, "gqa": _gqa, "iconqa": _iconqa, "coco": _coco,
            "ocrvqa": _ocrvqa}


# ------------------------------------------------------------------------------------------ the run
@dataclass
class HFResult:
    prepared: Prepared
    num_train: int | None
    source: dict
    images_written: int


def _write_images(build: Build, needed: list[str], folder: Path) -> int:
    """Write the images of `needed` rel paths from the dataset (bytes unchanged); every row mapped to the
    same file must hold the same image."""
    datasets = _datasets()
    wanted: dict[tuple[str, str], set[int]] = {}
    for rel in needed:
        for key, column, row in build.jobs.get(rel, []):
            wanted.setdefault((key, column), set()).add(row)
    payloads: dict[tuple[str, int], bytes | None] = {}
    for (key, column), rows in wanted.items():
        table = build.tables[key]
        order = sorted(rows)
        cells = table.ds.select_columns([column])
        feature = cells.features[column]
        if isinstance(feature, datasets.Image):
            cells = cells.cast_column(column, datasets.Image(decode=False))
        for row, cell in zip(order, cells.select(order)[column]):
            payloads[(key, row)] = _image_bytes(cell, f"--hf-dataset {table.label}, row {row}, column {column!r}")
    written = 0
    for rel in needed:
        jobs = build.jobs.get(rel)
        if not jobs:
            continue
        data = [payloads[(key, row)] for key, _, row in jobs]
        data = [d for d in data if d is not None]
        if not data:
            key, column, row = jobs[0]
            raise UserError(f"--hf-dataset {build.tables[key].label}, row {row}: the image cell (column "
                            f"{column!r}) holds neither bytes nor a file; pass --skip-missing-images to drop "
                            f"such rows only when the cell is null.")
        if len({hashlib.sha256(d).digest() for d in data}) > 1:
            rows = ", ".join(f"{build.tables[k].label} row {r}" for k, _, r in jobs[:4])
            raise UserError(f"--hf-dataset: {rows} all map to the image file {rel} but hold different images "
                            f"(the file name comes from the dataset's ids; check image_id / imageId).")
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(target, "wb") as handle:
            handle.write(data[0])
        written += 1
    return written


def prepare_hf(opts: PrepareOptions, spec: str, converter, image_root_given: bool) -> HFResult:
    """Run `converter` (the benchmark's raw prepare(opts)) on raw files rebuilt from the dataset `spec`;
    `opts.image_root` is the folder the images are written to (or read from, without an image column)."""
    split = canonical_split(opts.dataset, opts.split)
    source = Source(spec)
    image_folder = opts.image_root
    build = Build()
    BUILDERS[opts.dataset](Context(opts, source, image_folder, image_root_given), split, build)
    num_train = opts.num_train
    if opts.dataset in ("iconqa", "coco") and num_train != 0 and not build.has_train:
        warn(f"{source.name()} has no train split, so no train.json is written (training samples need a "
             f"dataset with one; --num-train 0 silences this).")
        num_train = 0

    with tempfile.TemporaryDirectory(prefix="llava-sculpt-hf-") as tmp:
        raw_dir, placeholder_dir = Path(tmp) / "raw", Path(tmp) / "images"
        for name, obj in build.raw_files.items():
            write_json(raw_dir / name, obj)
        for rel in list(build.jobs) + sorted(build.external):
            path = placeholder_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        run_opts = PrepareOptions(dataset=opts.dataset, raw_dir=raw_dir, out_dir=opts.out_dir,
                                  image_root=placeholder_dir, split=split, num_train=num_train,
                                  num_test=opts.num_test, seed=opts.seed,
                                  skip_missing_images=opts.skip_missing_images)
        label = f"--hf-dataset {source.name()} (rebuilt as the raw file"
        try:
            prepared = converter(run_opts)
        except UserError as err:
            text = str(err).replace(str(placeholder_dir), str(image_folder))
            text = re.sub(re.escape(str(raw_dir)) + r"/([^\s:,;]+)",
                          lambda m: f"{label} {m.group(1)}, one entry per row)", text)
            raise UserError(text.replace(
                "Pass the folder holding the images as --image-root, or ",
                "(A row whose image cell is null has no image; without an image column the images are read "
                "from --image-root.) Pass ")) from None
    needed = list(dict.fromkeys([q["image"] for q in prepared.questions] +
                                [s["image"] for s in prepared.train or []]))
    written = _write_images(build, needed, image_folder)
    prepared.image_folder = image_folder
    prepared.raw_files = []
    prepared.manifest.update(build.manifest)
    if build.coco is not None:
        _label_coco(prepared, build.coco, source)
    tables = {key: table.label for key, table in build.tables.items()}
    return HFResult(prepared, num_train, {"hf_dataset": source.name(), "tables": tables}, written)


def _label_coco(prepared: Prepared, coco: dict, source: Source) -> None:
    """Say in annotations.json what the COCO evaluation images are, and warn when they are not Karpathy's."""
    info = prepared.json_files["annotations.json"].setdefault("info", {})
    info.update(description=coco["description"], coco_split=coco["coco_split"], karpathy=coco["karpathy"])
    if not coco["karpathy"]:
        warn(f"COCO: {source.name()} [{coco['hub_split']}] is the COCO {coco['coco_split']} image set "
             f"({len(prepared.questions)} images written as questions), NOT the Karpathy test split (5,000 val2014 "
             f"images) the paper's CIDEr is computed on; manifest.json records coco_split "
             f"{coco['coco_split']!r} with karpathy false, and scripts/reproduce_table1.sh refuses it unless "
             f"ALLOW_NON_KARPATHY=1. For the paper's split use yerevann/coco-karpathy (--split test).")
