"""Benchmark specs: one small JSON file per benchmark (eval/*.json) says where its data is and how it is scored.

    {
      "name": "okvqa",                                   answers/{name}.jsonl, scores/{name}.json
      "task": "okvqa",                                   scorer of `llava-sculpt score` (metric), one of
                                                         okvqa, textvqa, gqa, iconqa, ocrvqa, coco, knowledge
      "role": "source",                                  "source" (forgetting), "target" (fine-tuned task) or
                                                         "knowledge" (forgetting of the language model's own
                                                         knowledge: scored and shown, outside the Source mean)
      "question_file": "${DATA_ROOT}/okvqa/questions.jsonl",
      "annotation_file": "${DATA_ROOT}/okvqa/annotations.json",
      "score_question_file": "${DATA_ROOT}/okvqa/questions_official.json",   optional (okvqa)
      "image_folder": null,                              optional; null = the "image_folder" recorded in
                                                         manifest.json next to question_file
      "conv_mode": "vicuna_v1",                          optional (default vicuna_v1)
      "max_new_tokens": 128,                             optional (default 128)
      "score_options": {"cider_only": true},             optional: compat, cider_only for `score`
      "prompt_note": "...", "description": "..."         free text (the prompt suffix the questions carry)
    }

Paths: "${DATA_ROOT}" is the --data-root given to the driver; any other "${NAME}" is read from the
environment.  A relative path (after substitution) is relative to the data root.  The layout the shipped
specs expect is the output of `llava-sculpt prepare DATASET --raw-dir ... --out-dir $DATA_ROOT/DATASET`.
Keys starting with "_" are ignored (comments); any other unknown key is an error (catches typos).

    python -m llava_sculpt.eval.specs SPEC [FIELD] [--data-root DIR]
prints the resolved spec as JSON (or one field's value) after validating it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Sequence

from llava_sculpt.errors import UserError, json_error_text, run_cli

ROLES = ("source", "target", "knowledge")
REQUIRED = ("name", "task", "role", "question_file", "annotation_file")
OPTIONAL = ("score_question_file", "image_folder", "conv_mode", "max_new_tokens", "score_options",
            "prompt_note", "description")
SCORE_OPTIONS = {"compat": ("official", "paper"), "cider_only": (True, False)}
PATH_FIELDS = ("question_file", "annotation_file", "score_question_file", "image_folder")
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# the repository's eval/ folder (specs are data, not package code); override with LLAVA_SCULPT_SPEC_DIR
DEFAULT_SPEC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "eval")


@dataclass
class BenchmarkSpec:
    path: str                      # the spec file
    name: str
    task: str
    role: str
    question_file: str             # resolved paths below
    annotation_file: str
    image_folder: str | None
    score_question_file: str | None = None
    conv_mode: str = "vicuna_v1"
    max_new_tokens: int = 128
    score_options: dict = field(default_factory=dict)
    prompt_note: str = ""
    description: str = ""


def spec_dir() -> str:
    return os.environ.get("LLAVA_SCULPT_SPEC_DIR") or DEFAULT_SPEC_DIR


def find_spec(name_or_path: str) -> str:
    """A spec file path, or a bare benchmark name looked up as SPEC_DIR/{name}.json."""
    if os.path.isfile(name_or_path):
        return name_or_path
    candidate = os.path.join(spec_dir(), f"{name_or_path}.json")
    if os.sep not in name_or_path and not name_or_path.endswith(".json") and os.path.isfile(candidate):
        return candidate
    available = sorted(f[:-5] for f in os.listdir(spec_dir()) if f.endswith(".json")) if os.path.isdir(spec_dir()) else []
    raise UserError(f"benchmark spec {name_or_path!r}: no such file, and no {candidate}; known benchmarks in "
                    f"{spec_dir()}: {', '.join(available) or 'none'} (set LLAVA_SCULPT_SPEC_DIR for another folder).")


def substitute(value: str, data_root: str | None, where: str) -> str:
    """Replace ${DATA_ROOT} by `data_root` and ${NAME} by the environment variable NAME."""
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name == "DATA_ROOT":
            if data_root is None:
                raise UserError(f"{where} uses ${{DATA_ROOT}} but no data root was given (--data-root / DATA_ROOT).")
            return data_root
        if name not in os.environ:
            raise UserError(f"{where} uses ${{{name}}}, which is not set in the environment.")
        return os.environ[name]

    return _VARIABLE.sub(replace, value)


def _resolve_path(value: str, data_root: str | None, where: str) -> str:
    path = os.path.expanduser(substitute(value, data_root, where))
    if not os.path.isabs(path):
        if data_root is None:
            raise UserError(f"{where} is a relative path ({value!r}); give --data-root (paths are relative to it).")
        path = os.path.join(data_root, path)
    return os.path.normpath(path)


def manifest_image_folder(question_file: str, where: str) -> str:
    """image_folder recorded by `llava-sculpt prepare` in manifest.json next to the question file."""
    manifest = os.path.join(os.path.dirname(question_file), "manifest.json")
    try:
        with open(manifest, encoding="utf-8") as f:
            folder = json.load(f).get("image_folder")
    except FileNotFoundError:
        raise UserError(f"{where}: image_folder is null, so it is read from {manifest}, which does not exist; "
                        "run `llava-sculpt prepare ... --out-dir` for this folder or set image_folder in the spec.") from None
    except (json.JSONDecodeError, AttributeError) as err:
        raise UserError(f"{manifest}: not a `llava-sculpt prepare` manifest ({err}).") from None
    if not isinstance(folder, str):
        raise UserError(f"{manifest}: no 'image_folder' string; set image_folder in the spec {where}.")
    return folder


def load_spec(path: str, data_root: str | None = None, check_files: bool = True) -> BenchmarkSpec:
    """Read and validate a spec; resolve its paths against `data_root`.  `check_files` also requires the
    question and annotation files (and the image folder) to exist."""
    from llava_sculpt.data.conversation import TEMPLATES
    from llava_sculpt.eval.score import TASKS

    if data_root is not None:  # absolute, so "${DATA_ROOT}/x" is not joined to a relative root a second time
        data_root = os.path.abspath(os.path.expanduser(data_root))
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise UserError(f"benchmark spec {path} does not exist.") from None
    except json.JSONDecodeError as err:
        raise UserError(f"benchmark spec {path} is not valid JSON ({json_error_text(err)}).") from None
    if not isinstance(raw, dict):
        raise UserError(f"benchmark spec {path}: expected a JSON object, got {type(raw).__name__}.")
    unknown = sorted(k for k in raw if k not in REQUIRED + OPTIONAL and not k.startswith("_"))
    if unknown:
        raise UserError(f"benchmark spec {path}: unknown field(s) {unknown}; allowed: {', '.join(REQUIRED + OPTIONAL)} "
                        "(prefix a key with '_' for a comment).")
    for key in REQUIRED:
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise UserError(f"benchmark spec {path}: field {key!r} is required and must be a non-empty string.")
    def where(key: str) -> str:
        return f"benchmark spec {path}, field {key!r}"
    if raw["task"] not in TASKS:
        raise UserError(f"{where('task')}: {raw['task']!r} is not a scorer of `llava-sculpt score`; "
                        f"expected one of {', '.join(TASKS)}.")
    if raw["role"] not in ROLES:
        raise UserError(f"{where('role')}: expected one of {', '.join(map(repr, ROLES))}, got {raw['role']!r}.")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", raw["name"]):
        raise UserError(f"{where('name')}: {raw['name']!r} is used as a file name; letters, digits, '_', '.', '-' only.")
    conv_mode = raw.get("conv_mode", "vicuna_v1")
    if conv_mode not in TEMPLATES:
        raise UserError(f"{where('conv_mode')}: unknown template {conv_mode!r}; expected one of {sorted(TEMPLATES)}.")
    max_new_tokens = raw.get("max_new_tokens", 128)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"{where('max_new_tokens')}: expected a positive integer, got {max_new_tokens!r}.")
    options = raw.get("score_options", {})
    if not isinstance(options, dict):
        raise UserError(f"{where('score_options')}: expected an object, got {options!r}.")
    for key, value in options.items():
        if key not in SCORE_OPTIONS or value not in SCORE_OPTIONS[key] or type(value) is not type(SCORE_OPTIONS[key][0]):
            raise UserError(f"{where('score_options')}: {key}={value!r} is not allowed; expected "
                            + "; ".join(f"{k} in {v}" for k, v in SCORE_OPTIONS.items()) + ".")
    for key in ("prompt_note", "description"):
        if not isinstance(raw.get(key, ""), str):
            raise UserError(f"{where(key)}: expected a string.")
    paths: dict[str, str | None] = {}
    for key in PATH_FIELDS:
        value = raw.get(key)
        if value is None:
            paths[key] = None
        elif not isinstance(value, str) or not value:
            raise UserError(f"{where(key)}: expected a path string (or null), got {value!r}.")
        else:
            paths[key] = _resolve_path(value, data_root, where(key))
    if paths["image_folder"] is None:
        if check_files or os.path.isfile(os.path.join(os.path.dirname(paths["question_file"]), "manifest.json")):
            paths["image_folder"] = manifest_image_folder(paths["question_file"], where("image_folder"))
    if check_files:
        for key in ("question_file", "annotation_file", "score_question_file"):
            if paths[key] is not None and not os.path.isfile(paths[key]):
                raise UserError(f"{where(key)}: {paths[key]} does not exist (data root {data_root}); prepare the "
                                f"benchmark with `llava-sculpt prepare {raw['task']} --raw-dir RAW --out-dir "
                                f"{os.path.dirname(paths[key])}` or fix the path.")
        if not os.path.isdir(paths["image_folder"]):
            raise UserError(f"{where('image_folder')}: {paths['image_folder']} is not a folder.")
    return BenchmarkSpec(path=path, name=raw["name"], task=raw["task"], role=raw["role"],
                         question_file=paths["question_file"], annotation_file=paths["annotation_file"],
                         image_folder=paths["image_folder"], score_question_file=paths["score_question_file"],
                         conv_mode=conv_mode, max_new_tokens=max_new_tokens, score_options=dict(options),
                         prompt_note=raw.get("prompt_note", ""), description=raw.get("description", ""))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llava_sculpt.eval.specs", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("spec", help="spec file, or a benchmark name in the spec folder (eval/)")
    p.add_argument("field", nargs="?", default=None, help="print only this field's resolved value")
    p.add_argument("--data-root", default=os.environ.get("DATA_ROOT"), help="value of ${DATA_ROOT} (default: $DATA_ROOT)")
    p.add_argument("--no-check-files", action="store_true", help="do not require the data files to exist")
    args = p.parse_args(argv)
    spec = load_spec(find_spec(args.spec), args.data_root, check_files=not args.no_check_files)
    values = asdict(spec)
    if args.field is None:
        print(json.dumps(values, indent=1))
    elif args.field not in values:
        raise UserError(f"no field {args.field!r}; fields: {', '.join(values)}.")
    else:
        value = values[args.field]
        print(value if isinstance(value, str) else json.dumps(value))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
