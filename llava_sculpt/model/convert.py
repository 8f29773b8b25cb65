"""Convert an original LLaVA-1.5 checkpoint (`LlavaLlamaForCausalLM`, haotian-liu/LLaVA layout) into a
Hugging Face `LlavaForConditionalGeneration` checkpoint (the llava-hf/llava-1.5-7b-hf layout).

    llava-sculpt convert --model-path LLAVA_DIR --output-dir OUT [--vision-tower CLIP_DIR]
                         [--dtype float16|bfloat16|float32]

Weight mapping (original key -> Hugging Face module; `i` = decoder layer):

    model.embed_tokens.weight                 language_model.embed_tokens.weight   (rows resized, see below)
    model.layers.{i}.<...>                    language_model.layers.{i}.<...>       (copied)
    model.norm.weight                         language_model.norm.weight
    lm_head.weight                            lm_head.weight                        (rows resized)
    model.mm_projector.0.{weight,bias}        multi_modal_projector.linear_1        (mlp2x_gelu: Linear, GELU,
    model.mm_projector.2.{weight,bias}        multi_modal_projector.linear_2         Linear)
    vision_model.<...> (the CLIP tower dir)   vision_tower.<...>
    model.vision_tower.vision_tower.vision_model.<...> (if the LLaVA weights carry the tower: preferred)

Vocabulary.  LLaVA's tokenizer has no `<image>` token (the image goes in at placeholder id -200 at run time);
Hugging Face Llava needs one.  Like llava-hf we append `<image>` and then `<pad>` (only when the tokenizer has no
pad token, or pads with `<unk>` as LLaVA's training code does) as special tokens, and pad the embedding matrix
and lm_head to a multiple of 64 rows.  Every original row is copied bit for bit; every new row (the added tokens
and the padding) is the mean of the rows the original tokenizer uses, computed in float64.  This is the
deterministic version of the "initialise new embeddings at the mean" rule (Hewitt 2021, "Initializing New Word
Embeddings for Pretrained Language Models"); llava-hf's own script samples around that mean instead.  New
lm_head rows at the mean give the new tokens an average logit, so they are never favoured by greedy decoding.

LLaVA flags that Hugging Face Llava cannot express (`image_aspect_ratio`, `mm_use_im_start_end`, ...) are written
to `OUT/llava_sculpt_convert.json`; `read_convert_flags(OUT)` returns them (training/eval honour
`image_aspect_ratio == "pad"`).  Reading never unpickles objects: `.bin` shards go through
`torch.load(weights_only=True)`.  The output is built in a temporary directory beside OUT and renamed at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch

from llava_sculpt.atomic import give_normal_modes, make_temp_dir
from llava_sculpt.errors import UserError, run_cli

FLAGS_FILE = "llava_sculpt_convert.json"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
VOCAB_MULTIPLE = 64  # llava-hf pads 32002 -> 32064 rows
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SELECT_STRATEGY = {"patch": "default", "cls_patch": "full"}  # LLaVA mm_vision_select_feature -> HF strategy
# Llama fields of the original config.json that become the HF text_config.
LLAMA_FIELDS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings",
                "rope_theta", "rope_scaling", "rope_parameters", "attention_bias", "attention_dropout", "mlp_bias",
                "initializer_range", "pretraining_tp", "bos_token_id", "eos_token_id", "tie_word_embeddings",
                "use_cache")
# Buffers some checkpoints carry that are recomputed at load time.
_IGNORED = re.compile(r"(\.rotary_emb\.inv_freq|embeddings\.position_ids)$")
# Parts of a full CLIPModel checkpoint that LLaVA never uses (the text side of CLIP).
_CLIP_TEXT_SIDE = re.compile(r"^(text_model\.|text_projection\.|visual_projection\.|logit_scale$)")
_TOWER_IN_LLAVA = "model.vision_tower.vision_tower."


# ----------------------------------------------------------------------------------------------- reading
def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint directory, safetensors preferred, shards in index order."""
    for index_name, single, pattern in (("model.safetensors.index.json", "model.safetensors", "model*.safetensors"),
                                        ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin")):
        index = model_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise UserError(f"{index}: cannot read the shard index ({err}); expected JSON with a "
                                f"'weight_map' object mapping each weight name to a shard file.") from err
            files = list(dict.fromkeys(model_dir / name for name in weight_map.values()))
            for f in files:
                if not f.is_file():
                    raise UserError(f"{index} lists the shard {f.name}, which does not exist in {model_dir}.")
            return files
        if (model_dir / single).is_file():
            return [model_dir / single]
        found = sorted(model_dir.glob(pattern))
        if found:
            return found
    return []


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one weight file.  `.bin` files are read with `weights_only=True`, so a file that
    holds anything but tensors/containers is rejected before any of its code can run."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except Exception as err:  # noqa: BLE001 - SafetensorError is not an OSError subclass
            raise UserError(f"{path}: cannot read this safetensors file ({type(err).__name__}: {err}).") from err
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError, OSError, EOFError ...
        raise UserError(f"{path}: refused or unreadable as a weights-only PyTorch file ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}). Only plain dicts of tensors are "
                        f"loaded; pickled Python objects are never executed.") from err
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a dict of name -> tensor, found {type(state).__name__}.")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"{path}: entry {key!r} is a {type(value).__name__}, expected a tensor.")
    yield from state.items()


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise UserError(f"{path} does not exist.") from err
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read JSON ({err}).") from err
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(data).__name__}.")
    return data


