"""`--init_lora_weights`: how the LoRA factors of every LoRA-based method start (PEFT's initialisations).

    default   PEFT's default (A Kaiming-uniform, B = 0): the adapter starts as the identity (LLaVA-1.5)
    gaussian  A Gaussian (std 1/r), B = 0
    pissa     A, B = the top-r singular triplets of W; the base becomes the residual W - s B A   (PiSSA)
    olora     A, B = a QR decomposition of W; the base becomes the residual                     (OLoRA)
    corda     A, B from the SVD of W C (C: the input covariance of each layer on --corda_data samples);
              the base becomes the residual.  --corda_method kpm (knowledge-preserving: the adapter takes the
              directions LEAST used by the source data) or ipm (instruction-previewed: the directions the
              downstream data uses most)   (CorDA)
    eva       A = the top right-singular vectors of each layer's inputs on the training data, B = 0; ranks may
              be redistributed across layers (PEFT's EvaConfig defaults)                              (EVA)
              PEFT's per-batch SVD needs round(2 r) label tokens in a batch and loops forever when no batch
              has them: the batch size is raised to fit (--eva_batch_size), and a stuck loop is stopped.

pissa / olora / corda change the base weights.  The initial adapter is written to RUN_DIR/initial_lora_adapter
before training, and every save (checkpoint-N and the final adapter) converts the trained adapter with PEFT's
`path_initial_model_for_weight_conversion` into a plain LoRA of rank 2r (A' = [A; A0], B' = [B, -B0]) that
applies to the ORIGINAL base: `merge`, `generate`, `eval` and the post-training transforms need nothing
special.  PEFT's conversion keeps only lora_A / lora_B; the adapter's other tensors (the fully trained projector,
`modules_to_save`; biases) are written back unchanged.  To resume, the checkpoint also holds the unconverted
adapter (`adapter_unconverted.safetensors`), loaded into the model re-initialised the same way.

Methods that build or read their LoRA factors in ways these inits do not fit accept only some of them
(`METHOD_INITS`; refused before anything is loaded): sculpt and orth refuse pissa / olora / corda (their masks
and penalty are defined on factors of the original base, not of a residual), asymlora accepts only default and
gaussian (it builds its own PEFT layers: no CorDA / EVA pass runs for them and no save is converted back).

corda and eva run forward passes over data (the LLaVA dataset and collator of training) before training, on
the device training will use.  ZeRO-3 partitions the base weights at load time, so none of pissa / olora /
corda / eva can decompose them there: refused.  Quantised bases (--bits 4/8), DoRA and --lora_weight_path are
refused with the base-changing inits (the residual of a quantised weight, DoRA's magnitude and an earlier
adapter do not survive the conversion).
"""
from __future__ import annotations

import json
import os

import torch

from llava_sculpt.errors import UserError

INIT_CHOICES = ("default", "gaussian", "pissa", "olora", "corda", "eva")
MUTATING_INITS = ("pissa", "olora", "corda")  # change the base weights: saves are converted
DATA_INITS = ("corda", "eva")
INITIAL_ADAPTER_DIR = "initial_lora_adapter"
UNCONVERTED_ADAPTER_FILE = "adapter_unconverted.safetensors"
INITIAL_ADAPTER_KEY = "lora_initial_adapter"  # RunContext.extras key


# --method -> (the --init_lora_weights values it handles, why the others are refused).  Methods not listed handle
# every init: plain LoRA training, then (dare / tailor / intruders) a transform of the saved, converted adapter.
METHOD_INITS: dict[str, tuple[tuple[str, ...], str]] = {
    "sculpt": (("default", "gaussian", "eva"),
               "LoRASculpt's masks, sparsity report and sparse adapter are defined on factors of the original base, "
               "but these factors train on a residual base"),
    "orth": (("default", "gaussian", "eva"),
             "the orthogonality penalty ||W0 (s B A)^T||_1 is defined against the pretrained W0 with B starting at "
             "0, but this init trains on a residual base with factors that start at the top directions of W0"),
    "asymlora": (("default", "gaussian"),
                 "AsymLoRA builds its own PEFT layers (one shared A and E routed B factors in every MLP projection): "
                 "no CorDA or EVA pass runs for them and no save is converted back to the original base, so "
                 "pissa / olora / corda would train a different model than the one saved and eva would silently "
                 "start from the default init"),
}


def init_name(training_args) -> str:
    return getattr(training_args, "init_lora_weights", "default") or "default"


def mutates_base(training_args) -> bool:
    return init_name(training_args) in MUTATING_INITS


def zero_stage(deepspeed) -> int | None:
    if not deepspeed:
        return None
    config = deepspeed
    if isinstance(deepspeed, str):
        try:
            with open(deepspeed) as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError):
            return None  # train.check_deepspeed_config reports it
    zero = config.get("zero_optimization", {}) if isinstance(config, dict) else {}
    return zero.get("stage")


