"""`llava-sculpt generate`: batched, resumable answer generation with LLaVA's `model_vqa_loader` flags.

    llava-sculpt generate --model-path RUN_DIR [--model-base BASE] --question-file questions.jsonl \\
        --image-folder IMAGES --answers-file answers.jsonl [--conv-mode vicuna_v1] [--temperature 0]
        [--top_p P] [--num_beams 1] [--max_new_tokens 128] [--num-chunks N --chunk-idx K]
        [--batch-size 8] [--image-aspect-ratio pad|square] [--dtype auto] [--max-questions N]
        [--overwrite | --adopt]

Questions: JSON lines {"question_id", "image" (optional; relative to --image-folder), "text"} as written by
`llava-sculpt prepare`.  The prompt is the vicuna_v1 generation prompt of "<image>\\n" + text (just text for
a text-only question), ending in "ASSISTANT:"; LlavaProcessor expands "<image>" to one token per visual
feature.  Images are padded to a square with the processor's mean colour first (`pad`, as in training).

Stopping: generation stops at the tokenizer's eos token (the end of turn training taught, see
`llava_sculpt.data.conversation.end_of_turn`) and at the model's generation_config eos token(s).  The answer
text is what precedes the first of them, decoded without special tokens, cut before any literal eos text or
"</s>" (the template's written end of turn, what a model trained before the eos fix spells out), stripped.

Answers: one JSON line per question, LLaVA's format
    {"question_id", "prompt" (the question text), "text" (the answer), "answer_id", "model_id", "metadata": {}}
appended and flushed after every batch, in question order.  `answer_id` is derived from the model id, the
question and the answer (uuid5), so a resumed run writes the same bytes as an uninterrupted one.

Resuming: when --answers-file exists, questions already answered there are skipped (a question id that
occurs several times in the question file is matched by occurrence: the n-th answer with that id answers
the n-th question with it).  A truncated last line (the process was killed mid-write) is dropped first.

What produced the answers: `ANSWERS.meta.json` next to the answers file, written (atomically) before the
first answer is appended, records the model (absolute --model-path, the --model-base actually used, a
fingerprint of the weights), the question file (absolute path + sha256), the image folder and every
setting that changes answers (--conv-mode, --image-aspect-ratio, the resolved --dtype, --temperature,
--top_p, --num_beams, --max_new_tokens, --seed; top_p and seed are recorded as null for greedy decoding,
which ignores them).  A rerun into a file whose record differs in any of these fails (exit 2) and names
the fields; --overwrite discards the old answers and starts afresh.  A file with answers but no record
(written before records existed) is refused too; --adopt records the current settings for it and resumes.
--batch-size, --device, --max-questions and the chunk flags are not recorded: they do not change an answer.
The fingerprint is a sha256 over: the adapter files (adapter_config.json, adapter_model.*, mm_projector
.safetensors) in full; config.json, generation_config.json and the processor/tokenizer files in full; and
for each weight file of the (base) model its name, its size and its content — in full up to 64 MiB,
otherwise 64 blocks of 64 KiB spread evenly over the file (4 MiB read per weight file of a 7B model).

Batching: prompts are LEFT-padded, so greedy answers are the same as with --batch-size 1 (up to
floating-point effects of padding in half precision).  Chunking: the questions are cut into --num-chunks
contiguous chunks of ceil(n / num_chunks) questions (LLaVA's split_list / get_chunk) and chunk --chunk-idx
is answered; concatenating the chunks' answer files in chunk order gives the unchunked file.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import uuid
from dataclasses import dataclass
from typing import Sequence

from llava_sculpt.atomic import write_json_atomic
from llava_sculpt.data.conversation import IMAGE_PLACEHOLDER, generation_prompt, get_template
from llava_sculpt.errors import UserError, json_error_text, run_cli

ANSWER_NAMESPACE = uuid.UUID("6f1c1b2e-4a52-4c39-9a43-0c6f6c7d2a11")


@dataclass(frozen=True)
class Question:
    question_id: object  # int or str, written back unchanged
    text: str
    image: str | None
    line: int            # 1-based line in the question file (for error messages)

    @property
    def key(self) -> str:
        return json.dumps(self.question_id)


# ------------------------------------------------------------------------------------------ questions
def load_questions(path: str) -> list[Question]:
    """Read a question JSONL; every problem names the file and the line."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise UserError(f"--question-file {path} does not exist; expected JSON lines "
                        '{"question_id", "image", "text"} (e.g. questions.jsonl of `llava-sculpt prepare`).') from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--question-file {path}: cannot read it ({err}).") from None
    questions = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"--question-file {path}, line {number}"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({json_error_text(err, line=False)}); expected one object "
                            '{"question_id", "image", "text"} per line.') from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}.")
        qid, text, image = record.get("question_id"), record.get("text"), record.get("image")
        if isinstance(qid, bool) or not isinstance(qid, (int, str)):
            raise UserError(f"{where}: 'question_id' must be an integer or a string, got {qid!r}.")
        if not isinstance(text, str) or not text.strip():
            raise UserError(f"{where}: 'text' must be a non-empty string (the question), got {text!r:.80}.")
        if image is not None and (not isinstance(image, str) or not image):
            raise UserError(f"{where}: 'image' must be a relative path string (or absent for a text-only "
                            f"question), got {image!r}.")
        if image is None and IMAGE_PLACEHOLDER in text:
            raise UserError(f"{where}: a text-only question (no 'image') contains {IMAGE_PLACEHOLDER!r}.")
        questions.append(Question(qid, text, image, number))
    if not questions:
        raise UserError(f"--question-file {path} holds no questions.")
    return questions