# --------------------------------------------------------------------------------------- key mapping
def map_llava_key(key: str) -> str | None:
    """Original LLaVA weight name -> HF Llava module name (vision tower keys get the 'tower:' prefix and are
    resolved later).  None = not a weight we know."""
    if key.startswith(_TOWER_IN_LLAVA):
        rest = key[len(_TOWER_IN_LLAVA):]
        return "tower:" + rest.removeprefix("vision_model.")
    if key == "lm_head.weight":
        return "lm_head.weight"
    m = re.fullmatch(r"model\.mm_projector\.([02])\.(weight|bias)", key)
    if m:
        return f"model.multi_modal_projector.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"
    if key == "model.embed_tokens.weight" or key == "model.norm.weight" or key.startswith("model.layers."):
        return "model.language_model." + key[len("model."):]
    return None


# ------------------------------------------------------------------------------------------ vocabulary
def resize_vocab_rows(weight: torch.Tensor, num_rows: int, used_rows: int,
                      new_token_ids: Sequence[int]) -> torch.Tensor:
    """[V_old, d] -> [num_rows, d]: rows 0..V_old-1 copied exactly; rows >= V_old and the rows of `new_token_ids`
    set to the float64 mean of rows 0..used_rows-1 (the rows the original tokenizer can produce)."""
    old_rows, dim = weight.shape
    mean = weight[:used_rows].to(torch.float64).mean(dim=0).to(weight.dtype)  # [d]
    out = mean.expand(num_rows, dim).clone()
    out[:old_rows] = weight
    for i in new_token_ids:
        out[i] = mean
    return out


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    has_json = (model_dir / "tokenizer.json").is_file()
    if not has_json and (model_dir / "tokenizer.model").is_file():
        import importlib.util
        if importlib.util.find_spec("sentencepiece") is None and importlib.util.find_spec("google.protobuf") is None:
            raise UserError(f"{model_dir / 'tokenizer.model'}: this is a SentencePiece tokenizer and neither "
                            f"'sentencepiece' nor 'protobuf' is installed, so it cannot be read. Install one of "
                            f"them (pip install sentencepiece), or put a tokenizer.json of the same tokenizer in "
                            f"{model_dir}.")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer warns that model_type 'llava_llama' is unknown: expected here
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as err:  # noqa: BLE001 - transformers raises many types here
        raise UserError(f"{model_dir}: cannot load the tokenizer ({type(err).__name__}: {err}); expected "
                        f"tokenizer.json or tokenizer.model with tokenizer_config.json.") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    for key in ("is_local", "local_files_only"):  # loading details, not tokenizer settings: keep them out of OUT
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