def validate(training_args, uses_lora: bool = True, method: str | None = None) -> None:
    """Before anything is loaded: the flag combinations that cannot work."""
    init = init_name(training_args)
    if init not in INIT_CHOICES:
        raise UserError(f"--init_lora_weights {init}: expected one of {', '.join(INIT_CHOICES)}")
    eva_batch = getattr(training_args, "eva_batch_size", 0)
    if eva_batch < 0 or (eva_batch and init != "eva"):
        raise UserError(f"--eva_batch_size {eva_batch}: expected 0 (auto) or a positive batch size, and only with "
                        f"--init_lora_weights eva (got {init})")
    if init == "default":
        return
    if not uses_lora:
        raise UserError(f"--init_lora_weights {init}: this --method trains no LoRA adapter")
    check_method_init(training_args, method)
    if init == "corda":
        if getattr(training_args, "corda_method", "kpm") not in ("kpm", "ipm"):
            raise UserError(f"--corda_method {training_args.corda_method}: expected kpm or ipm")
        if not training_args.corda_data:
            raise UserError("--init_lora_weights corda needs --corda_data: a LLaVA training JSON whose "
                            "layer-input covariances orient the adapter (--corda_method kpm: SOURCE-task samples, "
                            "the adapter avoids what they use; ipm: DOWNSTREAM-task samples, the adapter starts "
                            "along what they use)")
        if not os.path.isfile(training_args.corda_data):
            raise UserError(f"--corda_data {training_args.corda_data}: no such file")
        if training_args.corda_samples < 1:
            raise UserError(f"--corda_samples {training_args.corda_samples}: must be at least 1")
    elif training_args.corda_data:
        raise UserError(f"--corda_data is only used by --init_lora_weights corda (got {init})")
    if zero_stage(training_args.deepspeed) == 3:
        raise UserError(f"--init_lora_weights {init} under DeepSpeed ZeRO-3: the base weights are partitioned "
                        "across processes when the model is loaded, so PEFT cannot decompose them or hook their "
                        "inputs; use a ZeRO-2 config (configs/zero2.json) or --init_lora_weights default")
    if init in MUTATING_INITS:
        if training_args.bits != 16:
            raise UserError(f"--init_lora_weights {init} with --bits {training_args.bits}: the residual of a "
                            "quantised base plus the converted adapter is not the trained model; use --bits 16")
        if training_args.lora_weight_path:
            raise UserError(f"--init_lora_weights {init} replaces the base weights by a residual; it cannot "
                            "continue from --lora_weight_path (an adapter of the original base)")


def check_method_init(training_args, method: str | None) -> None:
    """Refuse an --init_lora_weights that --method `method` would mishandle (METHOD_INITS)."""
    init = init_name(training_args)
    allowed, why = METHOD_INITS.get(method or "", (INIT_CHOICES, ""))
    if init not in allowed:
        use = ", ".join(allowed[:-1]) + f" or {allowed[-1]}" if len(allowed) > 1 else allowed[0]
        raise UserError(f"--method {method} with --init_lora_weights {init}: {why}; use --init_lora_weights {use}")


def config_kwargs(training_args) -> dict:
    """LoraConfig keyword arguments for --init_lora_weights (and CorDA's / EVA's configs)."""
    from peft.tuners.lora.config import CordaConfig, EvaConfig

    init = init_name(training_args)
    if init == "default":
        return {}
    kwargs: dict = {"init_lora_weights": init}
    if init == "corda":
        kwargs["corda_config"] = CordaConfig(corda_method=training_args.corda_method)
    elif init == "eva":
        kwargs["eva_config"] = EvaConfig()
    return kwargs


def check_method_compatible(training_args, overrides: dict, include_projector: bool = False) -> None:
    init = init_name(training_args)
    if init == "eva" and include_projector:
        raise UserError("--init_lora_weights eva with LoRA on the projector: EVA's token mask is over the text "
                        "positions and does not fit the projector's image-patch inputs")
    if init in MUTATING_INITS and overrides.get("use_dora"):
        raise UserError(f"--init_lora_weights {init} with DoRA: DoRA's magnitude is computed from the residual "
                        "base and does not survive the conversion to the original base; use --method lora")


# ---------------------------------------------------------------------------------------------- data


