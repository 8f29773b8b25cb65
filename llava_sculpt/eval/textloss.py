"""`llava-sculpt text-loss`: the language model's loss on a fixed, held-out English text (forgetting of
language modelling itself; no hand-made list needed).

    llava-sculpt text-loss --model-path MODEL [--model-base BASE] [--eval-dir DIR (default MODEL/eval)]
        [--max-tokens 256] [--dtype auto] [--reference REF_TEXTLOSS.json] [--overwrite]

The text: the docstrings (`inspect.getdoc`) of STDLIB_NAMES, a fixed list of well-known Python standard-library
functions and classes whose docstrings are plain English, read at run time from the running Python (nothing is
copied into the repository), in list order, joined by blank lines.  No training data of llava-sculpt (LLaVA's
JSON, the benchmarks, the demo's world) contains them.  Names missing from the running Python are skipped
and listed.  The text differs between Python versions: every result records the text's sha256 and the Python
version, and two results are compared only when the text (and its tokens) are the same (`compare`).

Tokens: the text is tokenised once without special tokens, then cut into consecutive chunks of at most
--max-tokens tokens, each preceded by the BOS token when the tokenizer adds one (plain text, no chat
template).  Every token of the text is in exactly one chunk.  Scored positions: every token after the first
of its chunk's input (so with a BOS every text token is predicted once; without, each chunk's first token is
context only).  The model sees text only (no image, no pixel_values).

    loss = sum over scored positions t of -log softmax(logits[t-1])[token_t]  /  number of scored positions

in nats per token (log-softmax in float32 on the model's logits, sums accumulated in float64); perplexity =
exp(loss).

Output (written atomically; a rerun with the same model, text and settings writes nothing):
    DIR/scores/textloss.json  {"task": "textloss", "nll_per_token", "perplexity", "num_tokens_scored",
        "num_text_tokens", "num_chunks", "max_tokens", "text_sha256", "tokens_sha256", "python_version",
        "num_docstrings", "missing_names", "dtype", "model_path", "model_base", "model_fingerprint"}
    + with --reference REF: "reference" (its path), "reference_nll_per_token", "delta_nll_per_token" (this
      minus the reference: > 0 = the model got worse on the text).
One eval dir holds one model's results: a textloss.json or benchmark answers (answers/*.meta.json) of another
model in DIR is an error; --overwrite replaces a textloss.json of another model or other settings (benchmark
answers of another model must be moved away: use another --eval-dir).

In Python (e.g. on a model in memory): `text_loss(model, tokenizer, max_tokens=256)` returns the same numbers
(without the model fields); `compare(a, b)` refuses results on different texts.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import math
import os
import platform
import sys
from typing import Sequence

from llava_sculpt.errors import UserError, run_cli

DEFAULT_MAX_TOKENS = 256
# fixed selection, in this order: plain-English docstrings of long-standing stdlib functions and classes
STDLIB_NAMES = (
    "os.walk", "os.makedirs", "os.path.commonpath", "os.path.expanduser", "os.path.normpath", "os.path.relpath",
    "shutil.copyfile", "shutil.copytree", "shutil.rmtree", "shutil.move", "shutil.which", "shutil.disk_usage",
    "glob.glob", "fnmatch.fnmatch", "fnmatch.filter", "tempfile.mkstemp", "tempfile.mkdtemp",
    "tempfile.TemporaryDirectory", "subprocess.run", "subprocess.check_output", "subprocess.Popen",
    "json.dumps", "json.loads", "json.dump", "textwrap.dedent", "textwrap.wrap", "textwrap.fill",
    "textwrap.indent", "textwrap.shorten", "string.capwords", "re.sub", "re.split", "re.findall", "re.compile",
    "re.escape", "re.match", "functools.lru_cache", "functools.reduce", "functools.wraps",
    "functools.total_ordering", "collections.namedtuple", "collections.Counter", "collections.ChainMap",
    "collections.OrderedDict", "heapq.heappush", "heapq.heappop", "heapq.nlargest", "heapq.merge",
    "bisect.bisect_left", "bisect.insort_right", "random.shuffle", "random.sample", "random.choice",
    "random.randint", "random.uniform", "random.gauss", "random.choices", "statistics.mean",
    "statistics.median", "statistics.stdev", "statistics.variance", "statistics.mode", "fractions.Fraction",
    "copy.deepcopy", "copy.copy", "pprint.pprint", "inspect.getdoc", "inspect.signature", "inspect.getsource",
    "difflib.SequenceMatcher", "difflib.get_close_matches", "difflib.unified_diff", "urllib.parse.urlparse",
    "urllib.parse.quote", "urllib.parse.urlencode", "base64.b64encode", "calendar.isleap", "calendar.monthrange",
    "contextlib.contextmanager", "contextlib.suppress", "dataclasses.dataclass", "dataclasses.field",
    "dataclasses.asdict", "threading.Thread", "queue.Queue", "shlex.split", "shlex.quote", "logging.basicConfig",
    "logging.getLogger", "warnings.warn", "zipfile.ZipFile", "tarfile.open", "gzip.open",
    "ipaddress.ip_address", "abc.abstractmethod", "argparse.ArgumentParser.add_argument",
)


# ------------------------------------------------------------------------------------------------ the text
def _resolve(name: str):
    """The object named `name` ("os.path.join", "argparse.ArgumentParser.add_argument"), or None."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def held_out_text(names: Sequence[str] = STDLIB_NAMES) -> tuple[str, list[str], list[str]]:
    """(text, names used, names missing from this Python): the docstrings joined by blank lines."""
    docs, used, missing = [], [], []
    for name in names:
        obj = _resolve(name)
        doc = inspect.getdoc(obj) if obj is not None else None
        if doc and doc.strip():
            docs.append(doc.strip())
            used.append(name)
        else:
            missing.append(name)
    if not docs:
        raise UserError("none of the standard-library docstrings of the held-out text could be read "
                        "(Python run with -OO, which strips docstrings?).")
    return "\n\n".join(docs), used, missing


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------ chunks
def bos_prefix(tokenizer) -> list[int]:
    """[bos id] when the tokenizer puts a BOS in front of plain text, else []."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return [bos] if bos is not None and ids[:1] == [bos] else []


def chunk_token_ids(tokenizer, text: str, max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[list[list[int]], list[int]]:
    """(chunks, text token ids): consecutive pieces of the text's tokens, each with the BOS prefix, at most
    `max_tokens` ids long in all."""
    prefix = bos_prefix(tokenizer)
    step = max_tokens - len(prefix)
    if step < 1 + (not prefix):
        raise UserError(f"--max-tokens {max_tokens} is too small: a chunk needs room for at least one scored token.")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise UserError("the held-out text tokenises to no tokens.")
    return [prefix + ids[i:i + step] for i in range(0, len(ids), step)], ids


def chunk_nll(model, chunks: Sequence[Sequence[int]]) -> tuple[float, int]:
    """(sum of -log p(token | preceding tokens of its chunk) over every position after the first, number of
    such positions); the model in eval mode, no gradients."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:
            if len(chunk) < 2:
                continue
            ids = torch.tensor([list(chunk)], device=device)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            total += -float(logp.gather(1, ids[0, 1:, None]).double().sum())
            count += len(chunk) - 1
    return total, count