def get_chunk(items: Sequence, num_chunks: int, chunk_idx: int) -> list:
    """Chunk `chunk_idx` of `num_chunks` contiguous chunks of ceil(len / num_chunks) items (LLaVA's
    split_list/get_chunk).  A chunk index past the last non-empty chunk gets [] (LLaVA would fail)."""
    if num_chunks < 1:
        raise UserError(f"--num-chunks must be at least 1, got {num_chunks}.")
    if not 0 <= chunk_idx < num_chunks:
        raise UserError(f"--chunk-idx must be in [0, {num_chunks - 1}] for --num-chunks {num_chunks}, got {chunk_idx}.")
    size = math.ceil(len(items) / num_chunks)
    return list(items[chunk_idx * size:(chunk_idx + 1) * size])


def check_images(questions: Sequence[Question], image_folder: str | None, question_file: str) -> None:
    """Every image question needs --image-folder and an existing file; name the first missing ones."""
    with_image = [q for q in questions if q.image is not None]
    if not with_image:
        return
    if image_folder is None:
        raise UserError(f"--question-file {question_file}, line {with_image[0].line}: the question has an image "
                        f"({with_image[0].image}) but no --image-folder was given.")
    missing = [q for q in with_image if not os.path.isfile(os.path.join(image_folder, q.image))]
    if missing:
        first = missing[0]
        raise UserError(f"--question-file {question_file}: {len(missing)} image(s) not found under --image-folder "
                        f"{image_folder}; first at line {first.line}: {os.path.join(image_folder, first.image)}.")


# -------------------------------------------------------------------------------------------- answers
def occurrence_keys(keys: Sequence[str]) -> list[tuple[str, int]]:
    """[(key, n)] where n counts earlier occurrences of the same key: matches duplicates by position."""
    seen: dict[str, int] = {}
    out = []
    for key in keys:
        out.append((key, seen.get(key, 0)))
        seen[key] = seen.get(key, 0) + 1
    return out


