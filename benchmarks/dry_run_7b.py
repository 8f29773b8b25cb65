"""One end-to-end pass of the command-line tools at LLaVA-1.5-7B's exact configuration, on CPU: wall time and
peak RSS of every stage, each stage in its own process.  No download: random weights built from a config.

    python benchmarks/dry_run_7b.py [--config 7b|tiny] [--workdir DIR] [--keep] [--stages S1,S2,...]
                                    [--with-image] [--json-out playground/bench/dry_run_7b.json]

Model (--config 7b): Vicuna-7B's Llama (hidden 4096, MLP 11008, 32 layers, 32 heads, vocab 32064 as LLaVA-HF
pads it), CLIP ViT-L/14-336 tower (hidden 1024, MLP 4096, 24 layers, 16 heads, 336 px, patch 14 -> 576 image
tokens, feature layer -2), `mlp2x_gelu` projector: 7.06e9 parameters, bfloat16.  `--config tiny` has the same
structure at toy size (what tests/test_dry_run_7b.py runs).  The tokenizer is the tiny model's byte-level BPE
(llava_sculpt/model/tiny.py) with a 1024-token vocabulary; the embedding keeps the config's rows.

Stages (each `python -m llava_sculpt.cli ...` in a child process, except `build`):
    build             build the base in bfloat16 (never a float32 copy: `_from_config(dtype=bfloat16)` allocates
                      and initialises every tensor in bf16) and save it with its processor, plus the data files
    train             llava-sculpt train --method sculpt, 2 optimizer steps of 2 text-only samples each, r = 32,
                      --sculpt_step 1 (pruning after step 1; the CMR at both steps), --bf16 True --use_cpu True;
                      saving the run is part of it
    train-image       (--with-image) the same, 1 step of 1 image sample (576 image tokens + the text)
    merge             llava-sculpt merge --dtype bfloat16
    transform-dare    llava-sculpt transform dare (dtype auto = the run's bfloat16)
    transform-tailor  llava-sculpt transform tailor --tailor_samples 4, tailoring the last --tailor-layers 2
                      decoder layers (the others W0 + s B A): its peak memory is one layer's, the same for any
                      number of layers, while its time is ~4 min a layer at 7B's width on 2 cores (float64
                      Cholesky factorisations of 11008 x 11008 and the column-by-column OBS update), ~2 h for
                      all 32; the table extrapolates that time from the layers it did
    sparse-export     llava-sculpt sparse-adapter pack RUN
    generate          llava-sculpt generate, 4 new tokens for 2 questions (the second with an image under
                      --with-image), from the run (base + adapter), --dtype bfloat16
A stage's prerequisites run too when --stages leaves them out (build <- train <- the rest).  Each merged
checkpoint (merge, DARE, Tailor: a whole model each) is deleted as soon as its stage is measured, unless --keep.

Peak RSS: the child's ru_maxrss from wait4 (kernel-exact; for a process that maps a checkpoint it includes the
file's pages that are mapped, which the kernel can drop under pressure), plus the peak of its anonymous
resident memory (RssAnon, /proc/PID/status sampled every 0.2 s: what must really fit in RAM).  The estimate
column is the README's ("Performance"/transform section) for DARE and Model Tailor at 7B: bf16 model + float32
LoRA adapter + one layer's temporaries, 15.4e9 and 18.8e9 bytes; it is computed from the config by the same
formula (`estimates`), so at other sizes it is the README's formula scaled, where the process's own ~0.5-1 GB
of libraries dominates and MISS says nothing.  MISS = peak RSS above the estimate by more than 10%.

Disk: the base (2 bytes per parameter) + one merged model at a time (+ all three with --keep) + 10%; checked
with shutil.disk_usage before anything is written.  Everything goes into a fresh folder inside --workdir, which
is removed in a `finally` (also after Ctrl-C or SIGTERM; the running stage is stopped first) unless --keep.
Not part of `make test` at 7B (measured 2026-12-03 on 2 cores: 26.4 min with --with-image, peak RSS 21.9 GiB in
train-image and 17.3 GiB elsewhere, ~30 GB of disk at once, ~57 GB written in all; README "Performance"); tests
run --config tiny.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_common.py; inherited by every stage

STAGES = ("build", "train", "train-image", "merge", "transform-dare", "transform-tailor", "sparse-export",
          "generate")
NEEDS = {"train": "build", "train-image": "build", "merge": "train", "transform-dare": "train",
         "transform-tailor": "train", "sparse-export": "train", "generate": "train"}
MERGED_OUTPUTS = {"merge": "merged", "transform-dare": "dare", "transform-tailor": "tailor"}
RANK = 32
TOKENIZER_VOCAB = 1024
VOCAB_MULTIPLE = 64  # LLaVA-HF pads Vicuna's 32002 rows to 32064
MISS_FACTOR = 1.10
DARE_TEMP_COPIES = 5.5  # README: DARE's temporaries "about 1e9 (a few float32 copies of down_proj, 0.18e9 each)"

# text config, vision config, the README's estimates apply (7b only)
CONFIGS = {
    "7b": dict(text=dict(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32064, max_positions=4096),
               vision=dict(hidden=1024, intermediate=4096, layers=24, heads=16, image=336, patch=14,
                           projection=768)),
    "tiny": dict(text=dict(hidden=64, intermediate=172, layers=2, heads=4, vocab=None, max_positions=2048),
                 vision=dict(hidden=32, intermediate=128, layers=2, heads=4, image=56, patch=14, projection=32)),
}


class Interrupted(Exception):
    """SIGTERM, turned into an exception so that the `finally` cleaning the work folder runs."""


def config_sizes(name: str, layers: int | None = None, vision_layers: int | None = None) -> dict:
    cfg = json.loads(json.dumps(CONFIGS[name]))
    if layers:
        cfg["text"]["layers"] = layers
    if vision_layers:
        cfg["vision"]["layers"] = vision_layers
    if cfg["text"]["vocab"] is None:  # the tokenizer's size rounded up like LLaVA-HF's padding
        cfg["text"]["vocab"] = -(-(TOKENIZER_VOCAB + 1) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return cfg


def parameter_count(cfg: dict) -> dict:
    """Parameters of the LLaVA built from `cfg`, by hand (tests compare it with the built model)."""
    t, v = cfg["text"], cfg["vision"]
    h, i, n = t["hidden"], t["intermediate"], t["layers"]
    lm = 2 * t["vocab"] * h + n * (4 * h * h + 3 * h * i + 2 * h) + h  # embed + head, attn + MLP + 2 norms, final norm
    vh, vi = v["hidden"], v["intermediate"]
    patches = (v["image"] // v["patch"]) ** 2
    tower = (3 * vh * v["patch"] ** 2 + vh + (patches + 1) * vh + 2 * vh  # patch conv, CLS, positions, pre-norm
             + v["layers"] * (4 * (vh * vh + vh) + 2 * vh * vi + vi + vh + 4 * vh) + 2 * vh)  # layers, post-norm
    projector = vh * h + h + h * h + h
    lora = n * RANK * (4 * 2 * h + 3 * (h + i))  # q,k,v,o: r (h + h); gate, up, down: r (h + i)
    return {"total": lm + tower + projector, "language_model": lm, "vision_tower": tower, "projector": projector,
            "lora": lora, "image_tokens": patches}


def estimates(cfg: dict) -> dict[str, float]:
    """The README's peak-memory estimates of the post-training transforms: the bf16 model (2 bytes a parameter)
    + the float32 LoRA adapter + one layer's temporaries (DARE: ~5.5 float32 copies of down_proj; Model Tailor:
    down_proj's float64 Hessian I^2 and three more of that size in its Cholesky factorisations, and its float64
    W_ft).  LLaVA-1.5-7B: 15.4e9 and 18.8e9 bytes."""
    count = parameter_count(cfg)
    h, i = cfg["text"]["hidden"], cfg["text"]["intermediate"]
    base = 2 * count["total"] + 4 * count["lora"]
    return {"transform-dare": base + DARE_TEMP_COPIES * 4 * h * i,
            "transform-tailor": base + 4 * 8 * i * i + 8 * h * i}


def verdict(peak: float | None, estimate: float | None) -> str:
    if estimate is None or peak is None:
        return ""
    return "MISS" if peak > MISS_FACTOR * estimate else "OK"


def disk_needed(cfg: dict, keep: bool) -> int:
    model = 2 * parameter_count(cfg)["total"]
    return int(1.1 * model * (2 + (2 if keep else 0))) + (1 << 30)


# ---------------------------------------------------------------------------------------------------- build
def llava_config(cfg: dict, tokenizer):
    """The LlavaConfig of `cfg` (config_sizes) with the tokenizer's special ids; LLaVA-1.5-7B's at --config 7b."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from llava_sculpt.model.tiny import IMAGE_TOKEN

    t, v = cfg["text"], cfg["vision"]
    vision = CLIPVisionConfig(hidden_size=v["hidden"], intermediate_size=v["intermediate"],
                              num_hidden_layers=v["layers"], num_attention_heads=v["heads"], image_size=v["image"],
                              patch_size=v["patch"], projection_dim=v["projection"])
    text = LlamaConfig(vocab_size=t["vocab"], hidden_size=t["hidden"], intermediate_size=t["intermediate"],
                       num_hidden_layers=t["layers"], num_attention_heads=t["heads"], num_key_value_heads=t["heads"],
                       max_position_embeddings=t["max_positions"], rms_norm_eps=1e-5,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids(
        IMAGE_TOKEN), image_seq_length=(v["image"] // v["patch"]) ** 2, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default")
    config.pad_token_id = tokenizer.pad_token_id
    return config


def build_base(args) -> int:
    """The `build` stage (its own process): base checkpoint + processor in WORK/base, data in WORK/data."""
    import torch
    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor

    from llava_sculpt.atomic import write_json_atomic
    from llava_sculpt.model.tiny import IMAGE_TOKEN, TinyShape, build_tokenizer, draw_shape

    cfg = config_sizes(args.config, args.layers, args.vision_layers)
    v = cfg["vision"]
    work = args.build_base
    tokenizer = build_tokenizer(0, shape=TinyShape(vocab_size=TOKENIZER_VOCAB))
    config = llava_config(cfg, tokenizer)
    n_image = config.image_seq_length
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    for gen_field in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, gen_field, getattr(tokenizer, gen_field))
    params = sum(p.numel() for p in model.parameters())
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    model.save_pretrained(os.path.join(work, "base"))
    del model
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": v["image"]},
                                              crop_size={"height": v["image"], "width": v["image"]}),
        tokenizer=tokenizer, patch_size=v["patch"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1)
    processor.save_pretrained(os.path.join(work, "base"))

    data = os.path.join(work, "data")
    os.makedirs(os.path.join(data, "images"), exist_ok=True)
    draw_shape("red", "circle", (v["image"], v["image"])).save(os.path.join(data, "images", "red.png"))
    colours = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
    text_samples = [{"id": f"text-{k}", "conversations": [
        {"from": "human", "value": f"What colour is {c} paint?"},
        {"from": "gpt", "value": c}]} for k, c in enumerate(colours)]
    write_json_atomic(os.path.join(data, "train.json"), text_samples, indent=1)
    write_json_atomic(os.path.join(data, "train_image.json"), [{"id": "image-0", "image": "red.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is the shape?\nAnswer the question using a single word or "
                                   "phrase."}, {"from": "gpt", "value": "red"}]}], indent=1)
    questions = [{"question_id": 0, "text": "What colour is blue paint?"},
                 ({"question_id": 1, "image": "red.png", "text": "What colour is the shape?"} if args.with_image
                  else {"question_id": 1, "text": "What colour is green paint?"})]
    with open(os.path.join(data, "questions.jsonl"), "w") as f:
        f.write("".join(json.dumps(q) + "\n" for q in questions))
    from llava_sculpt.data.conversation import conversations_to_turns, get_template, tokenize_conversation

    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    tokens = [len(tokenize_conversation(tokenizer, get_template("vicuna_v1"), conversations_to_turns(
        s["conversations"], s["id"]), n_image, image_id, 2048)["input_ids"]) for s in text_samples]
    print(json.dumps({"parameters": params, "dtypes": dtypes, "text_tokens": tokens,
                      "image_tokens": n_image}))
    return 0