def add_llava_tokens(tokenizer) -> list[int]:
    """Append `<image>` and (if needed) `<pad>` as special tokens; return the ids of tokens that were added."""
    from tokenizers import AddedToken

    before = len(tokenizer)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if hasattr(tokenizer, "_set_model_specific_special_tokens"):  # exposes tokenizer.image_token like llava-hf
        tokenizer._set_model_specific_special_tokens({"image_token": IMAGE_TOKEN})
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.unk_token:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return list(range(before, len(tokenizer)))


# ---------------------------------------------------------------------------------------- vision tower
def resolve_vision_tower(cfg: dict, model_dir: Path, vision_tower: str | None) -> Path:
    if vision_tower is not None:
        path = Path(vision_tower)
        if not (path / "config.json").is_file():
            raise UserError(f"--vision-tower {vision_tower}: expected a directory with a CLIP config.json "
                            f"(a CLIPVisionModel or CLIPModel checkpoint), found none.")
        return path
    name = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    if not name:
        raise UserError(f"{model_dir / 'config.json'}: no 'mm_vision_tower' field; pass --vision-tower DIR with "
                        f"the local CLIP-ViT checkpoint the model was trained with.")
    for candidate in (Path(name), model_dir / name):
        if (candidate / "config.json").is_file():
            return candidate
    raise UserError(f"{model_dir / 'config.json'}: mm_vision_tower is {name!r}, which is not a local directory "
                    f"with a config.json. This machine has no network, so a Hub name cannot be downloaded: pass "
                    f"--vision-tower DIR with a local copy of that CLIP-ViT checkpoint (config.json, weights and "
                    f"preprocessor_config.json; e.g. openai/clip-vit-large-patch14-336 for LLaVA-1.5).")


def load_vision_config(tower_dir: Path):
    from transformers import CLIPVisionConfig

    raw = read_json(tower_dir / "config.json")
    if raw.get("model_type") not in ("clip", "clip_vision_model"):
        raise UserError(f"{tower_dir / 'config.json'}: model_type is {raw.get('model_type')!r}; LLaVA-1.5 uses a "
                        f"CLIP-ViT tower ('clip' or 'clip_vision_model').")
    try:
        return CLIPVisionConfig.from_pretrained(str(tower_dir), local_files_only=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{tower_dir / 'config.json'}: not a readable CLIP vision config ({err}).") from err


def build_image_processor(tower_dir: Path, image_size: int):
    """CLIP preprocessing from the tower's preprocessor_config.json, else CLIP defaults at the tower's size."""
    from transformers import CLIPImageProcessorPil

    if (tower_dir / "preprocessor_config.json").is_file():
        try:
            proc = CLIPImageProcessorPil.from_pretrained(str(tower_dir), local_files_only=True)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"{tower_dir / 'preprocessor_config.json'}: cannot read it ({err}).") from err
    else:
        proc = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                     crop_size={"height": image_size, "width": image_size})
    crop = proc.crop_size if proc.do_center_crop else None
    if crop is not None and (crop.get("height"), crop.get("width")) != (image_size, image_size):
        raise UserError(f"{tower_dir / 'preprocessor_config.json'}: crop_size {crop} does not match the tower's "
                        f"image_size {image_size}.")
    return proc


