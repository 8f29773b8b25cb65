"""`llava-sculpt train` = `python -m llava_sculpt.train` = `deepspeed llava_sculpt/train.py ...`

LLaVA-1.5's fine-tuning flags (same names and meanings), every Hugging Face `TrainingArguments` flag, and
`--method` with each method's own flags.  The training loop is transformers' `Trainer`; `LlavaSculptTrainer`
only overrides its hooks (sampler, optimizer groups, loss, saving, loading).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from typing import Sequence

import llava_sculpt  # noqa: F401  (before torch: as a script, this is where OMP_WAIT_POLICY is set; see __init__)
import torch
import transformers

from llava_sculpt.atomic import give_normal_modes, save_safetensors, write_json_atomic
from llava_sculpt.data.conversation import get_template
from llava_sculpt.data.dataset import LlavaCollator, LlavaSupervisedDataset, ModalityGroupedSampler
from llava_sculpt.errors import UserError, run_cli
from llava_sculpt.methods import METHODS, RunContext, get_method_class
from llava_sculpt.model.load import (PROJECTOR_FILE, check_hf_llava_dir, find_projector, load_base_model,
                                     load_partial_model, load_processor, load_projector, save_partial_model,
                                     save_projector)

METHOD_STATE_FILE = "method_state.safetensors"
RUN_ARGS_FILE = "run_args.json"
COMPLETE_FILE = "training_complete.json"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default=None, metadata={"help": "local Hugging Face LLaVA-1.5 checkpoint "
                                    "(e.g. llava-1.5-7b-hf); original LLaVA checkpoints: `llava-sculpt convert` first"})
    version: str = field(default="v1", metadata={"help": "conversation template: v1 / vicuna_v1 (LLaVA-1.5)"})
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
    method: str = field(default="lora", metadata={"help": f"fine-tuning method: {', '.join(sorted(METHODS))}"})
    mm_vision_select_feature: str = field(default="patch", metadata={"help": "LLaVA flag; patch (LLaVA-1.5: the "
                                          "CLS token dropped) is checked against the checkpoint's "
                                          "vision_feature_select_strategy (default = patch, full = cls_patch)",
                                          "choices": ["patch", "cls_patch"]})
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={"help": "LLaVA flag: a projector from "
                                                "LLaVA's pretraining stage (mm_projector.bin with keys "
                                                "model.mm_projector.0/2.*, or a mm_projector.safetensors) loaded "
                                                "into the projector before training"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "LLaVA flag: True is LLaVA's stage-1 "
                                      "projector-only pretraining, which llava-sculpt does not do (every method "
                                      "trains LoRA + projector); only False is accepted"})
    freeze_backbone: bool = field(default=False, metadata={"help": "LLaVA flag: the language model's own weights "
                                  "are always frozen here (LoRA trains beside them), so True and False both mean that"})


@dataclass
class DataArguments:
    data_path: str = field(default=None, metadata={"help": "LLaVA training JSON (list of {id, image, conversations})"})
    image_folder: str | None = field(default=None, metadata={"help": "folder the 'image' paths are relative to"})
    image_aspect_ratio: str = field(default="pad", metadata={"help": "pad: pad to a square with the processor's "
                                    "mean colour first (LLaVA-1.5); square: resize/crop as the processor does",
                                    "choices": ["pad", "square"]})
    lazy_preprocess: bool = field(default=True, metadata={"help": "LLaVA flag; samples are always tokenised lazily"})
    is_multimodal: bool = field(default=True, metadata={"help": "LLaVA flag, kept for compatibility"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    model_max_length: int = field(default=2048, metadata={"help": "truncate sequences (image tokens included) "
                                  "to this many tokens"})
    lora_enable: bool = field(default=True, metadata={"help": "LLaVA flag; the LoRA methods need True; --method "
                              "spider / magnitude_mask train without LoRA and accept either"})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank (LLaVA default 64; the paper uses 16/32/64)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (LLaVA default 16; the paper uses 2r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_bias: str = field(default="none", metadata={"help": "none | all | lora_only"})
    lora_weight_path: str | None = field(default=None, metadata={"help": "continue from an earlier adapter "
                                         "(a run or checkpoint directory); its projector is loaded too"})
    mm_projector_lr: float | None = field(default=None, metadata={"help": "learning rate of the projector "
                                          "(default: --learning_rate)"})
    mm_projector_lora_lr: float | None = field(default=None, metadata={"help": "learning rate of LoRA adapters ON "
                                               "the projector (--method sculpt --sculpt_connector True; default: "
                                               "--learning_rate, like every other LoRA factor — --mm_projector_lr is "
                                               "the rate of the fully fine-tuned projector and does not apply)"})
    freeze_mm_mlp_adapter: bool = field(default=False, metadata={"help": "keep the projector frozen"})
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
                                   "of SOURCE-task samples whose layer-input covariances CorDA uses (required then)"})
    corda_image_folder: str | None = field(default=None, metadata={"help": "folder the --corda_data 'image' paths "
                                           "are relative to (default: --image_folder)"})
    corda_method: str = field(default="kpm", metadata={"help": "CorDA mode: kpm (knowledge-preserving: the adapter "
                              "takes the directions the source data uses least) or ipm (instruction-previewed)",
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
    if not has_accelerator() and not any(a.split("=", 1)[0] == "--dataloader_pin_memory" for a in argv):
        training_args.dataloader_pin_memory = False  # pinning needs an accelerator; torch warns every epoch
    method_cls = get_method_class(model_args.method)
    flags = next((f for f in method_flag_values if type(f) is method_cls.flags_class), None)
    return model_args, data_args, training_args, method_cls(flags)


# LLaVA-1.5's scripts were written for transformers 4.31; flags renamed since, mapped to today's name
# (transformers 5 still takes --gradient_checkpointing but warns that it is deprecated)
_LLAVA_ALIASES = {"--evaluation_strategy": "--eval_strategy",
                  "--gradient_checkpointing": "--activation_checkpointing",
                  "--gradient_checkpointing_kwargs": "--activation_checkpointing_kwargs"}

# `--report_to X` needs a package that llava-sculpt does not install by default
_REPORTERS = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard")}


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


def check_reporters(training_args) -> None:
    import importlib.util

    for name in training_args.report_to or []:
        if name in _REPORTERS and importlib.util.find_spec(_REPORTERS[name][0]) is None:
            raise UserError(f"--report_to {name}: the {_REPORTERS[name][0]} package is not installed; "
                            f"pip install 'llava-sculpt[{_REPORTERS[name][1]}]' (or pass --report_to none)")


def load_pretrained_projector(model, path: str) -> None:
    """--pretrain_mm_mlp_adapter: LLaVA's stage-1 projector (mm_projector.bin, keys model.mm_projector.0/2.*,
    read with weights_only=True) or a llava-sculpt/LLaVA-HF projector file (keys linear_1/2.*)."""
    from llava_sculpt.model.convert import map_llava_key

    if not os.path.isfile(path):
        raise UserError(f"--pretrain_mm_mlp_adapter {path}: no such file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here is a bad file, explain it
        raise UserError(f"--pretrain_mm_mlp_adapter {path}: cannot read it ({err})") from None
    mapped = {}
    for key, value in state.items():
        hf = map_llava_key(key) if "mm_projector" in key else key
        short = re.sub(r"^.*multi_modal_projector\.", "", hf or key)
        mapped[short] = value
    projector = find_projector(model)
    own = projector.state_dict()
    if set(mapped) != set(own) or any(mapped[k].shape != own[k].shape for k in own):
        raise UserError(f"--pretrain_mm_mlp_adapter {path}: expected a mlp2x_gelu projector matching the model "
                        f"({', '.join(f'{k} {tuple(v.shape)}' for k, v in sorted(own.items()))}), got "
                        f"{', '.join(f'{k} {tuple(v.shape)}' for k, v in sorted(state.items()))}")
    with torch.no_grad():
        for key, value in mapped.items():
            own[key].copy_(value.to(own[key].dtype))


def validate_llava_flags(model_args, data_args, training_args, config) -> None:
    """LLaVA flags that only make sense for the original code are checked against the HF checkpoint."""
    ckpt = model_args.model_name_or_path
    uses_lora = get_method_class(model_args.method).uses_lora
    if not training_args.lora_enable and uses_lora:
        raise UserError(f"--lora_enable False (full fine-tuning of the language model) is not supported by --method "
                        f"{model_args.method}, which trains LoRA adapters; drop the flag or pass --lora_enable True "
                        f"(--method {'/'.join(sorted(m for m, c in METHODS.items() if not c.uses_lora))} fine-tune "
                        "the last decoder layers without LoRA)")
    if not uses_lora and (training_args.lora_weight_path or training_args.bits != 16):
        raise UserError(f"--method {model_args.method} fine-tunes the model's own weights (no LoRA): "
                        "--lora_weight_path and --bits 4/8 do not apply")
    if model_args.mm_projector_type != "mlp2x_gelu":
        raise UserError(f"--mm_projector_type {model_args.mm_projector_type}: Hugging Face LLaVA-1.5 checkpoints "
                        "have the 2-layer GELU projector (mlp2x_gelu); other projector types cannot be loaded")
    if model_args.mm_use_im_start_end or model_args.mm_use_im_patch_token:
        raise UserError("--mm_use_im_start_end / --mm_use_im_patch_token True: LLaVA-1.5 uses neither and the "
                        "Hugging Face LLaVA model has no such tokens; pass False (the default)")
    if model_args.mm_vision_select_layer is not None and model_args.mm_vision_select_layer != config.vision_feature_layer:
        raise UserError(f"--mm_vision_select_layer {model_args.mm_vision_select_layer} differs from the checkpoint "
                        f"{ckpt}, whose vision_feature_layer is {config.vision_feature_layer}; the layer is part of "
                        "the trained model, so drop the flag or edit config.json deliberately")
    if model_args.vision_tower:
        vision = config.vision_config
        m = re.search(r"patch(\d+)(?:-(\d+))?", model_args.vision_tower)
        if m and (int(m.group(1)) != vision.patch_size or (m.group(2) and int(m.group(2)) != vision.image_size)):
            raise UserError(f"--vision_tower {model_args.vision_tower} does not match the tower inside {ckpt} "
                            f"(patch {vision.patch_size}, image {vision.image_size}); the HF checkpoint carries "
                            "its own tower, so the flag is only checked — drop it or use the matching checkpoint")
        print(f"note: --vision_tower {model_args.vision_tower} is not loaded: the tower inside {ckpt} is used "
              f"(patch {vision.patch_size}, image {vision.image_size})")
    if model_args.tune_mm_mlp_adapter:
        raise UserError("--tune_mm_mlp_adapter True is LLaVA's stage-1 pretraining (projector only, language model "
                        "untouched); llava-sculpt fine-tunes LoRA + projector (stage 2). Drop the flag; to start "
                        "from a stage-1 projector pass --pretrain_mm_mlp_adapter mm_projector.bin")
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    if (model_args.mm_vision_select_feature == "patch") != (strategy == "default"):
        raise UserError(f"--mm_vision_select_feature {model_args.mm_vision_select_feature} differs from the "
                        f"checkpoint {ckpt}, whose vision_feature_select_strategy is {strategy!r} (default = "
                        "patch, full = cls_patch); drop the flag")
    if model_args.pretrain_mm_mlp_adapter and not os.path.isfile(model_args.pretrain_mm_mlp_adapter):
        raise UserError(f"--pretrain_mm_mlp_adapter {model_args.pretrain_mm_mlp_adapter}: no such file")
    check_reporters(training_args)
    get_template(model_args.version)
    check_deepspeed_config(training_args.deepspeed)
    check_cpu_data_parallel(training_args)
    from llava_sculpt.methods import lora_init

    lora_init.validate(training_args, uses_lora, model_args.method)
    if training_args.lora_weight_path and not os.path.isfile(
            os.path.join(training_args.lora_weight_path, "adapter_model.safetensors")):
        raise UserError(f"--lora_weight_path {training_args.lora_weight_path}: no adapter_model.safetensors there")


def has_accelerator() -> bool:
    """A GPU (or other torch accelerator) this process can use."""
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def check_cpu_data_parallel(training_args) -> None:
    """transformers 5 on a machine without an accelerator, launched as several processes (torchrun), splits
    the data between them but does not wrap the model in DDP unless --use_cpu is given: the processes would
    train apart while looking fine."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and not has_accelerator() and not training_args.deepspeed and not training_args.use_cpu:
        raise UserError(f"{world} processes without a GPU: pass --use_cpu True so that they train one model "
                        "together (DDP over gloo); without it transformers splits the data but each process "
                        "trains its own copy")