def read_answered(answers_file: str, repair: bool = True) -> list[str]:
    """Question-id keys of the complete lines of an existing answers file (in file order).  A last line
    without its newline (killed mid-write) is cut off when `repair`; any other bad line is an error."""
    if not os.path.exists(answers_file):
        return []
    with open(answers_file, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        if repair:
            print(f"llava-sculpt generate: dropping a truncated last line of {answers_file} "
                  f"({len(data) - end} bytes) before resuming", file=sys.stderr)
            with open(answers_file, "r+b") as f:
                f.truncate(end)
        data = data[:end]
    keys = []
    for number, raw in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
            keys.append(json.dumps(record["question_id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"--answers-file {answers_file}, line {number}: not an answer line with a "
                            "'question_id'; delete the file (or move it away) to start over.") from None
    return keys


def pending_questions(questions: Sequence[Question], answers_file: str) -> list[Question]:
    """The questions not yet answered in `answers_file` (after repairing a truncated last line)."""
    answered = occurrence_keys(read_answered(answers_file))
    wanted = occurrence_keys([q.key for q in questions])
    unknown = set(answered) - set(wanted)
    if unknown:
        key, n = sorted(unknown)[0]
        raise UserError(f"--answers-file {answers_file} answers question_id {key} (occurrence {n + 1}), which "
                        f"is not among the questions of this run (another question file, chunk or "
                        f"--max-questions?); delete it or pick another --answers-file.")
    done = set(answered)
    return [q for q, k in zip(questions, wanted) if k not in done]


# ------------------------------------------------------------------------------ what produced the answers
META_SUFFIX = ".meta.json"
META_FORMAT = 1
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", "mm_projector.safetensors")
SMALL_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                     "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json",
                     "processor_config.json", "chat_template.json", "chat_template.jinja")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
FULL_HASH_BYTES = 64 << 20
SAMPLE_BLOCKS, SAMPLE_BYTES = 64, 64 << 10
MODEL_FIELDS = ("model_path", "model_base", "model_fingerprint")


def meta_path(answers_file: str) -> str:
    """The record of what produced `answers_file`: ANSWERS.meta.json next to it."""
    return answers_file + META_SUFFIX


def file_sha256(path: str, sample: bool = False) -> str:
    """sha256 of a file's bytes; with `sample`, of files over 64 MiB only SAMPLE_BLOCKS evenly spread blocks
    (the first and the last included) are read."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if not sample or size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        else:
            step = (size - SAMPLE_BYTES) / (SAMPLE_BLOCKS - 1)
            for i in range(SAMPLE_BLOCKS):
                f.seek(int(i * step))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _is_adapter(model_path: str) -> bool:
    return os.path.isfile(os.path.join(model_path, "adapter_config.json"))


def resolve_model_base(model_path: str, model_base: str | None) -> str | None:
    """The base checkpoint an adapter is loaded on (as `load_for_inference` picks it), absolute; None for a
    full checkpoint, which ignores --model-base."""
    if not os.path.isdir(model_path):
        raise UserError(f"--model-path {model_path} is not a folder; expected a training run / checkpoint "
                        "directory or a Hugging Face LLaVA checkpoint.")
    if not _is_adapter(model_path):
        return None
    if model_base is None:
        try:
            with open(os.path.join(model_path, "adapter_config.json"), encoding="utf-8") as f:
                model_base = json.load(f).get("base_model_name_or_path")
        except (OSError, json.JSONDecodeError, AttributeError) as err:
            raise UserError(f"--model-path {model_path}: cannot read adapter_config.json ({err}).") from None
        if not model_base or not os.path.isdir(model_base):
            raise UserError(f"--model-path {model_path} is a LoRA adapter; pass the base checkpoint with "
                            f"--model-base (the adapter records {model_base!r}, which is not a local folder)")
    elif not os.path.isdir(model_base):
        raise UserError(f"--model-base {model_base} is not a folder; expected the Hugging Face LLaVA checkpoint "
                        "the adapter was trained on.")
    return os.path.abspath(model_base)


def model_fingerprint(model_path: str, model_base: str | None = None) -> str:
    """sha256 over the files that make the model (see the module docstring for what is read)."""
    entries = []

    def add(role: str, folder: str, names, sample: bool = False) -> None:
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                entries.append([role, name, os.path.getsize(path), file_sha256(path, sample)])

    base = resolve_model_base(model_path, model_base)
    weights_dir = base if base is not None else model_path
    if base is not None:
        add("adapter", model_path, ADAPTER_FILES)
    processor_dir = model_path if os.path.isfile(os.path.join(model_path, "tokenizer_config.json")) else weights_dir
    add("processor", processor_dir, [n for n in SMALL_MODEL_FILES if n not in ("config.json", "generation_config.json")])
    add("model", weights_dir, ("config.json", "generation_config.json"))
    add("weights", weights_dir, sorted(n for n in os.listdir(weights_dir) if n.endswith(WEIGHT_SUFFIXES)
                                       and not n.startswith(("adapter_model", "mm_projector", "."))), sample=True)
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def model_identity(model_path: str, model_base: str | None = None) -> dict:
    """{"model_path", "model_base", "model_fingerprint"}: which model answers (paths absolute)."""
    return {"model_path": os.path.abspath(model_path), "model_base": resolve_model_base(model_path, model_base),
            "model_fingerprint": model_fingerprint(model_path, model_base)}


def answers_meta(identity: dict, question_file: str, image_folder: str | None, conv_mode: str = "vicuna_v1",
                 image_aspect_ratio: str = "pad", dtype: str = "auto", temperature: float = 0.0,
                 top_p: float | None = None, num_beams: int = 1, max_new_tokens: int = 128, seed: int = 0,
                 merge_lora: bool = False) -> dict:
    """The record written next to an answers file: the model (`model_identity`), the questions and every
    setting that changes an answer.  `dtype` is resolved ("auto" -> the dtype it means on this machine).
    `merge_lora` is recorded (as "merge_lora": true) only when it merges something, an adapter run: merged
    weights round differently, so greedy answers may differ; records without it stay as they were."""
    from llava_sculpt.data.conversation import TEMPLATES

    resolved = resolve_dtype(dtype)
    sampling = temperature > 0
    template = get_template(conv_mode)  # aliases of one template (v1, vicuna_v1, ...) are one setting
    conv_mode = next(name for name, t in TEMPLATES.items() if t is template)
    return {"format": META_FORMAT, **identity,
            "question_file": os.path.abspath(question_file), "question_file_sha256": file_sha256(question_file),
            "image_folder": os.path.abspath(image_folder) if image_folder is not None else None,
            "conv_mode": conv_mode, "image_aspect_ratio": image_aspect_ratio,
            "dtype": str(resolved).replace("torch.", ""),
            "temperature": float(temperature), "top_p": top_p if sampling else None, "num_beams": int(num_beams),
            "max_new_tokens": int(max_new_tokens), "seed": int(seed) if sampling else None,
            **({"merge_lora": True} if merge_lora and is_adapter_run(identity["model_path"]) else {})}


def is_adapter_run(model_path: str) -> bool:
    """True for a run / checkpoint folder holding a PEFT adapter (what --merge-lora merges)."""
    from llava_sculpt.model.load import ADAPTER_CONFIG

    return os.path.isfile(os.path.join(model_path, ADAPTER_CONFIG))


def read_meta(answers_file: str) -> dict | None:
    path = meta_path(answers_file)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path} (the record of what produced {answers_file}) cannot be read ({err}); pass "
                        "--overwrite to discard those answers and start afresh.") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: expected a JSON object; pass --overwrite to discard {answers_file} and start afresh.")
    return record


def meta_differences(recorded: dict, current: dict, fields: Sequence[str] | None = None) -> list[str]:
    """'field: recorded X, now Y' for every field (of `fields`, default all) whose values differ."""
    keys = fields if fields is not None else list(dict.fromkeys([*current, *recorded]))
    return [f"{k}: recorded {recorded.get(k)!r}, now {current.get(k)!r}" for k in keys
            if recorded.get(k) != current.get(k)]


def check_answers_record(answers_file: str, meta: dict, adopt: bool = False, what: str = "--answers-file") -> str:
    """Whether `answers_file` may be resumed with `meta` (nothing is written): "fresh" (no answers in it),
    "same" (its record matches) or "adopt" (answers without a record, accepted by --adopt).  Raises a
    UserError naming the differing fields otherwise."""
    if not read_answered(answers_file, repair=False):
        return "fresh"
    recorded = read_meta(answers_file)
    if recorded is None:
        if adopt:
            return "adopt"
        raise UserError(f"{what} {answers_file} holds answers but no record of the model and settings that "
                        f"produced them ({os.path.basename(meta_path(answers_file))} is missing: written before "
                        "llava-sculpt kept such records, or by another tool), so resuming could mix two models. "
                        "Pass --overwrite to discard these answers and start afresh, or --adopt if you know they "
                        "come from this model with these settings (records them and resumes).")
    differences = meta_differences(recorded, meta)
    if differences:
        raise UserError(f"{what} {answers_file} was produced by a different model or settings than this run "
                        f"({'; '.join(differences)}); resuming would mix the two. Pass --overwrite to discard "
                        "these answers and start afresh, or choose another answers file.")
    return "same"


def discard_answers(answers_file: str) -> None:
    """--overwrite: remove an answers file and its record."""
    for path in (answers_file, meta_path(answers_file)):
        if os.path.exists(path):
            os.remove(path)


def claim_answers_file(answers_file: str, meta: dict, overwrite: bool = False, adopt: bool = False,
                       what: str = "--answers-file") -> None:
    """Make `answers_file` this run's before any answer is appended: check (or, with `overwrite`, discard)
    what is there, then record `meta` next to it (atomically)."""
    if overwrite:
        try:
            n = len(read_answered(answers_file, repair=False))
        except UserError:  # unreadable lines: discarded all the same
            n = "unreadable"
        if n:
            print(f"llava-sculpt generate: --overwrite: discarding the {n} answers in {answers_file}", file=sys.stderr)
        discard_answers(answers_file)
    elif check_answers_record(answers_file, meta, adopt, what) == "same":
        return
    write_json_atomic(meta_path(answers_file), meta)


def answer_record(question: Question, text: str, model_id: str) -> dict:
    answer_id = uuid.uuid5(ANSWER_NAMESPACE, json.dumps([model_id, question.question_id, question.text, text])).hex
    return {"question_id": question.question_id, "prompt": question.text, "text": text,
            "answer_id": answer_id, "model_id": model_id, "metadata": {}}


# ----------------------------------------------------------------------------------------- generation
def build_prompt(template, question: Question) -> str:
    """vicuna_v1 generation prompt; image questions start with "<image>\\n" (LLaVA's eval prompt)."""
    if question.image is None:
        return generation_prompt(template, question.text)
    text = question.text.replace(IMAGE_PLACEHOLDER, "").strip()
    return generation_prompt(template, IMAGE_PLACEHOLDER + "\n" + text)


def left_padding_processor(processor):
    """A shallow copy of the processor whose tokenizer pads on the left (the original is left untouched)."""
    proc = copy.copy(processor)
    proc.tokenizer = copy.deepcopy(processor.tokenizer)
    proc.tokenizer.padding_side = "left"
    if proc.tokenizer.pad_token is None:
        proc.tokenizer.pad_token = proc.tokenizer.unk_token or proc.tokenizer.eos_token
    return proc


def encode_batch(processor, model_config, template, batch: Sequence[Question], image_folder: str | None,
                 image_aspect_ratio: str) -> dict:
    """input_ids / attention_mask [B, T] (left-padded) and pixel_values [N_images, 3, H, W]."""
    from PIL import Image

    from llava_sculpt.data.dataset import expand2square, mean_colour, num_image_tokens

    prompts, images = [], []
    for q in batch:
        prompts.append(build_prompt(template, q))
        if q.image is not None:
            path = os.path.join(image_folder, q.image)
            try:
                image = Image.open(path).convert("RGB")
            except (OSError, ValueError) as err:
                raise UserError(f"question line {q.line} (question_id {q.question_id!r}): cannot read image "
                                f"{path}: {err}") from None
            if image_aspect_ratio == "pad":
                image = expand2square(image, mean_colour(processor.image_processor))
            images.append(image)
    inputs = processor(text=prompts, images=images or None, padding=True, return_tensors="pt")
    # the processor must insert exactly as many <image> tokens as the model has visual features
    expected = num_image_tokens(model_config)
    counts = (inputs["input_ids"] == model_config.image_token_index).sum(dim=1).tolist()
    for q, count in zip(batch, counts):
        want = expected if q.image is not None else 0
        if count != want:
            raise UserError(f"question_id {q.question_id!r}: the processor produced {count} image tokens, the model "
                            f"expects {want}; the processor's patch_size / vision_feature_select_strategy / "
                            "num_additional_image_tokens do not match the model config.")
    return dict(inputs)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The token ids generation stops at: the tokenizer's eos (what training labels end each answer with)
    first, then the model's generation_config eos token(s)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for tok in configured if isinstance(configured, (list, tuple)) else [configured]:
        if tok is not None and int(tok) not in ids:
            ids.append(int(tok))
    return ids


def clean_answer(token_ids: Sequence[int], tokenizer, stop_ids: Sequence[int], stop_texts: Sequence[str]) -> str:
    """The answer text of one generated row: the tokens before the first stop id, decoded without special
    tokens, cut before the first of `stop_texts` (literal eos / "</s>" text), stripped."""
    token_ids = list(token_ids)
    cut = min((token_ids.index(t) for t in stop_ids if t in token_ids), default=len(token_ids))
    text = tokenizer.decode(token_ids[:cut], skip_special_tokens=True)
    for stop in stop_texts:
        if stop and stop in text:
            text = text[:text.index(stop)]
    return text.strip()


def generation_kwargs(temperature: float, top_p: float | None, num_beams: int, max_new_tokens: int,
                      pad_token_id: int, eos_token_id: int | list[int] | None = None) -> dict:
    kwargs = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "use_cache": True,
              "pad_token_id": pad_token_id}
    if eos_token_id is not None:  # None: the model's generation_config decides
        kwargs["eos_token_id"] = eos_token_id
    if temperature > 0:  # LLaVA: temperature 0 means greedy decoding
        kwargs.update(do_sample=True, temperature=temperature)
        if top_p is not None:
            kwargs["top_p"] = top_p
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


@contextlib.contextmanager
def contiguous_head_input(model):
    """While generating on CPU, hand the output embedding (lm_head) a contiguous input.

    Generation computes logits for the last position only, `lm_head(hidden[:, -1:, :])`: a strided [B, 1, H]
    view.  On CPU, torch 2.13's bfloat16/float16 `linear` sends such a view through a batched matmul against
    the weight expanded to [B, H, V], a copy of B x H x V elements: 1.7 s instead of 8 ms for B = 32 and
    SmolLM2's 49,216 x 576 head, at every generated token (float32 is unaffected).  A contiguous copy of
    the [B, 1, H] input costs nothing and gives the same logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    device = next(model.parameters()).device
    if head is None or device.type != "cpu":
        yield
        return

    def make_contiguous(module, args):
        return (args[0].contiguous(), *args[1:]) if args and not args[0].is_contiguous() else None

    handle = head.register_forward_pre_hook(make_contiguous)
    try:
        yield
    finally:
        handle.remove()


def generate_answers(model, processor, questions: Sequence[Question], answers_file: str, batch_size: int = 8,
                     image_folder: str | None = None, conv_mode: str = "vicuna_v1", image_aspect_ratio: str = "pad",
                     temperature: float = 0.0, top_p: float | None = None, num_beams: int = 1,
                     max_new_tokens: int = 128, model_id: str = "llava", progress: bool = True,
                     inference_mode: bool = True) -> int:
    """Answer the `questions` not yet in `answers_file`, appending one LLaVA answer line per question (in
    question order, flushed after every batch).  Returns the number of new answers.  `inference_mode=False`
    runs under torch.no_grad instead of torch.inference_mode (same answers): for a model that goes on
    training afterwards (evaluation during training), which must not keep inference tensors in its buffers
    or in DeepSpeed ZeRO-3's gathered parameters."""
    import torch
    from tqdm import tqdm

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
    if image_aspect_ratio not in ("pad", "square"):
        raise UserError(f"--image-aspect-ratio must be pad or square, got {image_aspect_ratio!r}.")
    template = get_template(conv_mode)
    todo = pending_questions(questions, answers_file)
    if len(todo) < len(questions):
        print(f"llava-sculpt generate: resuming {answers_file}: {len(questions) - len(todo)} of "
              f"{len(questions)} questions already answered", file=sys.stderr)
    directory = os.path.dirname(os.path.abspath(answers_file))
    os.makedirs(directory, exist_ok=True)
    if not todo:
        open(answers_file, "a").close()  # an empty chunk still gets its (empty) file
        return 0
    proc = left_padding_processor(processor)
    tokenizer = proc.tokenizer
    config = model.config
    device = next(model.parameters()).device
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    stop_ids = stop_token_ids(model, tokenizer)
    stop_texts = list(dict.fromkeys(t for t in (tokenizer.eos_token, template.sep2) if t))
    gen_kwargs = generation_kwargs(temperature, top_p, num_beams, max_new_tokens, tokenizer.pad_token_id,
                                   (stop_ids[0] if len(stop_ids) == 1 else stop_ids) or None)
    bar = tqdm(total=len(todo), unit="sample", desc=os.path.basename(answers_file), disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    written = 0
    with open(answers_file, "a", encoding="utf-8") as out, contiguous_head_input(model):
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            inputs = encode_batch(proc, config, template, batch, image_folder, image_aspect_ratio)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            with torch.inference_mode() if inference_mode else torch.no_grad():
                output_ids = model.generate(**inputs, **gen_kwargs)
            new_tokens = output_ids[:, inputs["input_ids"].shape[1]:]  # [B, <= max_new_tokens]
            texts = [clean_answer(row, tokenizer, stop_ids, stop_texts) for row in new_tokens.tolist()]
            out.write("".join(json.dumps(answer_record(q, t, model_id), ensure_ascii=False) + "\n"
                              for q, t in zip(batch, texts)))
            out.flush()
            written += len(batch)
            bar.update(len(batch))
    bar.close()
    return written


# ------------------------------------------------------------------------------------------------ CLI
def resolve_dtype(name: str):
    import torch

    from llava_sculpt.model.load import DTYPES

    if name == "auto":
        return torch.float16 if torch.cuda.is_available() else torch.float32
    return DTYPES[name]


def model_name(model_path: str) -> str:
    """LLaVA's model_id: the last path component (a checkpoint-N keeps its run's name in front)."""
    parts = os.path.abspath(model_path).rstrip(os.sep).split(os.sep)
    return "_".join(parts[-2:]) if parts[-1].startswith("checkpoint-") else parts[-1]


def load_model(model_path: str, model_base: str | None, dtype_name: str = "auto", device: str = "auto",
               merge_lora: bool = False):
    """(model, processor) on `device` (auto: cuda when available): base + projector + adapter, the adapter
    merged into the base weights when `merge_lora` (LLaVA's builder merges; faster), else kept apart."""
    import torch

    import llava_sculpt.methods  # noqa: F401  (the methods register their run formats, e.g. AsymLoRA's)
    from llava_sculpt.model.load import load_for_inference

    if not os.path.isdir(model_path):
        raise UserError(f"--model-path {model_path} is not a folder; expected a training run / checkpoint "
                        "directory or a Hugging Face LLaVA checkpoint.")
    model, processor = load_for_inference(model_path, model_base, dtype=resolve_dtype(dtype_name),
                                          merge_lora=merge_lora)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check_cpu_dtype(model.dtype, device)
    return model.to(device), processor


def check_cpu_dtype(dtype, device: str) -> None:
    """A note where bf16 generation on this CPU is emulated (many times slower than float32)."""
    import torch

    from llava_sculpt.training.arguments import cpu_bf16_is_native

    if dtype == torch.bfloat16 and str(device).startswith("cpu") and not cpu_bf16_is_native():
        print("note: --dtype bfloat16 on a CPU without native bfloat16 (no AVX512-BF16 or AMX): torch emulates "
              "it, many times slower than float32 here", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from llava_sculpt.model.load import DTYPES

    p = argparse.ArgumentParser(prog="llava-sculpt generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model-path", required=True, help="run / checkpoint dir (adapter) or HF LLaVA checkpoint")
    p.add_argument("--model-base", default=None, help="base checkpoint of an adapter (default: the one it records)")
    p.add_argument("--question-file", required=True, help="question JSON lines")
    p.add_argument("--image-folder", default=None, help="folder the questions' image paths are relative to")
    p.add_argument("--answers-file", required=True, help="answer JSON lines (appended to / resumed)")
    p.add_argument("--conv-mode", default="vicuna_v1", help="conversation template (default vicuna_v1)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top_p", "--top-p", type=float, default=None)
    p.add_argument("--num_beams", "--num-beams", type=int, default=1)
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=128)
    p.add_argument("--num-chunks", type=int, default=1, help="split the questions into N contiguous chunks")
    p.add_argument("--chunk-idx", type=int, default=0, help="answer chunk K (0-based)")
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate() call (left padding)")
    p.add_argument("--image-aspect-ratio", choices=("pad", "square"), default="pad",
                   help="pad: pad to a square with the mean colour (LLaVA-1.5, as in training)")
    p.add_argument("--dtype", choices=("auto", *sorted(DTYPES)), default="auto",
                   help="auto: float16 on GPU, float32 on CPU")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--merge-lora", action="store_true", help="merge a LoRA adapter into the base weights after "
                   "loading, as LLaVA's model builder does (faster; recorded: answers may differ by rounding)")
    p.add_argument("--max-questions", type=int, default=None, help="only the first N questions (smoke runs)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    p.add_argument("--overwrite", action="store_true", help="discard the answers already in --answers-file "
                   "(and their record) and start afresh; needed when they came from another model or settings")
    p.add_argument("--adopt", action="store_true", help="an answers file without a record of what produced it "
                   "(older llava-sculpt): record this run's model and settings for it and resume")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    get_template(args.conv_mode)
    if args.max_new_tokens < 1 or args.num_beams < 1:
        raise UserError("--max_new_tokens and --num_beams must be at least 1.")
    questions = load_questions(args.question_file)
    if args.max_questions is not None:
        if args.max_questions < 1:
            raise UserError(f"--max-questions must be at least 1, got {args.max_questions}.")
        questions = questions[:args.max_questions]
    chunk = get_chunk(questions, args.num_chunks, args.chunk_idx)
    check_images(chunk, args.image_folder, args.question_file)
    if args.overwrite and args.adopt:
        raise UserError("--overwrite discards the answers, --adopt keeps them: pass one of them, not both.")
    meta = answers_meta(model_identity(args.model_path, args.model_base), args.question_file, args.image_folder,
                        args.conv_mode, args.image_aspect_ratio, args.dtype, args.temperature, args.top_p,
                        args.num_beams, args.max_new_tokens, args.seed, merge_lora=args.merge_lora)
    claim_answers_file(args.answers_file, meta, overwrite=args.overwrite, adopt=args.adopt)
    if not pending_questions(chunk, args.answers_file):
        os.makedirs(os.path.dirname(os.path.abspath(args.answers_file)), exist_ok=True)
        open(args.answers_file, "a").close()
        print(f"{args.answers_file}: all {len(chunk)} questions already answered")
        return 0
    import torch

    torch.manual_seed(args.seed)
    model, processor = load_model(args.model_path, args.model_base, args.dtype, args.device, args.merge_lora)
    n = generate_answers(model, processor, chunk, args.answers_file, args.batch_size, args.image_folder,
                         args.conv_mode, args.image_aspect_ratio, args.temperature, args.top_p, args.num_beams,
                         args.max_new_tokens, model_name(args.model_path), progress=not args.no_progress)
    print(f"wrote {n} answers to {args.answers_file} (chunk {args.chunk_idx + 1}/{args.num_chunks}, "
          f"{len(chunk)} questions)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