# ----------------------------------------------------------------------------------------------- config
def check_llava_config(cfg: dict, config_path: Path) -> dict:
    """Validate the LLaVA fields; return the flags HF Llava cannot express (written to FLAGS_FILE)."""
    if "text_config" in cfg or "vision_config" in cfg:
        raise UserError(f"{config_path}: this is already a Hugging Face Llava config (it has text_config/"
                        f"vision_config); load it directly, there is nothing to convert.")
    if not any(k.startswith("mm_") for k in cfg):
        raise UserError(f"{config_path}: model_type is {cfg.get('model_type')!r} and there are no mm_* fields; "
                        f"expected an original LLaVA checkpoint (LlavaLlamaForCausalLM, model_type 'llava_llama' "
                        f"or 'llava', with mm_vision_tower, mm_projector_type, ...).")
    projector = cfg.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise UserError(f"{config_path}: mm_projector_type is {projector!r}; Hugging Face Llava represents only "
                        f"the 'mlp2x_gelu' projector (Linear, GELU, Linear) of LLaVA-1.5.")
    if cfg.get("mm_use_im_start_end"):
        raise UserError(f"{config_path}: mm_use_im_start_end is true; image start/end tokens are not supported by "
                        f"Hugging Face Llava or by llava-sculpt (LLaVA-1.5 uses false).")
    feature = cfg.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_STRATEGY:
        raise UserError(f"{config_path}: mm_vision_select_feature is {feature!r}; expected 'patch' or 'cls_patch'.")
    aspect = cfg.get("image_aspect_ratio", "square")
    if aspect not in ("pad", "square", None):
        raise UserError(f"{config_path}: image_aspect_ratio is {aspect!r}; LLaVA-1.5 supports 'pad' or 'square' "
                        f"('anyres' is LLaVA-NeXT, not convertible to Hugging Face Llava).")
    if cfg.get("mm_patch_merge_type", "flat") != "flat":
        raise UserError(f"{config_path}: mm_patch_merge_type is {cfg['mm_patch_merge_type']!r}; only 'flat' "
                        f"(LLaVA-1.5) is convertible.")
    if cfg.get("mm_use_im_patch_token"):
        warnings.warn(f"{config_path}: mm_use_im_patch_token is true; the <im_patch> token stays an ordinary "
                      f"token of the tokenizer (it is unused when mm_use_im_start_end is false).")
    return {
        "image_aspect_ratio": aspect or "square",
        "mm_use_im_start_end": bool(cfg.get("mm_use_im_start_end", False)),
        "mm_use_im_patch_token": bool(cfg.get("mm_use_im_patch_token", False)),
        "mm_vision_select_feature": feature,
        "mm_vision_select_layer": int(cfg.get("mm_vision_select_layer", -2)),
        "mm_projector_type": projector,
        "tokenizer_model_max_length": cfg.get("tokenizer_model_max_length"),
        "tokenizer_padding_side": cfg.get("tokenizer_padding_side"),
    }


def pick_dtype(cfg: dict, dtype: str | None) -> torch.dtype:
    if dtype is not None:
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}.")
        return DTYPES[dtype]
    stored = cfg.get("torch_dtype") or cfg.get("dtype")
    return DTYPES.get(str(stored).removeprefix("torch."), torch.float32)


# ------------------------------------------------------------------------------------------- conversion
def _collect(files: Sequence[Path], mapper, target_shapes: dict, state: dict, dtype: torch.dtype,
             where: dict, resize: dict) -> None:
    """Stream `files` one by one into `state` (HF name -> tensor in `dtype`), checking names and shapes."""
    for path in files:
        for key, tensor in iter_tensors(path):
            if _IGNORED.search(key):
                continue
            name = mapper(key, path)
            if name is None:
                continue
            if name in state:
                raise UserError(f"{path}: weight {key!r} also appears in {where[name]}.")
            if name not in target_shapes:
                raise UserError(f"{path}: unexpected weight {key!r} (no place for it in a Hugging Face Llava model "
                                f"built from this config).")
            if name in resize:
                tensor = resize[name](tensor, path, key)
            if tuple(tensor.shape) != target_shapes[name]:
                raise UserError(f"{path}: weight {key!r} has shape {tuple(tensor.shape)}, expected "
                                f"{target_shapes[name]} from the config files.")
            state[name] = tensor.to(dtype)
            where[name] = f"{path} ({key})"
        # the file's tensors are dropped here; only converted tensors are kept