def check_deepspeed_config(deepspeed) -> None:
    """Under ZeRO-3 every save must gather the 16-bit weights, or the adapter and projector files would hold
    partitioned (empty) tensors instead of the trained values."""
    if not deepspeed:
        return
    config = deepspeed
    if isinstance(deepspeed, str):
        try:
            with open(deepspeed) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"--deepspeed {deepspeed}: cannot read the DeepSpeed config ({err})") from None
    zero = config.get("zero_optimization", {}) if isinstance(config, dict) else {}
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise UserError(f"--deepspeed {deepspeed if isinstance(deepspeed, str) else '(dict)'}: ZeRO-3 without "
                        '"stage3_gather_16bit_weights_on_model_save": true would save partitioned, not trained, '
                        "adapter and projector weights; set it to true (configs/zero3*.json do)")


# ---------------------------------------------------------------------------------------------- trainer


def _projector_keys(state_dict: dict) -> dict[str, torch.Tensor]:
    """Fully trained projector weights out of a (possibly gathered, PEFT-prefixed) state dict."""
    out = {}
    for key, value in state_dict.items():
        # the projector itself, or PEFT's trained copy of it (modules_to_save); never the frozen original
        m = re.search(r"multi_modal_projector\.(?:modules_to_save\.[^.]+\.)?(linear_\d\.(?:weight|bias))$", key)
        if m and "lora_" not in key:
            out[m.group(1)] = value
    return out