# ---------------------------------------------------------------------------------------------------- stages
def stage_commands(stage: str, work: str, args) -> list[str]:
    cli = [sys.executable, "-m", "llava_sculpt.cli"]
    base, data, run = (os.path.join(work, "base"), os.path.join(work, "data"), os.path.join(work, "run"))
    if stage == "build":
        extra = [f"--layers={args.layers}"] if args.layers else []
        extra += [f"--vision-layers={args.vision_layers}"] if args.vision_layers else []
        return [sys.executable, os.path.abspath(__file__), "--config", args.config, "--build-base", work, *extra,
                *(["--with-image"] if args.with_image else [])]
    if stage in ("train", "train-image"):
        image = stage == "train-image"
        return [*cli, "train", "--method", "sculpt", "--model_name_or_path", base,
                "--data_path", os.path.join(data, "train_image.json" if image else "train.json"),
                "--image_folder", os.path.join(data, "images"), "--output_dir", run + ("-image" if image else ""),
                "--max_steps", "1" if image else "2", "--per_device_train_batch_size", "1" if image else "2",
                "--gradient_accumulation_steps", "1", "--learning_rate", "2e-4", "--mm_projector_lr", "2e-5",
                "--lora_r", str(RANK), "--lora_alpha", str(2 * RANK), "--lora_dropout", "0.05",
                "--sculpt_step", "1", "--bf16", "True", "--use_cpu", "True", "--model_max_length", "2048",
                "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--seed", "0",
                "--dataloader_num_workers", "0", "--disable_tqdm", "true"]
    if stage == "merge":
        return [*cli, "merge", "--model-path", run, "--output-dir", os.path.join(work, "merged"), "--dtype", "bfloat16"]
    if stage == "transform-dare":
        return [*cli, "transform", "dare", "--model-path", run, "--output-dir", os.path.join(work, "dare"),
                "--device", "cpu"]
    if stage == "transform-tailor":
        return [*cli, "transform", "tailor", "--model-path", run, "--output-dir", os.path.join(work, "tailor"),
                "--device", "cpu", "--tailor_samples", "4", "--tailor_first_layer", str(tailor_first_layer(args))]
    if stage == "sparse-export":
        return [*cli, "sparse-adapter", "pack", run]
    if stage == "generate":
        return [*cli, "generate", "--model-path", run, "--question-file", os.path.join(data, "questions.jsonl"),
                "--image-folder", os.path.join(data, "images"), "--answers-file", os.path.join(work, "answers.jsonl"),
                "--max_new_tokens", "4", "--batch-size", "2", "--dtype", "bfloat16", "--device", "cpu",
                "--no-progress"]
    raise ValueError(stage)