def convert_llava_checkpoint(model_path: str | Path, output_dir: str | Path, vision_tower: str | Path | None = None,
                             dtype: str | torch.dtype | None = None) -> Path:
    """Convert an original LLaVA-1.5 checkpoint at `model_path` into a HF Llava checkpoint at `output_dir`
    (a new or empty directory).  Peak memory: the converted weights plus one input shard."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    model_dir, out = Path(model_path), Path(output_dir)
    config_path = model_dir / "config.json"
    cfg = read_json(config_path)
    flags = check_llava_config(cfg, config_path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--output-dir {out} already exists and is not empty; choose a new directory.")
    llava_files = checkpoint_files(model_dir)
    if not llava_files:
        raise UserError(f"{model_dir}: no weights found (expected model*.safetensors or pytorch_model*.bin, "
                        f"optionally with an index json).")
    target_dtype = pick_dtype(cfg, None if dtype is None else str(dtype).removeprefix("torch."))

    tower_dir = resolve_vision_tower(cfg, model_dir, None if vision_tower is None else str(vision_tower))
    vision_cfg = load_vision_config(tower_dir)
    if "mm_hidden_size" in cfg and int(cfg["mm_hidden_size"]) != vision_cfg.hidden_size:
        raise UserError(f"{config_path}: mm_hidden_size is {cfg['mm_hidden_size']} but the vision tower "
                        f"{tower_dir} has hidden_size {vision_cfg.hidden_size}: wrong --vision-tower?")
    image_processor = build_image_processor(tower_dir, vision_cfg.image_size)

    tokenizer = load_tokenizer(model_dir)
    used_rows = len(tokenizer)
    added_ids = add_llava_tokens(tokenizer)
    if flags["tokenizer_model_max_length"]:
        tokenizer.model_max_length = int(flags["tokenizer_model_max_length"])
    if flags["tokenizer_padding_side"] in ("left", "right"):
        tokenizer.padding_side = flags["tokenizer_padding_side"]
    image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    old_rows = int(cfg.get("vocab_size", used_rows))
    if used_rows > old_rows:
        raise UserError(f"{model_dir}: the tokenizer has {used_rows} tokens but config.json vocab_size is "
                        f"{old_rows}; tokenizer and weights do not belong together.")
    num_rows = max(old_rows, math.ceil(len(tokenizer) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE)

    text_fields = {k: cfg[k] for k in LLAMA_FIELDS if k in cfg}
    text_cfg = LlamaConfig(**{**text_fields, "vocab_size": num_rows, "pad_token_id": tokenizer.pad_token_id})
    strategy = SELECT_STRATEGY[flags["mm_vision_select_feature"]]
    num_patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
    config = LlavaConfig(vision_config=vision_cfg, text_config=text_cfg, image_token_index=image_token_index,
                         image_seq_length=num_patches + (1 if strategy == "full" else 0),
                         projector_hidden_act="gelu", vision_feature_layer=flags["mm_vision_select_layer"],
                         vision_feature_select_strategy=strategy, multimodal_projector_bias=True,
                         tie_word_embeddings=bool(text_cfg.tie_word_embeddings))
    config.pad_token_id = tokenizer.pad_token_id

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    target_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        target_shapes.pop("lm_head.weight", None)
    tower_prefix = ("model.vision_tower.vision_model." if any(k.startswith("model.vision_tower.vision_model.")
                                                                for k in target_shapes) else "model.vision_tower.")

    def resize(tensor: torch.Tensor, path: Path, key: str) -> torch.Tensor:
        if tensor.dim() != 2 or tensor.shape[0] != old_rows:
            raise UserError(f"{path}: weight {key!r} has shape {tuple(tensor.shape)}, expected ({old_rows}, "
                            f"hidden_size) from vocab_size in {config_path}.")
        return resize_vocab_rows(tensor, num_rows, used_rows, added_ids)

    resizers = {"model.language_model.embed_tokens.weight": resize, "lm_head.weight": resize}

    def llava_mapper(key: str, path: Path) -> str | None:
        name = map_llava_key(key)
        if name is None:
            raise UserError(f"{path}: unexpected weight {key!r}; expected LLaVA-1.5 language-model, mm_projector "
                            f"(mlp2x_gelu) or vision-tower weights.")
        return tower_prefix + name[len("tower:"):] if name.startswith("tower:") else name

    def tower_mapper(key: str, path: Path) -> str | None:
        if _CLIP_TEXT_SIDE.search(key):
            return None
        return tower_prefix + key.removeprefix("vision_model.")

    state: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    _collect(llava_files, llava_mapper, target_shapes, state, target_dtype, where, resizers)
    tower_keys = [k for k in target_shapes if k.startswith(tower_prefix)]
    if not any(k in state for k in tower_keys):  # the usual release: tower weights live in the CLIP dir
        tower_files = checkpoint_files(tower_dir)
        if not tower_files:
            raise UserError(f"{tower_dir}: no vision-tower weights (model*.safetensors or pytorch_model*.bin), "
                            f"and the LLaVA weights in {model_dir} do not contain the tower either.")
        _collect(tower_files, tower_mapper, target_shapes, state, target_dtype, where, {})
    missing = [k for k in target_shapes if k not in state]
    if missing:
        source = tower_dir if missing[0].startswith(tower_prefix) else model_dir
        raise UserError(f"{source}: missing weight(s) {', '.join(_source_name(k, tower_prefix) for k in missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''} ({len(missing)} in all).")

    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    del state
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_cfg.patch_size,
                               vision_feature_select_strategy=strategy, num_additional_image_tokens=1)
    flags.update({"source": str(model_dir.resolve()), "vision_tower": str(tower_dir.resolve()),
                  "original_vocab_size": old_rows, "original_tokenizer_size": used_rows,
                  "added_token_ids": added_ids, "vocab_size": num_rows, "new_rows_init": "mean",
                  "image_token_index": image_token_index, "pad_token_id": tokenizer.pad_token_id,
                  "dtype": str(target_dtype).removeprefix("torch.")})
    _write_atomically(out, model, processor, flags)
    return out


def _source_name(hf_name: str, tower_prefix: str) -> str:
    """HF module name -> the original key users would look for in their files."""
    if hf_name.startswith(tower_prefix):
        return "vision_model." + hf_name[len(tower_prefix):]
    if hf_name.startswith("model.multi_modal_projector.linear_"):
        layer = "0" if ".linear_1." in hf_name else "2"
        return f"model.mm_projector.{layer}.{hf_name.rsplit('.', 1)[1]}"
    return hf_name.replace("model.language_model.", "model.", 1)


def _write_atomically(out: Path, model, processor, flags: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(make_temp_dir(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        processor.save_pretrained(str(tmp))
        (tmp / FLAGS_FILE).write_text(json.dumps(flags, indent=2) + "\n")
        give_normal_modes(tmp)
        if out.is_dir():
            out.rmdir()  # empty (checked before); a non-empty dir would make rmdir fail rather than be replaced
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_convert_flags(model_dir: str | Path) -> dict | None:
    """The LLaVA flags saved by `convert` beside a converted checkpoint, or None if it was not converted here."""
    path = Path(model_dir) / FLAGS_FILE
    return read_json(path) if path.is_file() else None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llava-sculpt convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True, help="original LLaVA-1.5 checkpoint directory")
    p.add_argument("--output-dir", required=True, help="new directory for the Hugging Face checkpoint")
    p.add_argument("--vision-tower", default=None,
                   help="local CLIP-ViT checkpoint dir (default: config's mm_vision_tower if it is a local dir)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weight dtype of the output (default: the checkpoint's torch_dtype, else float32)")
    args = p.parse_args(argv)
    out = convert_llava_checkpoint(args.model_path, args.output_dir, args.vision_tower, args.dtype)
    print(f"converted {args.model_path} -> {out} (LlavaForConditionalGeneration + LlavaProcessor; "
          f"LLaVA flags in {out / FLAGS_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
