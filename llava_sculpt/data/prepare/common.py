"""Helpers shared by the benchmark converters: reading raw JSON with precise errors, deterministic
sampling, image existence checks and atomic JSON / JSON-lines writing."""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from llava_sculpt.atomic import atomic_open, write_json_atomic
from llava_sculpt.errors import UserError, json_error_text

# LLaVA-1.5's short-answer prompt suffix (REFERENCE.md section 3).
SHORT_ANSWER_SUFFIX = "\nAnswer the question using a single word or phrase."
# LLaVA-1.5's multiple-choice instruction (options lettered "A. ...", one per line).
MULTIPLE_CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass
class PrepareOptions:
    """What `llava-sculpt prepare` was asked to do (see cli.py for the meaning of each flag)."""
    dataset: str
    raw_dir: Path
    out_dir: Path
    image_root: Path
    split: str | None
    num_train: int | None          # None = all available training samples; 0 = no train.json
    num_test: int | None           # None = all questions of the evaluation split
    seed: int
    skip_missing_images: bool = False


@dataclass
class Prepared:
    """What a converter produced; cli.py writes it to --out-dir."""
    split: str
    image_folder: Path                                            # images are relative to this folder
    questions: list[dict]                                         # -> questions.jsonl
    train: list[dict] | None = None                               # -> train.json (target tasks only)
    json_files: dict[str, Any] = field(default_factory=dict)      # name -> object written as JSON
    jsonl_files: dict[str, list[dict]] = field(default_factory=dict)
    raw_files: list[Path] = field(default_factory=list)           # inputs actually read
    manifest: dict[str, Any] = field(default_factory=dict)        # extra manifest.json entries (coco: the split)


def warn(message: str) -> None:
    print(f"llava-sculpt prepare: warning: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- reading
def load_json(path: Path, what: str) -> Any:
    """Parse one raw JSON file; a missing or unparsable file is a UserError naming it."""
    if not path.is_file():
        raise UserError(f"{what}: expected the file {path}, which does not exist. Pass the folder that "
                        f"holds the dataset's official files as --raw-dir.")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({json_error_text(err)}); "
                        f"expected the official {what} file.") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err}); expected the official {what} file.") from None


def load_jsonl(path: Path, required: Iterable[str]) -> list[dict]:
    """Parse a JSON-lines file of objects that must each carry the `required` keys."""
    rows = []
    required = list(required)
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}, line {number}: not valid JSON ({json_error_text(err, line=False)}); expected one JSON "
                                f"object per line.") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}.")
            for key in required:
                if key not in row:
                    raise UserError(f"{path}, line {number}: field {key!r} is missing; every line needs "
                                    f"{', '.join(required)}.")
            rows.append(row)
    return rows


def expect_type(value: Any, types: type | tuple[type, ...], path: Path, where: str) -> Any:
    """Return `value` if it has one of `types` (bool is never accepted as int), else a UserError."""
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise UserError(f"{path}: {where} should be {names}, got {type(value).__name__} ({_short(value)}).")
    return value


def get_field(entry: Any, name: str, types: type | tuple[type, ...], path: Path, where: str) -> Any:
    """`entry[name]`, checked: missing field or wrong type is a UserError naming file, entry and field."""
    if not isinstance(entry, dict):
        raise UserError(f"{path}: {where} should be a JSON object, got {type(entry).__name__}.")
    if name not in entry:
        raise UserError(f"{path}: {where} has no field {name!r}.")
    return expect_type(entry[name], types, path, f"field {name!r} of {where}")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------- sampling
def sample_indices(total: int, count: int | None, seed: int, stream: str) -> list[int]:
    """`count` distinct indices out of range(total), in increasing order, drawn by a random generator
    seeded with the string "{stream}:{seed}" (string seeds are hashed with SHA-512 by Python's `random`,
    so the draw is the same on every platform and run).  All indices when count is None or >= total."""
    if count is None or count >= total:
        return list(range(total))
    return sorted(random.Random(f"{stream}:{seed}").sample(range(total), count))


def _default_locate(folder: Path) -> Callable[[str], str | None]:
    return lambda rel: rel if (folder / rel).is_file() else None


