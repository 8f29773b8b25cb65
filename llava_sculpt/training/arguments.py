"""The flags of `llava-sculpt train`: LLaVA-1.5's fine-tuning flags (same names and meanings), every Hugging
Face `TrainingArguments` flag, and `--method` with each method's own flags; parsing them into dataclasses."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Sequence

import torch
import transformers

from llava_sculpt.errors import UserError
from llava_sculpt.methods import METHODS, get_method_class


# --connector values (paper Table 2).  full and frozen: every method but LLaVA's stage 1 (which trains the projector
# alone: full only).  lora and sculpt: the methods below (see `resolve_connector` for why the others are refused).
CONNECTORS = ("full", "lora", "frozen", "sculpt")
CONNECTOR_METHODS = {"lora": ("lora", "dora", "l2", "orth"), "sculpt": ("sculpt",)}
# why --connector lora is refused, per method (every method not in CONNECTOR_METHODS["lora"] has an entry)
_NO_LORA_CONNECTOR = {
    "sculpt": "has its own connector variant: --connector sculpt (LoRA on the projector with the L1 CMR of "
              "Eq. 10-11) or full",
    "dare": "drops and rescales the fully trained projector's delta after training; use --connector full or frozen",
    "tailor": "resets the fully trained projector after training; use --connector full or frozen",
    "intruders": "transforms the language model's LoRA layers only after training; use --connector full or frozen",
    "asymlora": "routes among LoRA experts in the language model's MLPs, not a plain LoRA adapter the projector "
                "could share; use --connector full or frozen",
    "full": "trains without LoRA; use --connector full or frozen",
    "spider": "trains without LoRA; use --connector full or frozen",
    "magnitude_mask": "trains without LoRA; use --connector full or frozen",
}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default=None, metadata={"help": "local Hugging Face LLaVA-1.5 checkpoint "
                                    "(e.g. llava-1.5-7b-hf); original LLaVA checkpoints: `llava-sculpt convert` first"})
    version: str = field(default="v1", metadata={"help": "conversation template: v1 / vicuna_v1 (LLaVA-1.5 "
                         "fine-tuning), plain (LLaVA's stage-1 pretraining: <image> + caption + newline)"})
    vision_tower: str | None = field(default=None, metadata={"help": "LLaVA flag; the HF checkpoint contains its "
                                     "tower, so this is only checked against it (patch size / image size)"})
    mm_projector_type: str = field(default="mlp2x_gelu", metadata={"help": "LLaVA flag; HF LLaVA-1.5 has the "
                                   "2-layer GELU projector, so only mlp2x_gelu is accepted"})
    mm_vision_select_layer: int | None = field(default=None, metadata={"help": "LLaVA flag; checked against "
                                               "the checkpoint's vision_feature_layer (-2 for LLaVA-1.5)"})
    mm_use_im_start_end: bool = field(default=False, metadata={"help": "LLaVA flag; must be False (LLaVA-1.5)"})
    mm_use_im_patch_token: bool = field(default=False, metadata={"help": "LLaVA flag; must be False (LLaVA-1.5)"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa (portable default), "
                                     "flash_attention_2 (GPU, needs flash-attn; LLaVA's train_mem.py) or eager",
                                     "choices": ["sdpa", "flash_attention_2", "eager"]})
    method: str = field(default="lora", metadata={"help": f"fine-tuning method: {', '.join(sorted(METHODS))}; "
                        "projector = LLaVA's stage 1 (--tune_mm_mlp_adapter True). Not given: lora, or full with "
                        "--lora_enable False, or projector with --tune_mm_mlp_adapter True"})
    mm_vision_select_feature: str = field(default="patch", metadata={"help": "LLaVA flag; patch (LLaVA-1.5: the "
                                          "CLS token dropped) is checked against the checkpoint's "
                                          "vision_feature_select_strategy (default = patch, full = cls_patch)",
                                          "choices": ["patch", "cls_patch"]})
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "LLaVA flag: a projector from "
                                                "LLaVA's pretraining stage (mm_projector.bin with keys "
                                                "model.mm_projector.0/2.*, or a mm_projector.safetensors) loaded "
                                                "into the projector before training"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "LLaVA flag: True is LLaVA's stage-1 "
                                      "pretraining (pretrain.sh, with --version plain): only the projector trains, no "
                                      "LoRA (= --method projector); writes mm_projector.bin with LLaVA's keys. LoRA "
                                      "flags and other --method values are refused with it"})
    freeze_backbone: bool = field(default=False, metadata={"help": "LLaVA flag: the LoRA methods keep the language "
                                  "model's own weights frozen (LoRA trains beside them) either way; --method full "
                                  "refuses True"})


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={"help": "LLaVA training JSON (list of {id, image, conversations})"})
    image_folder: str | None = field(default=None, metadata={"help": "folder the 'image' paths are relative to"})
    image_aspect_ratio: str = field(default="pad", metadata={"help": "pad: pad to a square with the processor's "
                                    "mean colour first (LLaVA-1.5's finetune.sh); square: resize/crop as the "
                                    "processor does (the default of stage 1, --tune_mm_mlp_adapter True, as LLaVA's "
                                    "pretrain.sh)",
                                    "choices": ["pad", "square"]})
    lazy_preprocess: bool = field(default=True, metadata={"help": "LLaVA flag; samples are always tokenised lazily"})
    is_multimodal: bool = field(default=True, metadata={"help": "LLaVA flag, kept for compatibility"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=2048, metadata={"help": "truncate sequences (image tokens included) "
                                  "to this many tokens"})
    lora_enable: bool = field(default=True, metadata={"help": "LLaVA flag; the LoRA methods need True; False "
                              "without --method = --method full (LLaVA's full fine-tuning); --method full / spider "
                              "/ magnitude_mask train without LoRA and accept either"})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank (LLaVA default 64; the paper uses 16/32/64)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (LLaVA default 16; the paper uses 2r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_bias: str = field(default="none", metadata={"help": "none | all | lora_only"})
    lora_weight_path: str | None = field(default=None, metadata={"help": "continue from an earlier adapter "
                                         "(a run or checkpoint directory); its projector is loaded too"})
    mm_projector_lr: float | None = field(default=None, metadata={"help": "learning rate of the projector "
                                          "(default: --learning_rate)"})
    mm_projector_lora_lr: float | None = field(default=None, metadata={"help": "learning rate of LoRA adapters ON "
                                               "the projector (--connector lora or sculpt; default: "
                                               "--learning_rate, like every other LoRA factor — --mm_projector_lr is "
                                               "the rate of the fully fine-tuned projector and does not apply)"})
    freeze_mm_mlp_adapter: bool = field(default=False, metadata={"help": "LLaVA flag: keep the projector frozen "
                                        "(True = --connector frozen)"})
    connector: str | None = field(default=None, metadata={"help": "how the projector (the connector) is trained, "
                                  "the paper's Table 2: full (fully fine-tuned at --mm_projector_lr; the default, "
                                  "LLaVA-1.5's), lora (LoRA on its two linears with the language model's --lora_r / "
                                  "--lora_alpha / --lora_dropout, at --mm_projector_lora_lr, its own weights frozen; "
                                  f"--method {', '.join(CONNECTOR_METHODS['lora'])}), frozen (not trained; = "
                                  "--freeze_mm_mlp_adapter True) or sculpt (--method sculpt: LoRA with the connector "
                                  "CMR of Eq. 10-11; = --sculpt_connector True)", "choices": list(CONNECTORS)})
    bits: int = field(default=16, metadata={"help": "16, or 8/4 for a bitsandbytes-quantised base (QLoRA)",
                                            "choices": [16, 8, 4]})
    double_quant: bool = field(default=True, metadata={"help": "4-bit: quantise the quantisation constants"})
    quant_type: str = field(default="nf4", metadata={"help": "4-bit type: nf4 or fp4"})
    group_by_modality_length: bool = field(default=False, metadata={"help": "batches of only image or only "
                                           "text samples, with similar lengths (LLaVA's sampler)"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "must stay False for LLaVA data"})
    warmup_ratio: float | None = field(default=None, metadata={"help": "LLaVA / transformers 4 flag: warm-up as a "
                                       "fraction of the total steps (transformers 5 takes it as a float "
                                       "--warmup_steps < 1; this sets that)"})
    loss_normalization: str = field(default="llava", metadata={"help": "how the task loss of an optimizer step is "
                                    "averaged. llava (LLaVA-1.5, transformers 4.31): each micro-batch's mean "
                                    "cross-entropy over its own label tokens, divided by "
                                    "--gradient_accumulation_steps, gradients averaged over the processes by DDP. "
                                    "global_tokens (transformers 5's default): summed cross-entropy over every "
                                    "label token of the step's accumulated micro-batches divided by their number "
                                    "(over all processes with --average_tokens_across_devices True)",
                                    "choices": ["llava", "global_tokens"]})
    init_lora_weights: str = field(default="default", metadata={"help": "initialisation of the LoRA factors "
                                   "(PEFT's): default (A Kaiming-uniform, B = 0; LLaVA-1.5), gaussian, pissa, olora "
                                   "and corda (these three change the base weights; saved adapters are converted "
                                   "to apply to the original base), eva (SVD of the training data's layer inputs). "
                                   "See llava_sculpt/methods/lora_init.py",
                                   "choices": ["default", "gaussian", "pissa", "olora", "corda", "eva"]})
    corda_data: str | None = field(default=None, metadata={"help": "--init_lora_weights corda: LLaVA training JSON "
                                   "whose layer-input covariances CorDA uses (required then): SOURCE-task samples "
                                   "(knowledge to keep) for --corda_method kpm, DOWNSTREAM-task samples (the "
                                   "task to preview) for ipm"})
    corda_image_folder: str | None = field(default=None, metadata={"help": "folder the --corda_data 'image' paths "
                                           "are relative to (default: --image_folder)"})
    corda_method: str = field(default="kpm", metadata={"help": "CorDA mode: kpm (knowledge-preserving: the adapter "
                              "takes the directions the source data uses least) or ipm (instruction-previewed: "
                              "the directions the downstream data uses most; --corda_data then holds "
                              "downstream samples)",
                              "choices": ["kpm", "ipm"]})
    corda_samples: int = field(default=256, metadata={"help": "how many --corda_data samples (the first ones) "
                               "the covariances are collected over"})
    eva_batch_size: int = field(default=0, metadata={"help": "--init_lora_weights eva: batch size of its SVD "
                                "pass (default 0 = the training batch size, raised until a batch holds the "
                                "round(2 r) label tokens PEFT's per-batch SVD needs: short answers such as "
                                "IconQA's letter give ~2 per sample)"})
    eval_benchmarks: str = field(default="", metadata={"help": "evaluation during training: comma-separated "
                                 "benchmark specs of `llava-sculpt eval` (names in eval/*.json, e.g. okvqa,gqa,iconqa, "
                                 "or spec files), scored at each --eval_every point into RUN_DIR/eval_curve.jsonl "
                                 "(default: empty = off). See llava_sculpt/eval/during_training.py"})
    eval_data_root: str | None = field(default=None, metadata={"help": "the DATA_ROOT the --eval_benchmarks specs "
                                       "resolve against (required with --eval_benchmarks)"})
    eval_max_questions: int | None = field(default=None, metadata={"help": "only the first N questions of each "
                                           "--eval_benchmarks benchmark (default: all)"})
    eval_every: str = field(default="epoch", metadata={"help": "when --eval_benchmarks are scored: 'epoch' (at each "
                            "epoch end, the default) or N (every N optimizer steps); also at the last step, and at "
                            "step 0 with --eval_on_start True. Generation batch size: --per_device_eval_batch_size"})
    eval_max_new_tokens: int | None = field(default=None, metadata={"help": "--eval_benchmarks: generation length "
                                            "(default: each spec's max_new_tokens)"})
    eval_last_step: bool = field(default=True, metadata={"help": "--eval_benchmarks: also score the last step "
                                 "(default True); False: never the last step, even when it is an --eval_every point "
                                 "(when the saved run is evaluated in full afterwards, as `demo-real` does)"})
    full_logits: bool = field(default=False, metadata={"help": "apply the LM head at every position, as "
                              "transformers does (default False: in training only at the positions whose next "
                              "token is labelled, see llava_sculpt/model/labelled_loss.py; the same loss and "
                              "gradients, less time and memory); evaluation always computes full logits"})
    progress_every: float = field(default=-1, metadata={"help": "a progress line (step, elapsed, time left) at "
                                  "most every this many seconds; 0 = none; default -1 = 60 s when the progress "
                                  "bar is off (--disable_tqdm True), none when it is shown"})

    def __post_init__(self):
        if self.warmup_ratio is not None:
            if not 0 <= self.warmup_ratio < 1:
                raise UserError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            if self.warmup_steps:
                raise UserError("pass either --warmup_ratio or --warmup_steps, not both")
            self.warmup_steps = self.warmup_ratio
        super().__post_init__()


# ---------------------------------------------------------------------------------------------- parsing


def build_parser() -> transformers.HfArgumentParser:
    method_flags = [cls.flags_class for cls in METHODS.values() if cls.flags_class is not None]
    return transformers.HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, *method_flags))


def parse_args(argv: Sequence[str] | None):
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--output_dir" not in argv and not any(a.startswith("--output_dir=") for a in argv) \
            and not any(a in ("-h", "--help") for a in argv):
        raise UserError("--output_dir is required: where the adapter, projector and checkpoints are written")
    argv = [_LLAVA_ALIASES.get(a, a) if not a.startswith(tuple(f"{k}=" for k in _LLAVA_ALIASES))
            else _LLAVA_ALIASES[a.split("=", 1)[0]] + "=" + a.split("=", 1)[1] for a in argv]
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as err:  # TrainingArguments' own consistency checks: report them without a traceback
        raise UserError(f"invalid training arguments: {err}") from None
    if remaining:
        raise UserError(unknown_flags_message(parser, remaining))
    model_args, data_args, training_args, *method_flag_values = parsed
    given = given_flags(parser, argv)
    if not has_accelerator() and "--dataloader_pin_memory" not in given:
        training_args.dataloader_pin_memory = False  # pinning needs an accelerator; torch warns every epoch
    resolve_method(model_args, training_args, given)
    if model_args.method == "projector" and "--image_aspect_ratio" not in given:
        data_args.image_aspect_ratio = "square"  # LLaVA's default, which its pretrain.sh keeps (finetune.sh: pad)
    method_cls = get_method_class(model_args.method)
    flags = next((f for f in method_flag_values if type(f) is method_cls.flags_class), None)
    sculpt_flags = next((f for f in method_flag_values if hasattr(f, "sculpt_connector")), None)
    resolve_connector(model_args.method, training_args, sculpt_flags, given)
    method = method_cls(flags)
    method.use_connector(training_args.connector)
    return model_args, data_args, training_args, method


def given_flags(parser, argv: Sequence[str]) -> set[str]:
    """The flags written on the command line (`--flag value` or `--flag=value`; an unambiguous abbreviation, which
    argparse accepts, as the full name; `--no_flag` as `--flag`)."""
    known = {o for action in parser._actions for o in action.option_strings if o.startswith("--")}
    given = set()
    for token in argv:
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        if name not in known:
            matches = [o for o in known if o.startswith(name)]
            name = matches[0] if len(matches) == 1 else name
        given.add("--" + name[len("--no_"):] if name.startswith("--no_") and "--" + name[5:] in known else name)
    return given


# Flags that only a LoRA run uses: with LLaVA's stage 1 they would be ignored, so giving one is an error
_LORA_FLAGS = ("--lora_r", "--lora_alpha", "--lora_dropout", "--lora_bias", "--lora_weight_path",
               "--mm_projector_lora_lr", "--init_lora_weights", "--corda_data", "--corda_image_folder",
               "--corda_method", "--corda_samples", "--eva_batch_size", "--double_quant", "--quant_type")


def resolve_method(model_args, training_args, given: set[str]) -> None:
    """The method when --method is not given: projector with --tune_mm_mlp_adapter True (LLaVA's stage 1; also
    --method projector sets that flag), full with --lora_enable False, else lora.  Stage 1 trains the projector
    alone: an explicit other --method, LoRA flag or method flag is refused (it would be ignored)."""
    explicit = "--method" in given
    if explicit and model_args.method == "projector":
        model_args.tune_mm_mlp_adapter = True
    if model_args.tune_mm_mlp_adapter:
        why = "--tune_mm_mlp_adapter True" if "--tune_mm_mlp_adapter" in given else "--method projector"
        stage1 = f"{why} is LLaVA's stage-1 pretraining (only the projector trains; no LoRA)"
        if explicit and model_args.method != "projector":
            raise UserError(f"{stage1}: --method {model_args.method} would be ignored; drop --method, or drop "
                            f"--tune_mm_mlp_adapter to fine-tune with --method {model_args.method}")
        ignored = [f for f in _LORA_FLAGS if f in given]
        ignored += [f"--{f.name}" for cls in METHODS.values() if cls.flags_class is not None
                    for f in dataclasses.fields(cls.flags_class) if f"--{f.name}" in given]
        if "--lora_enable" in given and training_args.lora_enable:
            ignored.insert(0, "--lora_enable True")
        if training_args.bits != 16:
            ignored.append(f"--bits {training_args.bits}")
        if ignored:
            raise UserError(f"{stage1}: {', '.join(ignored)} would be ignored; drop "
                            f"{'it' if len(ignored) == 1 else 'them'}")
        model_args.method = "projector"
    elif not explicit and not training_args.lora_enable:
        model_args.method = "full"  # LLaVA's finetune.sh with --lora_enable False


def resolve_connector(method: str, training_args, sculpt_flags, given: set[str]) -> None:
    """training_args.connector from --connector and its aliases: --freeze_mm_mlp_adapter True = frozen,
    --sculpt_connector True = sculpt (a flag of --method sculpt, `sculpt_flags`).  None of them: full.  The aliases
    are then set from the result, so a run records the same run_args.json however it was spelt.  A value the method
    does not support, or flags that contradict each other (an alias False against the value it stands for
    included), is a UserError."""
    said: list[tuple[str, str | None, str]] = []  # (flag as written, the connector it means or None, the one it denies)
    if "--connector" in given:
        said.append((f"--connector {training_args.connector}", training_args.connector, ""))
    for flag, value, alias in (("--freeze_mm_mlp_adapter", training_args.freeze_mm_mlp_adapter, "frozen"),
                               ("--sculpt_connector", getattr(sculpt_flags, "sculpt_connector", False), "sculpt")):
        if flag in given:
            said.append((f"{flag} {value}", alias if value else None, "" if value else alias))
    meant = [(text, value) for text, value, _ in said if value is not None]
    for (text_a, a), (text_b, b) in zip(meant, meant[1:]):
        if a != b:
            raise UserError(f"{text_a} and {text_b} contradict each other (--freeze_mm_mlp_adapter True = "
                            "--connector frozen, --sculpt_connector True = --connector sculpt); pass one of them")
    connector = meant[0][1] if meant else "full"
    for text, _, denied in said:
        if denied and denied == connector:
            raise UserError(f"{text} contradicts {meant[0][0]}; drop one of them")
    source = meant[0][0] if meant else "--connector full"
    if method == "projector" and connector != "full":
        what = "leaves nothing to train" if connector == "frozen" else "would put adapters on the projector it trains"
        raise UserError(f"{source} with LLaVA's stage-1 pretraining (--tune_mm_mlp_adapter True / --method projector, "
                        f"which trains only the projector, in full) {what}; drop {source.split()[0]}")
    if connector == "lora" and method not in CONNECTOR_METHODS["lora"]:
        why = _NO_LORA_CONNECTOR.get(method, "has no plain LoRA adapter the projector could share; use --connector "
                                             "full or frozen")
        raise UserError(f"{source}: LoRA on the connector is supported with --method "
                        f"{', '.join(CONNECTOR_METHODS['lora'])}; --method {method} {why}")
    if connector == "sculpt" and method not in CONNECTOR_METHODS["sculpt"]:
        other = (" (LoRA on the connector without the CMR: --connector lora)" if method in CONNECTOR_METHODS["lora"]
                 else "")
        raise UserError(f"{source} is LoRASculpt's connector variant (LoRA with the L1 CMR of Eq. 10-11): only with "
                        f"--method sculpt, not --method {method}{other}")
    training_args.connector = connector
    training_args.freeze_mm_mlp_adapter = connector == "frozen"
    if method == "sculpt" and sculpt_flags is not None:
        sculpt_flags.sculpt_connector = connector == "sculpt"


# LLaVA-1.5's scripts were written for transformers 4.31; flags renamed since, mapped to today's name
# (transformers 5 still takes --gradient_checkpointing but warns that it is deprecated)
_LLAVA_ALIASES = {"--evaluation_strategy": "--eval_strategy",
                  "--gradient_checkpointing": "--activation_checkpointing",
                  "--gradient_checkpointing_kwargs": "--activation_checkpointing_kwargs"}


def unknown_flags_message(parser, remaining: Sequence[str]) -> str:
    """Each unknown flag with the closest known one (difflib over every flag of every method)."""
    import difflib

    known = sorted({o for action in parser._actions for o in action.option_strings if o.startswith("--")})
    parts = []
    for token in remaining:
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        parts.append(f"{name} (did you mean {close[0]}?)" if close else name)
    stray = [t for t in remaining if not t.startswith("--")]
    if not parts:
        return (f"unexpected value(s) {stray}: each value must follow its --flag (a flag given twice, or a value "
                "with spaces that lost its quotes?)")
    return (f"unknown flag(s): {', '.join(parts)}. `llava-sculpt train --help` lists every flag (LLaVA's, "
            "Hugging Face TrainingArguments', and each --method's)")


def has_accelerator() -> bool:
    """A GPU (or other torch accelerator) this process can use."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def cpu_bf16_is_native() -> bool:
    """This CPU computes bfloat16 in hardware (x86 AVX512-BF16 or AMX).  Elsewhere torch emulates bf16 matmuls
    on CPU: a 2048^3 matmul ran at 0.3 GFLOPS against 158 in float32 on an AVX2 EPYC, so `--bf16 True` there is
    hundreds of times slower, not faster.  (oneDNN's own bf16 check also accepts plain AVX512, which has no
    bf16 instructions.)"""
    cpu = torch.cpu
    checks = (getattr(cpu, "_is_avx512_bf16_supported", None), getattr(cpu, "_is_amx_tile_supported", None))
    return any(check is not None and bool(check()) for check in checks)