def _optimizer_part(name: str) -> str:
    """Which learning-rate group a trainable parameter belongs to.  LoRA factors on the projector are LoRA
    weights (B starts at 0): they take the LoRA rate, not the small rate of the fully trained projector."""
    if "multi_modal_projector" not in name:
        return "rest"
    return "projector_lora" if "lora_" in name else "projector"


class MethodCallback(transformers.TrainerCallback):
    def __init__(self, method, run: RunContext):
        self.method, self.run = method, run

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.method.on_train_begin(self.run.trainer.model, self.run)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.method.after_optimizer_step(self.run.trainer.model, state.global_step, self.run)


class LlavaSculptTrainer(transformers.Trainer):
    def __init__(self, *args, method, run: RunContext, **kwargs):
        super().__init__(*args, **kwargs)
        self.method, self.run = method, run
        self._extra_loss_sum, self._extra_loss_count = 0.0, 0

    def _get_train_sampler(self, train_dataset=None):
        if self.args.group_by_modality_length:
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            return ModalityGroupedSampler(dataset.modality_lengths, self.args.train_batch_size,
                                          self.args.world_size * self.args.gradient_accumulation_steps,
                                          seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        """LLaVA's parameter groups: (decay, no decay) x (projector at --mm_projector_lr, LoRA on the projector
        at --mm_projector_lora_lr, the rest at --learning_rate)."""
        args = self.args
        if self.optimizer is None and (args.mm_projector_lr is not None or args.mm_projector_lora_lr is not None):
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            rates = {"rest": None, "projector": args.mm_projector_lr, "projector_lora": args.mm_projector_lora_lr}
            groups = []
            for part, lr in rates.items():
                for use_decay in (True, False):
                    params = [p for n, p in opt_model.named_parameters() if p.requires_grad
                              and _optimizer_part(n) == part and (n in decay) == use_decay]
                    if params:
                        group = {"params": params, "weight_decay": args.weight_decay if use_decay else 0.0}
                        if lr is not None:
                            group["lr"] = lr
                        groups.append(group)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer
        return super().create_optimizer(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Task loss normalised as --loss_normalization says, plus the method's penalty once per optimizer step.

        `num_items_in_batch` is the Trainer's count of label tokens in the step's accumulated micro-batches (summed
        over the processes with --average_tokens_across_devices).  global_tokens hands it to the model, which
        sums the cross-entropy and divides by it; the Trainer then does not divide by the accumulation steps and
        multiplies by the number of processes to undo DDP's gradient averaging.  llava withholds it: the model
        returns its mean over this micro-batch's own label tokens, which is divided by the accumulation steps,
        and DDP averages the processes' gradients (LLaVA-1.5 on transformers 4.31)."""
        mode = self.args.loss_normalization
        if mode not in ("llava", "global_tokens"):
            raise UserError(f"--loss_normalization must be llava or global_tokens, got {mode!r}")
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch if mode == "global_tokens" else None)
        if not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        # training_step divides what we return by the accumulation steps unless it takes it as already scaled,
        # which it decides from the count it passed us (its rule, repeated here).
        trainer_divides = not (self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None
                               else (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                               or self.compute_loss_func is not None)
        if mode == "llava" and not trainer_divides:
            loss = loss / self.current_gradient_accumulation_steps
        extra = self.method.extra_loss(model)
        if extra is not None:
            self._extra_loss_sum += float(extra.detach())
            self._extra_loss_count += 1
            # The penalty belongs to the optimizer step, not to each micro-batch: it is added to every
            # micro-batch divided by the accumulation steps (by us when the Trainer will not), so it enters each
            # optimizer step exactly once, in both modes; it is added after the Trainer's multiplication by the
            # number of processes, so DDP's averaging of the (equal) penalty gradients keeps it once.
            if not trainer_divides:
                extra = extra / self.current_gradient_accumulation_steps
            loss = loss + extra
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        """The method's own terms are logged beside the loss.  The end-of-training `train_loss` of a resumed run
        is the whole run's mean, as in an uninterrupted run (Trainer's covers only the steps of this call: 0.158
        against 0.276 in one case); the steps before the resume come from the logged losses of the checkpoint's
        trainer_state.json (exact when --logging_steps divides --save_steps; LLaVA logs every step), and
        `train_loss_this_call` keeps Trainer's value."""
        if self._extra_loss_count and "loss" in logs:
            logs[f"{self.method.name}_penalty"] = self._extra_loss_sum / self._extra_loss_count
            self._extra_loss_sum, self._extra_loss_count = 0.0, 0
        if "loss" in logs:
            logs.update(self.method.logs())
        resumed_at = getattr(self, "_initial_global_step", 0)
        if "train_loss" in logs and resumed_at > 0:
            before_sum, before_steps = 0.0, 0
            for entry in self.state.log_history:
                if "loss" in entry and entry["step"] <= resumed_at:
                    before_sum += entry["loss"] * (entry["step"] - before_steps)
                    before_steps = entry["step"]
            this_call = self.state.global_step - resumed_at
            logs["train_loss_this_call"] = logs["train_loss"]
            logs["train_loss"] = (before_sum + logs["train_loss"] * this_call) / max(before_steps + this_call, 1)
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir=None, _internal_call=False):
        """A method without LoRA under DeepSpeed: gather only its trained tensors (the Trainer would gather the
        whole model under ZeRO-3, frozen weights included); every process takes part."""
        if self.method.uses_lora or not self.is_deepspeed_enabled:
            return super().save_model(output_dir, _internal_call)
        from llava_sculpt.methods.zero import gathered

        trained = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        with gathered(list(trained.values())):
            state_dict = {n: p.detach().cpu().clone() for n, p in trained.items()}
        self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=state_dict)

    def _keeps_frozen_out_of_deepspeed_checkpoints(self) -> bool:
        """A method without LoRA under DeepSpeed: its checkpoint-N/global_stepN holds the trained tensors only.
        The Trainer asks DeepSpeed to leave frozen weights out for PEFT models alone, so for SPIDER /
        MagnitudeMask each checkpoint would otherwise carry a whole 16-bit copy of the model (~14 GB at 7B)."""
        return not self.method.uses_lora and self.is_deepspeed_enabled

    def _save_optimizer_and_scheduler(self, output_dir):
        if not self._keeps_frozen_out_of_deepspeed_checkpoints():
            return super()._save_optimizer_and_scheduler(output_dir)
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)  # collective
        from accelerate.utils import DeepSpeedSchedulerWrapper

        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            # the Trainer's rule: DeepSpeed saves its own scheduler, a Trainer-made one goes to scheduler.pt
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, transformers.trainer.SCHEDULER_NAME))

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """Resuming such a checkpoint: the Trainer loads DeepSpeed's module state strictly (all weights) unless
        the model is a PEFT model; here the frozen weights are absent by design, so it is loaded non-strictly
        and what is missing is checked to be exactly the frozen weights (they come from the base model)."""
        if resume_from_checkpoint is None or not self._keeps_frozen_out_of_deepspeed_checkpoints():
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        self._load_deepspeed_trained_only(resume_from_checkpoint)
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader

    def _load_deepspeed_trained_only(self, checkpoint: str) -> None:
        import glob

        if not glob.glob(os.path.join(checkpoint, "global_step*")):
            raise UserError(f"{checkpoint}: no DeepSpeed global_step* folder; resume a DeepSpeed run from a "
                            "checkpoint a DeepSpeed run wrote")
        trained = {n for n, p in self.model.named_parameters() if p.requires_grad}

        def load_module(src, dst):
            result = dst.load_state_dict(src, strict=False)
            missing_trained = sorted(set(result.missing_keys) & trained)
            if missing_trained or result.unexpected_keys:
                raise UserError(f"{checkpoint}: its DeepSpeed module state does not fit this run (trained tensors "
                                f"missing e.g. {missing_trained[:2]}, unexpected e.g. {result.unexpected_keys[:2]}); "
                                "resume with the same --method and layer flags")

        load_path, _ = self.model_wrapped.load_checkpoint(checkpoint, load_module_strict=False,
                                                          load_optimizer_states=True, load_lr_scheduler_states=True,
                                                          custom_load_fn=load_module)
        if load_path is None:
            raise UserError(f"{checkpoint}: DeepSpeed could not load this checkpoint")

    def _save(self, output_dir=None, state_dict=None):
        """Every save (checkpoint-N and the final one) is self-contained: adapter + projector + method state
        + processor + run arguments.  Under ZeRO-3 `state_dict` is the gathered one, so saved values are the
        trained ones.  A method without LoRA saves its trained tensors only (partial_model.safetensors)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        from llava_sculpt.methods import lora_init

        initial_adapter = self.run.extras.get(lora_init.INITIAL_ADAPTER_KEY)
        if self.method.uses_lora and initial_adapter:  # pissa / olora / corda: an adapter of the ORIGINAL base
            if self.args.should_save:
                os.makedirs(output_dir, exist_ok=True)
                lora_init.save_converted_adapter(self.model, output_dir, initial_adapter, state_dict)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)
                torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))
        elif self.method.uses_lora:
            super()._save(output_dir, state_dict=state_dict)
        method_state = self.method.state_dict()  # on every process: a method may gather its state from the ranks
        if not self.args.should_save:
            return
        if not self.method.uses_lora:
            os.makedirs(output_dir, exist_ok=True)
            source = state_dict if state_dict else dict(self.model.named_parameters())
            trained = [n for n, p in self.model.named_parameters() if p.requires_grad]
            save_partial_model({n: source[n] for n in trained}, output_dir, self.run.model_args.model_name_or_path,
                               self.method.name)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))
        if self.method.trains_projector and not self.args.freeze_mm_mlp_adapter:
            source = state_dict if state_dict else find_projector(self.model).state_dict()
            projector = _projector_keys(source) if state_dict else dict(source)
            save_projector(projector, output_dir)
        save_method_state(self.method, output_dir, method_state)
        write_run_args(self.run, self.method, output_dir)
        give_normal_modes(output_dir, recursive=False)  # safetensors writes 0600 files

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self.method.uses_lora:
            load_partial_model(model if model is not None else self.model, resume_from_checkpoint)
            return
        from llava_sculpt.methods import lora_init

        if self.run.extras.get(lora_init.INITIAL_ADAPTER_KEY):  # the saved adapter is converted: the raw one
            if not lora_init.load_unconverted_adapter(model if model is not None else self.model,
                                                      resume_from_checkpoint):
                raise UserError(f"{resume_from_checkpoint}: no {lora_init.UNCONVERTED_ADAPTER_FILE}, which resuming "
                                f"--init_lora_weights {self.args.init_lora_weights} needs; start a new --output_dir")
            load_projector(model if model is not None else self.model, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_projector(model if model is not None else self.model, resume_from_checkpoint)


# ---------------------------------------------------------------------------------------------- helpers


def save_method_state(method, output_dir: str, state: dict | None = None) -> None:
    state = method.state_dict() if state is None else state
    if state:
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()},
                         os.path.join(output_dir, METHOD_STATE_FILE))


def load_method_state(method, checkpoint_dir: str) -> None:
    from safetensors.torch import load_file

    path = os.path.join(checkpoint_dir, METHOD_STATE_FILE)
    method.load_state_dict(load_file(path) if os.path.isfile(path) else {})


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def run_args_record(model_args, data_args, training_args, method) -> dict:
    """What run_args.json holds: every argument of the run, and the package versions."""
    return {
        "method": method.name,
        "method_flags": _jsonable(method.flags) if method.flags is not None else {},
        "model_args": _jsonable(model_args),
        "data_args": _jsonable(data_args),
        "training_args": _jsonable(training_args.to_dict()),
        "versions": {"llava_sculpt": __import__("llava_sculpt").__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": __import__("peft").__version__},
    }


def write_run_args(run: RunContext, method, output_dir: str) -> None:
    record = run_args_record(run.model_args, run.data_args, run.training_args, method)
    write_json_atomic(os.path.join(output_dir, RUN_ARGS_FILE), record)


# TrainingArguments that do not change what is trained (logging, saving, reporting, data loading, evaluation,
# launch details): a finished run asked for again with other values of these is still the same run.
HOUSEKEEPING_ARGS = frozenset({
    "output_dir", "logging_dir", "run_name", "project", "trackio_space_id", "trackio_bucket_id",
    "trackio_static_space_id", "report_to", "disable_tqdm", "log_level", "log_level_replica", "log_on_each_node",
    "logging_strategy", "logging_steps", "logging_first_step", "logging_nan_inf_filter",
    "include_num_input_tokens_seen", "skip_memory_metrics", "debug", "save_strategy", "save_steps",
    "save_total_limit", "save_on_each_node", "save_only_model", "enable_jit_checkpoint", "push_to_hub",
    "hub_token", "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision",
    "resume_from_checkpoint", "local_rank", "ddp_timeout", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
    "eval_strategy", "eval_steps", "eval_delay", "per_device_eval_batch_size", "prediction_loss_only",
    "eval_on_start", "eval_do_concat_batches", "eval_use_gather_object", "eval_accumulation_steps",
    "include_for_metrics", "batch_eval_metrics", "bf16_full_eval", "fp16_full_eval", "do_train", "do_eval",
    "do_predict", "torch_empty_cache_steps",
    "eval_benchmarks", "eval_data_root", "eval_max_questions", "eval_every", "eval_max_new_tokens",
    "progress_every",
})


# transformers 5 mirrors --gradient_checkpointing(_kwargs), the name LLaVA users pass, into these
_MIRRORS = frozenset({"activation_checkpointing", "activation_checkpointing_kwargs"})


def run_args_differences(recorded: dict, current: dict) -> list[str]:
    """'--flag (A in the finished run, B now)' for each argument whose value differs, among the arguments
    both records hold (a run from an older version lacks newer flags), housekeeping ones left out."""
    def show(value) -> str:
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."

    current = json.loads(json.dumps(current))  # the JSON form run_args.json has (tuples -> lists, ...)
    if recorded.get("method") != current["method"]:
        return [f"--method ({show(recorded.get('method'))} in the finished run, {show(current['method'])} now)"]
    differences = []
    for section in ("model_args", "data_args", "training_args", "method_flags"):
        old = recorded.get(section) if isinstance(recorded.get(section), dict) else {}
        for key, value in (current.get(section) or {}).items():
            if key in old and key not in HOUSEKEEPING_ARGS and key not in _MIRRORS and old[key] != value:
                differences.append(f"--{key} ({show(old[key])} in the finished run, {show(value)} now)")
    return differences


def check_finished_run(model_args, data_args, training_args, method) -> bool:
    """True when --output_dir already holds a finished run (training_complete.json) of these arguments: the
    caller stops there, having printed so and written nothing.  A finished run of other arguments is a
    UserError naming the flags that differ."""
    output_dir = training_args.output_dir
    if not os.path.isfile(os.path.join(output_dir, COMPLETE_FILE)):
        return False
    try:
        with open(os.path.join(output_dir, RUN_ARGS_FILE), encoding="utf-8") as f:
            recorded = json.load(f)
        if not isinstance(recorded, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError):
        recorded = None
    if recorded is not None:
        differences = run_args_differences(recorded, run_args_record(model_args, data_args, training_args, method))
        if differences:
            shown = differences[:8] + ([f"and {len(differences) - 8} more"] if len(differences) > 8 else [])
            extend = (f" (to continue from the finished adapter, add --lora_weight_path {output_dir})"
                      if getattr(method, "uses_lora", True) else "")
            raise UserError(f"--output_dir {output_dir} holds a finished run (training_complete.json) trained with "
                            f"other arguments: {'; '.join(shown)}. Pass a new --output_dir for this run{extend}, "
                            f"or delete {output_dir} to train it again there.")
    if int(os.environ.get("RANK", "0") or 0) == 0:
        try:
            with open(os.path.join(output_dir, COMPLETE_FILE), encoding="utf-8") as f:
                step = json.load(f).get("global_step")
        except (OSError, ValueError, AttributeError):
            step = None
        same = "the same arguments" if recorded is not None else f"no readable {RUN_ARGS_FILE} to compare with"
        print(f"{output_dir}: training is already complete{f' ({step} steps)' if step is not None else ''}, with "
              f"{same}; nothing to do. To train again, pass a new --output_dir.")
    return True


def compute_dtype(training_args) -> torch.dtype:
    return torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else torch.float32


def build_model(model_args, training_args, method, run: RunContext):
    """Base model -> frozen -> adapters injected by the method -> projector trainable (unless frozen)."""
    dtype = compute_dtype(training_args)
    # Without DeepSpeed there are no fp32 master weights: keep the base in the compute dtype and the
    # trainable parameters in fp32 (autocast does the rest).  DeepSpeed keeps its own fp32 copies.
    model = load_base_model(model_args.model_name_or_path, dtype, model_args.attn_implementation, training_args.bits)
    model.config.use_cache = False
    if getattr(model.config, "text_config", None) is not None:  # the language model reads its own config
        model.config.text_config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    if training_args.bits in (4, 8):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=training_args.gradient_checkpointing,
            gradient_checkpointing_kwargs=training_args.gradient_checkpointing_kwargs)
    if training_args.gradient_checkpointing:
        model.enable_input_require_grads()
    transformers.set_seed(training_args.seed)  # adapter initialisation is reproducible
    model = method.inject(model, run)
    for peft_config in getattr(model, "peft_config", {}).values():  # loadable from any working directory
        peft_config.base_model_name_or_path = os.path.abspath(model_args.model_name_or_path)
    if training_args.lora_weight_path:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = load_file(os.path.join(training_args.lora_weight_path, "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, state)
        if result.unexpected_keys:
            raise UserError(f"--lora_weight_path {training_args.lora_weight_path}: adapter keys do not match this "
                            f"model/method (e.g. {result.unexpected_keys[:2]}); same --lora_r and targets needed")
        load_projector(model, training_args.lora_weight_path)
    elif model_args.pretrain_mm_mlp_adapter:
        load_pretrained_projector(model, model_args.pretrain_mm_mlp_adapter)
    projector = find_projector(model)
    if method.trains_projector and not training_args.freeze_mm_mlp_adapter:
        for p in projector.parameters():
            p.requires_grad_(True)
    # Trainable tensors: fp32 without DeepSpeed (no master copies; autocast computes in the low dtype);
    # under DeepSpeed all in the compute dtype, since ZeRO keeps its own fp32 masters and requires one dtype
    # (PEFT would otherwise leave the adapters in fp32 next to a bf16 projector).
    trainable_dtype = dtype if training_args.deepspeed else torch.float32
    for p in model.parameters():
        if p.requires_grad and p.dtype != trainable_dtype:
            p.data = p.data.to(trainable_dtype)
    return model


def resolve_resume(training_args) -> str | None:
    """--resume_from_checkpoint PATH | True/latest; without it, like LLaVA, resume from the newest
    checkpoint-N in --output_dir when there is one."""
    from transformers.trainer_utils import get_last_checkpoint

    value = training_args.resume_from_checkpoint
    if value and value.lower() not in ("true", "latest"):
        if not os.path.isdir(value):
            raise UserError(f"--resume_from_checkpoint {value}: no such checkpoint directory")
        return value
    last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    if value and last is None:
        raise UserError(f"--resume_from_checkpoint {value}: no checkpoint-N directory in {training_args.output_dir}")
    if last and not value:
        print(f"resuming from {last} (found in --output_dir; LLaVA's behaviour)")
    return last


def finalise(trainer, run: RunContext, method, output_dir: str) -> None:
    """Write the final adapter/projector/state into output_dir atomically-enough: everything goes to a
    temporary folder first and is moved in file by file; `training_complete.json` is written last, so a
    run directory without it never looks finished.  A post-training transform (DARE, Model Tailor: RUN_DIR/merged)
    runs after that, on the saved run."""
    tmp = os.path.join(output_dir, ".final-tmp")
    if trainer.args.should_save and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    trainer.save_model(tmp)
    if not trainer.args.should_save:
        return
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    os.rmdir(tmp)
    trainer.save_state()
    method.post_training(output_dir, trainer.model, run)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    write_json_atomic(os.path.join(output_dir, COMPLETE_FILE),
                      {"global_step": trainer.state.global_step, "method": method.name,
                       "final_logged_loss": losses[-1] if losses else None})
    # DARE / Model Tailor transform the saved run only now, after freeing the training state
    # (methods/posthoc.py): a failure there leaves the trained run complete.
    method.transform_saved_run(output_dir, run)


def main(argv: Sequence[str] | None = None) -> int:
    model_args, data_args, training_args, method = parse_args(argv)
    if not model_args.model_name_or_path:
        raise UserError("--model_name_or_path is required (a local Hugging Face LLaVA-1.5 checkpoint)")
    if not data_args.data_path:
        raise UserError("--data_path is required (LLaVA training JSON)")
    if training_args.deepspeed:
        from llava_sculpt import quiet

        quiet.keep_deepspeed_notices()
    if check_finished_run(model_args, data_args, training_args, method):
        return 0
    from llava_sculpt.eval import during_training

    eval_plan = during_training.plan_from_args(training_args, data_args)  # --eval_benchmarks, checked before loading
    check_hf_llava_dir(model_args.model_name_or_path, "--model_name_or_path")
    processor = load_processor(model_args.model_name_or_path)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    validate_llava_flags(model_args, data_args, training_args, config)
    tokenizer = processor.tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{model_args.model_name_or_path}: a fast tokenizer (tokenizer.json) is needed for label masking")
    dataset = LlavaSupervisedDataset(data_args.data_path, data_args.image_folder, tokenizer, processor.image_processor,
                                     config, get_template(model_args.version), training_args.model_max_length,
                                     data_args.image_aspect_ratio)
    resume = resolve_resume(training_args)
    run = RunContext(model_args, data_args, training_args)
    model = build_model(model_args, training_args, method, run)
    if resume:
        load_method_state(method, resume)
    trainer = LlavaSculptTrainer(model=model, args=training_args, train_dataset=dataset,
                                 data_collator=LlavaCollator(tokenizer.pad_token_id), processing_class=processor,
                                 method=method, run=run)
    run.trainer = trainer
    trainer.add_callback(MethodCallback(method, run))
    progress_every = training_args.progress_every
    if progress_every < 0:
        progress_every = 60.0 if training_args.disable_tqdm else 0.0
    if progress_every > 0:
        from llava_sculpt.progress import ProgressLines

        trainer.add_callback(ProgressLines(progress_every))
    if eval_plan is not None:  # after the method's callback: a step's masks are applied before it is scored
        trainer.add_callback(during_training.make_callback(eval_plan, processor, training_args.output_dir, resume))
    trainer.train(resume_from_checkpoint=resume)
    finalise(trainer, run, method, training_args.output_dir)
    if trainer.args.should_save:
        weights = "adapter" if method.uses_lora else "trained tensors (partial_model.safetensors)"
        print(f"done: {weights}, {PROJECTOR_FILE} and processor in {training_args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