def tailor_first_layer(args) -> int:
    layers = config_sizes(args.config, args.layers, args.vision_layers)["text"]["layers"]
    return max(0, layers - args.tailor_layers) if args.tailor_layers else 0


def stage_output(stage: str, work: str) -> str | None:
    return {"build": os.path.join(work, "base"), "train": os.path.join(work, "run"),
            "train-image": os.path.join(work, "run-image"), "merge": os.path.join(work, "merged"),
            "transform-dare": os.path.join(work, "dare"), "transform-tailor": os.path.join(work, "tailor"),
            "sparse-export": os.path.join(work, "run", "adapter_sparse.safetensors"),
            "generate": os.path.join(work, "answers.jsonl")}.get(stage)


def disk_bytes(path: str | None) -> int | None:
    if not path or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _status_kib(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return out


class Child:
    """One stage's process: its wall time, its ru_maxrss (wait4) and the sampled peak of its RssAnon."""

    def __init__(self, cmd: list[str], log_path: str, env: dict, cwd: str):
        self.log = open(log_path, "w")
        self.start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self.peak_anon_kib = 0
        self.timed_out = False
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        while not self._done.is_set():
            anon = _status_kib(self.proc.pid).get("RssAnon", 0)
            self.peak_anon_kib = max(self.peak_anon_kib, anon)
            self._done.wait(0.2)

    def wait(self, timeout: float | None) -> tuple[int, float, int]:
        """(returncode, wall seconds, ru_maxrss bytes); a stage past `timeout` is killed (returncode -9,
        self.timed_out)."""
        deadline = None if timeout is None else self.start + timeout
        while True:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                self.timed_out = True
                self.proc.kill()
                pid, status, usage = os.wait4(self.proc.pid, 0)
                break
            time.sleep(0.1)
        self.proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        wall = time.perf_counter() - self.start
        self._done.set()
        self._sampler.join()
        self.log.close()
        return self.proc.returncode, wall, usage.ru_maxrss * 1024

    def stop(self) -> None:
        """After Ctrl-C / SIGTERM: terminate the stage (kill it after 10 s) and reap it."""
        if self.proc.returncode is None:
            try:
                self.proc.terminate()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            except (ProcessLookupError, ChildProcessError):
                pass
        self._done.set()
        if not self.log.closed:
            self.log.close()


def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def selected_stages(spec: str | None, with_image: bool) -> tuple[list[str], set[str]]:
    """(the stages to run in order, those asked for); prerequisites are added."""
    from llava_sculpt.errors import UserError

    if spec:
        asked = [s.strip() for s in spec.split(",") if s.strip()]
        unknown = [s for s in asked if s not in STAGES]
        if unknown or not asked:
            raise UserError(f"--stages {spec!r}: unknown stage(s) {', '.join(unknown) or '(none given)'}; "
                            f"expected a comma-separated subset of {', '.join(STAGES)}")
    else:
        asked = [s for s in STAGES if with_image or s != "train-image"]
    wanted = set(asked)
    for stage in list(wanted):
        while stage in NEEDS:
            stage = NEEDS[stage]
            wanted.add(stage)
    return [s for s in STAGES if s in wanted], set(asked)


def tailor_extrapolation(doc: dict, layers: int, tailored: int) -> dict:
    """Model Tailor's time per tailored layer, approximately (its wall time minus DARE's, which loads, merges and
    saves the same model, over the tailored layers), and the stage's time with every layer tailored."""
    rows = {s["stage"]: s for s in doc["stages"] if s["returncode"] == 0}
    out = {"layers_tailored": tailored, "layers": layers, "s_per_layer_approx": None, "all_layers_s_approx": None}
    if "transform-tailor" in rows and "transform-dare" in rows and tailored:
        per_layer = max(0.0, rows["transform-tailor"]["wall_s"] - rows["transform-dare"]["wall_s"]) / tailored
        out.update(s_per_layer_approx=per_layer,
                   all_layers_s_approx=rows["transform-dare"]["wall_s"] + per_layer * layers)
    return out


def _size(value) -> str:
    """Bytes as GiB with two decimals, or MiB / KiB below 0.1 GiB / 0.1 MiB (the tiny configuration)."""
    if value is None:
        return "-"
    for unit, scale in (("G", 2 ** 30), ("M", 2 ** 20), ("K", 2 ** 10)):
        if value >= 0.1 * scale or unit == "K":
            return f"{value / scale:.2f}{unit}"


def print_table(doc: dict) -> None:
    c = doc["model"]
    t, v = c["text"], c["vision"]
    print(f"\ndry run, config {doc['config']}: {c['parameters']:.4g} parameters ({t['layers']} LM layers "
          f"{t['hidden']}/{t['intermediate']}, vision {v['layers']}x{v['hidden']}), "
          f"bfloat16, {doc['machine']['cpus']} CPUs, {_size(doc['machine']['mem_total'])} RAM")
    print(f"{'stage':<17} {'wall s':>8} {'peak RSS':>9} {'anon':>9} {'estimate':>9} {'disk':>9}  result")
    for s in doc["stages"]:
        result = (s["verdict"] if s["returncode"] == 0 else "INTERRUPTED" if s.get("interrupted") else
                  "SKIPPED" if s["returncode"] is None else "FAILED (--stage-timeout)" if s.get("timed_out") else
                  f"FAILED (exit {s['returncode']})")
        wall = "-" if s["wall_s"] is None else f"{s['wall_s']:.1f}"
        print(f"{s['stage']:<17} {wall:>8} {_size(s['peak_rss_bytes']):>9} {_size(s['peak_anon_bytes']):>9} "
              f"{_size(s['estimate_bytes']):>9} {_size(s['output_bytes']):>9}  {result}"
              + ("" if s["asked"] else "  (prerequisite)"))
    tl = doc.get("tailor") or {}
    if tl.get("s_per_layer_approx") is not None:
        print(f"Model Tailor tailored {tl['layers_tailored']} of {tl['layers']} decoder layers: "
              f"~{tl['s_per_layer_approx']:.0f} s a layer (its time minus DARE's), so "
              f"~{tl['all_layers_s_approx'] / 60:.0f} min with all of them")
    print(f"total {doc['total_wall_s']:.0f} s; work folder {doc['workdir']} "
          f"{'kept' if doc['kept'] else 'removed' if doc['workdir_removed'] else 'NOT removed'}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=sorted(CONFIGS), default="7b",
                   help="7b: LLaVA-1.5-7B's exact shapes; tiny: the same structure at toy size (tests)")
    p.add_argument("--workdir", default=os.path.join(ROOT, "playground", "bench"),
                   help="a fresh folder dry_run_7b-* is made in here and removed at the end (needs ~30 GB at 7B)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (and every merged checkpoint)")
    p.add_argument("--stages", default=None, help=f"comma-separated subset of {','.join(STAGES)} "
                   "(prerequisites are added); default: all but train-image")
    p.add_argument("--with-image", action="store_true",
                   help="also train-image (1 step on one image sample) and an image question in generate")
    p.add_argument("--json-out", default=os.path.join(ROOT, "playground", "bench", "dry_run_7b.json"))
    p.add_argument("--layers", type=int, default=None, help="override the LM's layer count (a short probe "
                   "of memory accounting at full width, e.g. --layers 2 --vision-layers 2)")
    p.add_argument("--vision-layers", type=int, default=None, help="override the vision tower's layer count")
    p.add_argument("--tailor-layers", type=int, default=2,
                   help="Model Tailor tailors the last N decoder layers (--tailor_first_layer = layers - N), the "
                   "others get W0 + s B A; 0 = all (~4 min a layer at 7B's width on 2 cores: ~2 h for 32)")
    p.add_argument("--stage-timeout", type=float, default=3600, help="seconds before a stage is killed")
    p.add_argument("--build-base", default=None, help=argparse.SUPPRESS)  # internal: the build stage's child
    return p.parse_args(argv)


def main(argv=None) -> int:
    from llava_sculpt.atomic import write_json_atomic
    from llava_sculpt.errors import UserError

    args = parse_args(argv)
    for flag in ("layers", "vision_layers", "stage_timeout", "tailor_layers"):
        value = getattr(args, flag)
        if value is not None and (value < 0 or (value == 0 and flag != "tailor_layers")):
            raise UserError(f"--{flag.replace('_', '-')} {value}: expected a "
                            f"{'number >= 0' if flag == 'tailor_layers' else 'positive number'}")
    if args.build_base:
        return build_base(args)
    order, asked = selected_stages(args.stages, args.with_image)
    cfg = config_sizes(args.config, args.layers, args.vision_layers)
    count = parameter_count(cfg)
    est = estimates(cfg)
    os.makedirs(args.workdir, exist_ok=True)
    needed = disk_needed(cfg, args.keep)
    free = shutil.disk_usage(args.workdir).free
    if free < needed:
        raise UserError(f"--workdir {args.workdir}: {free / 1e9:.1f} GB free, the dry run needs {needed / 1e9:.1f} GB "
                        f"(the base + {'three merged models' if args.keep else 'one merged model at a time'}, + 10%); "
                        "free some space or point --workdir at a larger disk")
    with open("/proc/meminfo") as f:
        mem_total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal"))
    work = tempfile.mkdtemp(prefix="dry_run_7b-", dir=os.path.abspath(args.workdir))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")
    doc = {"config": args.config, "model": {"parameters": count["total"], "bytes_bf16": 2 * count["total"],
                                             "lora_parameters": count["lora"], **cfg},
           "machine": {"cpus": os.cpu_count(), "mem_total": mem_total, "disk_free": free, "disk_needed": needed},
           "workdir": work, "kept": args.keep, "workdir_removed": False, "stages": [], "interrupted": False}
    start = time.perf_counter()
    child = None

    def on_sigterm(signum, frame):
        raise Interrupted()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    failed: set[str] = set()
    try:
        for stage in order:
            row = {"stage": stage, "asked": stage in asked, "command": None, "returncode": None, "wall_s": None,
                   "peak_rss_bytes": None, "peak_anon_bytes": None, "estimate_bytes": est.get(stage),
                   "verdict": "", "output_bytes": None, "log_tail": None}
            doc["stages"].append(row)
            if NEEDS.get(stage) in failed:
                failed.add(stage)
                continue
            cmd = stage_commands(stage, work, args)
            row["command"] = cmd
            print(f"[dry run] {stage}: {' '.join(cmd[1:])}", flush=True)
            child = Child(cmd, os.path.join(work, f"{stage}.log"), env, work)
            code, wall, peak = child.wait(args.stage_timeout)
            row.update(returncode=code, wall_s=wall, peak_rss_bytes=peak, peak_anon_bytes=child.peak_anon_kib * 1024,
                       output_bytes=disk_bytes(stage_output(stage, work)), timed_out=child.timed_out)
            child = None
            row["verdict"] = verdict(row["peak_rss_bytes"], row["estimate_bytes"])
            if stage == "build" and code == 0:
                try:
                    doc["model"]["built"] = json.loads(_tail(os.path.join(work, "build.log"), 1))
                except json.JSONDecodeError:
                    pass
            if stage == "generate" and code == 0:
                with open(os.path.join(work, "answers.jsonl")) as f:
                    doc["answers"] = [json.loads(line)["text"] for line in f]
            if code != 0:
                failed.add(stage)
                row["log_tail"] = _tail(os.path.join(work, f"{stage}.log"))
                why = f"killed after --stage-timeout {args.stage_timeout:g} s" if row["timed_out"] else f"exit {code}"
                print(f"[dry run] {stage} FAILED ({why}); last lines of its log:\n{row['log_tail']}", flush=True)
            if stage in MERGED_OUTPUTS and not args.keep:
                shutil.rmtree(os.path.join(work, MERGED_OUTPUTS[stage]), ignore_errors=True)
    except (KeyboardInterrupt, Interrupted):
        doc["interrupted"] = True
        if child is not None and doc["stages"]:
            doc["stages"][-1]["interrupted"] = True
        print("\n[dry run] interrupted: stopping the stage and removing the work folder", flush=True)
    finally:
        if child is not None:
            child.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            doc["workdir_removed"] = not os.path.exists(work)
        signal.signal(signal.SIGTERM, previous)
    doc["total_wall_s"] = time.perf_counter() - start
    doc["tailor"] = tailor_extrapolation(doc, cfg["text"]["layers"], cfg["text"]["layers"] - tailor_first_layer(args))
    print_table(doc)
    if args.json_out:
        write_json_atomic(args.json_out, doc, indent=1)
        print(f"written: {args.json_out}")
    return 1 if failed or doc["interrupted"] else 0


if __name__ == "__main__":
    from llava_sculpt.errors import run_cli

    sys.exit(run_cli(main))