def make_loader(run, data_path: str, image_folder: str | None, batch_size: int, max_samples: int | None = None):
    """The training dataset and collator over `data_path`, in file order (first `max_samples`)."""
    from torch.utils.data import DataLoader, Subset

    from llava_sculpt.data.conversation import get_template
    from llava_sculpt.data.dataset import LlavaCollator, LlavaSupervisedDataset
    from llava_sculpt.model.load import load_processor

    from transformers import AutoConfig

    model_args, data_args, train = run.model_args, run.data_args, run.training_args
    processor = load_processor(model_args.model_name_or_path)
    config = AutoConfig.from_pretrained(model_args.model_name_or_path)
    dataset = LlavaSupervisedDataset(data_path, image_folder, processor.tokenizer, processor.image_processor, config,
                                     get_template(model_args.version), train.model_max_length,
                                     data_args.image_aspect_ratio)
    if max_samples is not None and len(dataset) > max_samples:
        dataset = Subset(dataset, range(max_samples))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False,
                      collate_fn=LlavaCollator(processor.tokenizer.pad_token_id))


def _to_model(batch: dict, model) -> dict:
    """The batch on the model's device; images in the vision tower's dtype."""
    param = next(p for p in model.parameters() if p.is_floating_point())
    out = {}
    for key, value in batch.items():
        if key == "pixel_values":
            value = value.to(param.device, param.dtype)
        elif isinstance(value, torch.Tensor):
            value = value.to(param.device)
        out[key] = value
    return out


def _to_training_device(model, run) -> None:
    """The device training will use (a quantised base is already placed there; it cannot be moved)."""
    device = run.training_args.device
    if device.type != "cpu" and next(model.parameters()).device.type == "cpu":
        model.to(device)


def preprocess_corda(model, config, run) -> None:
    """PEFT's `preprocess_corda` with a callback feeding the first --corda_samples samples of --corda_data."""
    try:
        from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda
    except ImportError as err:  # PEFT's corda.py imports `attr` (the attrs package) without declaring it
        raise UserError(f"--init_lora_weights corda: PEFT's CorDA cannot be imported ({err}); "
                        "pip install attrs") from None

    train = run.training_args
    # one sample per forward: PEFT's covariance hook takes [1, tokens, dim] inputs (and no padding enters it)
    loader = make_loader(run, train.corda_data, train.corda_image_folder or run.data_args.image_folder, 1,
                         train.corda_samples)
    _to_training_device(model, run)

    @torch.no_grad()
    def run_model():
        was_training = model.training
        model.eval()
        for batch in loader:
            batch = _to_model(batch, model)
            batch.pop("labels", None)
            model(**batch)
        model.train(was_training)

    print(f"corda ({train.corda_method}): layer-input covariances over {len(loader.dataset)} samples of "
          f"{train.corda_data}")
    peft_preprocess_corda(model, config, run_model=run_model)


# EVA is declared not converging after this many batches (or passes over the data, whichever is more); a small
# dataset is cycled over: the tiny test data (3-12 batches a pass) converges in 26-45 batches
EVA_MAX_BATCHES, EVA_MAX_PASSES = 1000, 5


class _EvaStopped(Exception):
    pass


def eva_tokens(batch: dict, use_label_mask: bool = True) -> torch.Tensor:
    """Per sample, the tokens PEFT's EVA takes into its SVD (`prepare_model_inputs_fn_language_modeling`):
    attended positions, with the label mask the supervised (answer) positions only."""
    mask = batch["attention_mask"].bool()
    if use_label_mask:
        mask = mask & (batch["labels"] != -100)
    return mask.sum(dim=1)