def text_loss(model, tokenizer, max_tokens: int = DEFAULT_MAX_TOKENS, text: str | None = None,
              max_chunks: int = 0) -> dict:
    """The result fields of the module docstring for `model` (restored to its train/eval mode afterwards);
    `max_chunks` > 0 scores only the text's first `max_chunks` chunks (a shorter, cheaper measure)."""
    missing: list[str] = []
    if text is None:
        text, used, missing = held_out_text()
        num_docs = len(used)
    else:
        num_docs = None
    chunks, ids = chunk_token_ids(tokenizer, text, max_tokens)
    if max_chunks < 0:
        raise UserError(f"--max-chunks must be 0 (all) or positive, got {max_chunks}")
    if max_chunks:
        chunks = chunks[:max_chunks]
    training = model.training
    model.eval()
    try:
        total, count = chunk_nll(model, chunks)
    finally:
        model.train(training)
    loss = total / count
    return {"task": "textloss", "nll_per_token": loss, "perplexity": math.exp(loss), "num_tokens_scored": count,
            "num_text_tokens": len(ids), "num_chunks": len(chunks), "max_tokens": max_tokens, "max_chunks": max_chunks,
            "text_sha256": sha256_text(text), "tokens_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
            "python_version": platform.python_version(), "num_docstrings": num_docs, "missing_names": missing}


COMPARED_FIELDS = ("text_sha256", "tokens_sha256", "max_tokens", "max_chunks")


def _field(payload: dict, key: str):
    """A result's field; results written before --max-chunks existed scored every chunk (0)."""
    return payload.get(key, 0 if key == "max_chunks" else None)


def compare(result: dict, reference: dict, name: str = "the result", reference_name: str = "the reference") -> float:
    """result's nll_per_token minus the reference's; a UserError when they were not computed on the same text,
    tokens and chunking."""
    for what, payload in ((name, result), (reference_name, reference)):
        if not isinstance(payload, dict) or payload.get("task") != "textloss" or "nll_per_token" not in payload:
            raise UserError(f"{what}: not a text-loss result (scores/textloss.json of `llava-sculpt text-loss`).")
    differ = [f"{k} {_field(reference, k)!r} vs {_field(result, k)!r}" for k in COMPARED_FIELDS
              if _field(result, k) != _field(reference, k)]
    if differ:
        raise UserError(f"{reference_name} and {name} were computed on different texts or tokens ({'; '.join(differ)}; "
                        f"Python {reference.get('python_version')} vs {result.get('python_version')}, or another "
                        "tokenizer or --max-tokens): their losses are not comparable.")
    return float(result["nll_per_token"]) - float(reference["nll_per_token"])