def select(items: list[dict], count: int | None, opts: PrepareOptions, stream: str, image_folder: Path,
           locate: Callable[[str], str | None] | None = None, what: str = "samples") -> list[dict]:
    """Sample `count` items (each a dict with a relative "image") deterministically and make sure every
    chosen image exists under `image_folder`.

    `locate(rel)` returns the relative path of the existing file for `rel` (it may differ, e.g. another
    extension) or None.  Without --skip-missing-images the sample is drawn first and any missing image is
    a UserError; with it, items whose image is missing are dropped (with a warning) before sampling, so
    `count` is still honoured when enough images exist."""
    locate = locate or _default_locate(image_folder)
    stream = f"{opts.dataset}:{stream}"
    if opts.skip_missing_images:
        kept, missing = [], []
        for item in items:
            found = locate(item["image"])
            if found is None:
                missing.append(item["image"])
            else:
                kept.append({**item, "image": found})
        if missing:
            distinct = list(dict.fromkeys(missing))
            warn(f"skipping {len(missing)} {what} whose image is missing under {image_folder} "
                 f"({len(distinct)} image(s), first: {', '.join(distinct[:3])}).")
        return [kept[i] for i in sample_indices(len(kept), count, opts.seed, stream)]
    chosen = [items[i] for i in sample_indices(len(items), count, opts.seed, stream)]
    result, missing = [], []
    for item in chosen:
        found = locate(item["image"])
        if found is None:
            missing.append(item["image"])
        result.append({**item, "image": found or item["image"]})
    if missing:
        distinct = list(dict.fromkeys(missing))
        raise UserError(f"{len(missing)} of the {len(chosen)} selected {what} reference an image that does "
                        f"not exist under the image folder {image_folder}: {len(distinct)} missing image(s), "
                        f"first: {', '.join(distinct[:5])}. Pass the folder holding the images as "
                        f"--image-root, or --skip-missing-images to drop them.")
    return result


def resolve_image_folder(candidates: list[Path], images: list[str]) -> Path:
    """The candidate folder holding the most of `images` (a few relative paths; the first candidate on
    a tie, so that a later existence check reports missing images against it)."""
    counts = [sum((folder / rel).is_file() for rel in images) for folder in candidates]
    return candidates[counts.index(max(counts))]


# ----------------------------------------------------------------------------------------------- writing
def write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    """Write `obj` as JSON to `path` atomically (temp file in the same folder, then os.replace)."""
    write_json_atomic(path, obj, indent=indent, ensure_ascii=False)


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Write one JSON object per line to `path` atomically."""
    with atomic_open(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def llava_sample(sample_id: str, image: str, prompt: str, answer: str) -> dict:
    """One LLaVA-1.5 training record (REFERENCE.md section 3): the image token opens the human turn."""
    return {"id": sample_id, "image": image,
            "conversations": [{"from": "human", "value": "<image>\n" + prompt},
                              {"from": "gpt", "value": answer}]}


def ready_made_questions(opts: PrepareOptions, path: Path, folders: list[Path], official_ids: set[str],
                         official_path: Path, what: str) -> tuple[list[dict], Path]:
    """Validate and sample one of LLaVA's ready-made question files (`{question_id, image, text, ...}`
    per line); every question_id must exist in the official annotation file.  Returns the chosen lines
    (unchanged) and the image folder their `image` paths are relative to (the one of `folders` holding
    most of the first 20 images)."""
    rows = load_jsonl(path, ["question_id", "image", "text"])
    if not rows:
        raise UserError(f"{path} holds no questions; expected LLaVA's ready-made question file.")
    for number, row in enumerate(rows, start=1):
        expect_type(row["image"], str, path, f"field 'image' of line {number}")
        expect_type(row["text"], str, path, f"field 'text' of line {number}")
        if str(row["question_id"]) not in official_ids:
            raise UserError(f"{path}, line {number}: question_id {row['question_id']!r} is not in "
                            f"{official_path}; the scorer needs its ground truth.")
    folder = resolve_image_folder(folders, [row["image"] for row in rows[:20]])
    return select(rows, opts.num_test, opts, "test", folder, what=what), folder