def eva_batch_size(requested: int, train_batch_size: int, n_components: int, tokens_per_sample: list[int]) -> int:
    """EVA's batch size.  PEFT runs an incremental SVD per batch and SKIPS a batch holding fewer than
    n_components (= round(rho r)) tokens; when every batch is skipped its loop over the data never ends.  Short
    answers (IconQA's one letter: ~2 label tokens per sample) hit that at LLaVA's batch size 16 from rank 16 on.
    Auto (requested 0): the training batch size, raised until even a batch of the fewest-token samples seen
    holds n_components tokens."""
    if requested > 0:
        return requested
    fewest = max(1, min(tokens_per_sample)) if tokens_per_sample else 1
    return max(train_batch_size, -(-n_components // fewest))


def initialize_eva(peft_model, run) -> None:
    """PEFT's `initialize_lora_eva_weights` over the training set (in file order; batch size `eva_batch_size`),
    stopped with a clear error where PEFT would loop forever."""
    from peft import initialize_lora_eva_weights

    train = run.training_args
    config = peft_model.peft_config[peft_model.active_adapter]
    eva = config.eva_config
    n_components = round(config.r * eva.rho)
    probe = make_loader(run, run.data_args.data_path, run.data_args.image_folder, train.per_device_train_batch_size)
    tokens = eva_tokens(next(iter(probe)), eva.use_label_mask).tolist()
    batch_size = eva_batch_size(getattr(train, "eva_batch_size", 0), train.per_device_train_batch_size, n_components,
                                tokens)
    loader = probe
    if batch_size != probe.batch_size:  # the same dataset and collator, read once
        from torch.utils.data import DataLoader

        loader = DataLoader(probe.dataset, batch_size=batch_size, shuffle=False, collate_fn=probe.collate_fn)
    print(f"eva: SVD of the layer inputs, {n_components} components (rank {config.r} x rho {eva.rho:g}) over "
          f"batches of {batch_size} (fewest {'label ' if eva.use_label_mask else ''}tokens per sample in the "
          f"first batch: {min(tokens) if tokens else 0})")
    _to_training_device(peft_model, run)
    calls = {"forward": 0, "usable": 0}
    limit = max(EVA_MAX_BATCHES, EVA_MAX_PASSES * len(loader))

    def forward(model, inputs):
        calls["forward"] += 1
        calls["usable"] += int(eva_tokens(inputs, eva.use_label_mask).sum()) >= n_components
        if calls["forward"] > len(loader) and not calls["usable"]:
            raise _EvaStopped(f"--init_lora_weights eva: no batch of batch size {batch_size} holds the "
                              f"{n_components} tokens PEFT's SVD needs per batch (rank {config.r} x rho {eva.rho:g}); "
                              "pass a larger --eva_batch_size or a smaller --lora_r")
        if calls["forward"] > limit:
            raise _EvaStopped(f"--init_lora_weights eva: the SVD did not converge within {limit} batches of "
                              f"{batch_size} ({limit / len(loader):.0f} passes over the {len(loader.dataset)} training "
                              f"samples; tau {eva.tau}); use a larger --eva_batch_size or another --init_lora_weights")
        inputs = _to_model(inputs, model)
        inputs.pop("labels", None)  # the label mask is PEFT's (prepare_model_inputs_fn); no loss needed
        return model(**inputs)

    was_training = peft_model.training
    peft_model.eval()
    try:
        with torch.no_grad():
            initialize_lora_eva_weights(peft_model, loader, forward_fn=forward, gather_distributed_inputs=False,
                                        show_progress_bar=False)
    except _EvaStopped as err:
        raise UserError(str(err)) from None
    peft_model.train(was_training)


# ---------------------------------------------------------------------------------------------- saving


def save_initial_adapter(peft_model, run) -> str:
    """RUN_DIR/initial_lora_adapter: the adapter as initialised (PEFT needs it to convert every save)."""
    path = os.path.join(os.path.abspath(run.training_args.output_dir), INITIAL_ADAPTER_DIR)
    if run.training_args.process_index == 0:
        peft_model.save_pretrained(path)
    run.extras[INITIAL_ADAPTER_KEY] = path
    return path


def save_converted_adapter(peft_model, output_dir: str, initial_dir: str, state_dict=None) -> None:
    """The trained adapter converted to a plain LoRA of the original base (PEFT), plus the adapter's non-LoRA
    tensors PEFT's conversion leaves out, plus the unconverted adapter (for resuming)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    full = {k: v.detach().cpu().contiguous()
            for k, v in get_peft_model_state_dict(peft_model, state_dict=state_dict).items()}
    import warnings

    with warnings.catch_warnings():  # PEFT warns about the base-changing init while it converts it away
        warnings.filterwarnings("ignore", message=r".*changes the base weights of the model.*")
        warnings.filterwarnings("ignore", message=r".*corda_config. specified but will be ignored.*")
        peft_model.save_pretrained(output_dir, state_dict=state_dict,
                                   path_initial_model_for_weight_conversion=initial_dir)
    config_path = os.path.join(output_dir, "adapter_config.json")  # a plain LoRA now: no CorDA settings left
    with open(config_path) as f:
        config = json.load(f)
    if config.get("corda_config") is not None:
        config["corda_config"] = None
        with open(config_path + ".tmp", "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        os.replace(config_path + ".tmp", config_path)
    weights = os.path.join(output_dir, "adapter_model.safetensors")
    converted = load_file(weights)
    for key, value in full.items():
        if key not in converted and "lora_A" not in key and "lora_B" not in key:
            converted[key] = value
    save_file(converted, weights + ".tmp", metadata={"format": "pt"})
    os.replace(weights + ".tmp", weights)
    save_file(full, os.path.join(output_dir, UNCONVERTED_ADAPTER_FILE + ".tmp"))
    os.replace(os.path.join(output_dir, UNCONVERTED_ADAPTER_FILE + ".tmp"),
               os.path.join(output_dir, UNCONVERTED_ADAPTER_FILE))


def load_unconverted_adapter(peft_model, checkpoint_dir: str) -> bool:
    """Resuming a run with a base-changing init: its unconverted adapter into the re-initialised model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = os.path.join(checkpoint_dir, UNCONVERTED_ADAPTER_FILE)
    if not os.path.isfile(path):
        return False
    result = set_peft_model_state_dict(peft_model, load_file(path))
    if result.unexpected_keys:
        raise UserError(f"{path}: adapter keys do not match this model ({result.unexpected_keys[:2]})")
    return True