# ------------------------------------------------------------------------------------------------ CLI
def _read_json(path: str, what: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise UserError(f"{what} {path} is not valid JSON ({err}).") from None


def check_eval_dir(eval_dir: str, identity: dict) -> None:
    """No benchmark answers of another model in `eval_dir` (one eval dir holds one model's results)."""
    from llava_sculpt.eval.generate import META_SUFFIX, MODEL_FIELDS, meta_differences, read_meta

    answers_dir = os.path.join(eval_dir, "answers")
    if not os.path.isdir(answers_dir):
        return
    for entry in sorted(os.listdir(answers_dir)):
        if entry.endswith(".jsonl" + META_SUFFIX):
            answers_file = os.path.join(answers_dir, entry[:-len(META_SUFFIX)])
            differences = meta_differences(read_meta(answers_file) or {}, identity, MODEL_FIELDS)
            if differences:
                raise UserError(f"eval dir {eval_dir} holds answers of another model ({entry}: {'; '.join(differences)}); "
                                "a text loss there would mix two models. Choose another --eval-dir.")


def main(argv: Sequence[str] | None = None) -> int:
    from llava_sculpt.atomic import write_json_if_changed
    from llava_sculpt.model.load import DTYPES

    p = argparse.ArgumentParser(prog="llava-sculpt text-loss", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model-path", required=True, help="run / checkpoint dir (adapter) or HF LLaVA checkpoint")
    p.add_argument("--model-base", default=None, help="base checkpoint of an adapter (default: the one it records)")
    p.add_argument("--eval-dir", default=None, help="writes EVAL_DIR/scores/textloss.json (default MODEL_PATH/eval)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens per chunk, BOS included (default 256)")
    p.add_argument("--max-chunks", type=int, default=0, help="score only the text's first N chunks (default 0 = "
                   "all, ~14k tokens with SmolLM2's tokenizer); results are compared only at the same N")
    p.add_argument("--dtype", choices=("auto", *sorted(DTYPES)), default="auto", help="auto: float16 on GPU, float32 on CPU")
    p.add_argument("--reference", default=None, metavar="REF_JSON", help="another model's textloss.json: adds the difference")
    p.add_argument("--overwrite", action="store_true", help="replace a textloss.json of another model or settings")
    args = p.parse_args(argv)
    from llava_sculpt.eval.generate import load_model, model_identity, resolve_dtype

    identity = model_identity(args.model_path, args.model_base)
    eval_dir = args.eval_dir or os.path.join(args.model_path, "eval")
    out = os.path.join(eval_dir, "scores", "textloss.json")
    check_eval_dir(eval_dir, identity)
    dtype = str(resolve_dtype(args.dtype)).replace("torch.", "")
    text, _, _ = held_out_text()
    wanted = {**identity, "dtype": dtype, "max_tokens": args.max_tokens, "max_chunks": args.max_chunks,
              "text_sha256": sha256_text(text),
              "python_version": platform.python_version()}
    existing = _read_json(out, "text-loss result")
    differs = [k for k in wanted if existing is not None and _field(existing, k) != wanted[k]]
    if differs and not args.overwrite:
        raise UserError(f"{out} holds a text loss of another model or settings ({', '.join(differs)} differ); pass "
                        "--overwrite to replace it, or choose another --eval-dir.")
    reference = _read_json(args.reference, "--reference") if args.reference else None
    if args.reference and reference is None:
        raise UserError(f"--reference {args.reference} does not exist.")
    if existing is not None and not differs:
        result = {k: v for k, v in existing.items() if not k.startswith(("reference", "delta"))}
    else:
        model, processor = load_model(args.model_path, args.model_base, args.dtype)
        result = {**text_loss(model, processor.tokenizer, args.max_tokens, max_chunks=args.max_chunks), **identity,
                  "dtype": dtype}
    if reference is not None:
        delta = compare(result, reference, out, f"--reference {args.reference}")
        result.update(reference=os.path.abspath(args.reference), reference_nll_per_token=reference["nll_per_token"],
                      delta_nll_per_token=delta)
    write_json_if_changed(out, result)
    extra = f", {result['delta_nll_per_token']:+.4f} vs the reference" if reference is not None else ""
    print(f"text loss: {result['nll_per_token']:.4f} nats/token (perplexity {result['perplexity']:.2f}; "
          f"{result['num_tokens_scored']} tokens, {result['num_chunks']} chunks{extra}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
