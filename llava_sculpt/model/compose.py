"""Assemble a LLaVA-1.5 checkpoint from a language model and a CLIP vision tower.

    llava-sculpt compose --language-model LM --vision-tower TOWER --output-dir OUT [--seed 0]
                         [--dtype float32|bfloat16|float16] [--overwrite]

LM is a local Hugging Face causal-LM folder (config.json, weights, a fast tokenizer) or a `.gguf` file, which
transformers reads with `from_pretrained(folder, gguf_file=name)` and dequantises to float32.  TOWER is a
`CLIPVisionModel` (or `CLIPModel`) folder, or a Hugging Face LLaVA checkpoint whose tower, image processor,
vision_feature_layer and vision_feature_select_strategy are taken.  OUT is a `LlavaForConditionalGeneration` +
`LlavaProcessor` checkpoint that `llava-sculpt train/generate/eval/merge` (and plain `from_pretrained`) load:

    vision tower    copied from TOWER; feature layer -2 and strategy "default" for a CLIP folder (LLaVA-1.5)
    projector       new `mlp2x_gelu`: linear_1 (tower hidden -> LM hidden), GELU, linear_2 (LM hidden -> LM
                    hidden), PyTorch's nn.Linear initialisation drawn from `--seed` (same seed: same bits)
    language model  copied from LM; `<image>` (one special token, config.image_token_id) and, when the LM has no
                    pad token (or pads with unk), `<pad>` are appended, and the embedding rows are padded to a
                    multiple of 64 as llava-hf does.  Every original row is copied bit for bit; every new row
                    (input embeddings and, when untied, lm_head) is the float64 mean of the rows the LM's
                    tokenizer uses (`convert.resize_vocab_rows`), so text-only logits on the LM's own tokens
                    are unchanged and every new token gets the mean row's logit.  Tied embeddings stay tied.

End of turn.  LLaVA-1.5's training ends each assistant turn with the tokenizer's eos token
(data/conversation.py `end_of_turn`).  When the LM's chat template ends an assistant turn with a special token
other than its eos (Llama-3: `<|eot_id|>`, a base Qwen2: `<|im_end|>`), that token becomes the tokenizer's eos
(and generation_config's), so the composed model learns to stop where its language model stops a turn.  An LM
with neither an eos token nor such a template token, or whose eos is not one registered token, is refused.

Provenance.  config.json gets a `"llava_sculpt_compose"` entry (source of each part, GGUF file, quantisation
type and sha256 when dequantised, end-of-turn choice, seed), and OUT/compose.json holds it too with every input
and setting.  Every input is checked (LM architecture a LLaVA can host, tower sizes, files readable) before
anything is written; OUT is built in a temporary folder beside it and renamed into place (atomic.atomic_dir).
An OUT already composed from the same inputs and settings is reused; a different one is refused unless
--overwrite.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from llava_sculpt.atomic import atomic_dir, write_json_atomic
from llava_sculpt.errors import UserError, run_cli

COMPOSE_FILE = "compose.json"
CONFIG_KEY = "llava_sculpt_compose"
FORMAT_VERSION = 1  # bump when the same inputs would compose a different checkpoint
VOCAB_MULTIPLE = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CLIP_VISION_TYPES = ("clip", "clip_vision_model")
LM_FLAG, TOWER_FLAG = "--language-model", "--vision-tower"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_fingerprint(folder: Path) -> list[list]:
    """[name, size, mtime_ns] of every file directly in `folder`: cheap, and changes when a file does."""
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.iterdir()) if p.is_file()]


# ------------------------------------------------------------------------------------------ language model
@dataclass
class LanguageModelSource:
    """Where the LM comes from: a folder, or `gguf_file` inside `folder`."""
    path: Path
    folder: Path
    gguf_file: str | None = None
    record: dict = field(default_factory=dict)  # provenance, written to compose.json and config.json

    @property
    def load_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    @property
    def tokenizer_file(self) -> Path:
        """The file to name in tokenizer errors."""
        if self.gguf_file:
            return self.path
        for name in ("tokenizer_config.json", "tokenizer.json"):
            if (self.folder / name).is_file():
                return self.folder / name
        return self.folder


def read_gguf_header(path: Path) -> dict:
    """Architecture, file type and tensor types of a GGUF file (gguf.GGUFReader; reads the header only)."""
    try:
        import gguf
    except ImportError:
        raise UserError(f"{LM_FLAG} {path}: reading a GGUF file needs the gguf package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(path))
        fields = {name: reader.fields[name].contents() for name in ("general.architecture", "general.file_type")
                  if name in reader.fields}
        tensor_types: dict[str, int] = {}
        for tensor in reader.tensors:
            tensor_types[tensor.tensor_type.name] = tensor_types.get(tensor.tensor_type.name, 0) + 1
    except Exception as err:  # noqa: BLE001 - a corrupt file raises ValueError, struct.error, IndexError ...
        raise UserError(f"{LM_FLAG} {path}: not a readable GGUF file ({type(err).__name__}: {err})") from None
    file_type = fields.get("general.file_type")
    try:
        file_type_name = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        file_type_name = str(file_type)
    return {"architecture": fields.get("general.architecture"), "file_type": file_type_name,
            "tensor_types": dict(sorted(tensor_types.items()))}


def resolve_language_model(path: str) -> LanguageModelSource:
    lm = Path(path)
    if lm.is_file():
        if lm.suffix.lower() != ".gguf":
            raise UserError(f"{LM_FLAG} {path}: a file, but not a .gguf; expected a Hugging Face causal-LM folder "
                            "(config.json, weights, tokenizer) or a .gguf file")
        header = read_gguf_header(lm)
        record = {"kind": "gguf", "path": str(lm.resolve()), "gguf_file": lm.name, "sha256": sha256_file(lm),
                  "dequantised_from_gguf": True, "dequantised_to": "float32", **header}
        return LanguageModelSource(lm, lm.parent, lm.name, record)
    if not lm.is_dir():
        raise UserError(f"{LM_FLAG} {path}: no such file or folder; expected a Hugging Face causal-LM folder or a "
                        ".gguf file")
    if not (lm / "config.json").is_file():
        raise UserError(f"{LM_FLAG} {path}: no config.json; expected a Hugging Face causal-LM folder (config.json, "
                        "weights, tokenizer) or a .gguf file")
    return LanguageModelSource(lm, lm, None, {"kind": "folder", "path": str(lm.resolve()),
                                              "files": folder_fingerprint(lm)})


def load_lm_config(src: LanguageModelSource):
    """The LM's config, refused when a LLaVA cannot host it (encoder-decoder, not a causal LM, no AutoModel)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    where = src.path if src.gguf_file else src.folder / "config.json"
    try:
        config = AutoConfig.from_pretrained(str(src.folder), local_files_only=True, **src.load_kwargs)
    except Exception as err:  # noqa: BLE001 - unknown model_type, bad JSON, unsupported GGUF architecture ...
        raise UserError(f"{LM_FLAG} {where}: transformers cannot read this config ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"{LM_FLAG} {where}: model_type {model_type!r} is an encoder-decoder; a LLaVA hosts a "
                        "decoder-only causal language model (Llama, Qwen2, Mistral, SmolLM2, ...)")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or type(config) not in MODEL_MAPPING:
        raise UserError(f"{LM_FLAG} {where}: model_type {model_type!r} is not a causal language model that "
                        "AutoModelForCausalLM and AutoModel both build, which a LLaVA needs to host it")
    return config


def check_hostable(config, where) -> None:
    """A LLaVA builds its LM as AutoModel(text_config) + its own lm_head: the causal LM must be exactly that
    (same parameter names and shapes in its base model, one output projection)."""
    from transformers import AutoModel, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            causal = AutoModelForCausalLM.from_config(config)
            base = AutoModel.from_config(config)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{LM_FLAG} {where}: transformers cannot build this model ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    inner = causal.base_model
    own = {k: tuple(v.shape) for k, v in inner.state_dict().items()}
    hosted = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    head = causal.get_output_embeddings()
    extra = set(causal.state_dict()) - {f"{causal.base_model_prefix}.{k}" for k in own} - {"lm_head.weight"}
    if inner is causal or own != hosted or head is None or head.bias is not None or extra:
        raise UserError(f"{LM_FLAG} {where}: {type(causal).__name__} is not a {type(base).__name__} plus one "
                        "bias-free lm_head, the layout LlavaForConditionalGeneration hosts")


def load_language_model(src: LanguageModelSource):
    from transformers import AutoModelForCausalLM

    where = src.path if src.gguf_file else src.folder
    try:
        model = AutoModelForCausalLM.from_pretrained(str(src.folder), dtype=torch.float32, local_files_only=True,
                                                     **src.load_kwargs)
    except Exception as err:  # noqa: BLE001 - missing/corrupt weights raise many types
        raise UserError(f"{LM_FLAG} {where}: cannot load the language model's weights ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return model.eval()


def load_lm_tokenizer(src: LanguageModelSource):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.folder), local_files_only=True, **src.load_kwargs)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{LM_FLAG} {src.tokenizer_file}: cannot load the tokenizer ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"{LM_FLAG} {src.tokenizer_file}: {type(tokenizer).__name__} is a slow tokenizer; LLaVA "
                        "training needs a fast one (character offsets): add the tokenizer.json of the same tokenizer")
    for key in ("is_local", "local_files_only", "gguf_file"):  # loading details, not tokenizer settings
        tokenizer.init_kwargs.pop(key, None)
    return tokenizer


# ------------------------------------------------------------------------------------------------ end of turn
def template_end_of_turn(tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant message, or None (no template, or
    the template ends a turn with plain text)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    answer = "Paris is the capital."
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"},
                                              {"role": "assistant", "content": answer}], tokenize=False)
    except Exception:  # noqa: BLE001 - templates may refuse this conversation; then there is nothing to learn
        return None
    if not isinstance(text, str) or answer not in text:
        return None
    after = text[text.rindex(answer) + len(answer):]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    special = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return tokenizer.convert_ids_to_tokens(ids[0]) if ids[0] in special else None


def choose_end_of_turn(tokenizer, src: LanguageModelSource) -> dict:
    """Make the tokenizer's eos the token that ends an assistant turn; return the record of the choice."""
    from llava_sculpt.data.conversation import VICUNA_V1, end_of_turn

    eos = tokenizer.eos_token
    from_template = template_end_of_turn(tokenizer)
    if from_template is None and not eos:
        raise UserError(f"{LM_FLAG} {src.tokenizer_file}: the tokenizer has no eos token and no chat template that "
                        "ends an assistant turn with a special token, so LLaVA training has no token to end each "
                        "answer with; use an instruction-tuned LM or set eos_token in its tokenizer_config.json")
    chosen = from_template or eos
    if chosen != eos:
        tokenizer.eos_token = chosen
    try:
        end_of_turn(VICUNA_V1, tokenizer)
    except UserError as err:
        raise UserError(f"{LM_FLAG} {src.tokenizer_file}: {err}") from None
    return {"token": chosen, "id": tokenizer.eos_token_id, "original_eos": eos,
            "chat_template_end_of_turn": from_template,
            "reason": ("the chat template ends assistant turns with it; it replaces the eos for LLaVA training and "
                       "generation" if chosen != eos else
                       "the tokenizer's eos" + (", which the chat template also ends assistant turns with"
                                                if from_template else " (no chat template end-of-turn token)"))}


# ----------------------------------------------------------------------------------------------- vision tower
@dataclass
class TowerSource:
    path: Path
    kind: str  # "clip" | "llava"
    vision_config: Any
    feature_layer: int | list[int]
    strategy: str
    image_processor: Any
    record: dict


def resolve_tower(path: str) -> TowerSource:
    """Read the tower's config and image processor (weights later), checking its sizes."""
    from llava_sculpt.model.convert import build_image_processor, read_json

    tower = Path(path)
    config_path = tower / "config.json"
    if not config_path.is_file():
        raise UserError(f"{TOWER_FLAG} {path}: no config.json; expected a CLIPVisionModel folder or a Hugging Face "
                        "LLaVA checkpoint")
    raw = read_json(config_path)
    record = {"path": str(tower.resolve()), "files": folder_fingerprint(tower)}
    if raw.get("model_type") == "llava":
        from transformers import AutoImageProcessor, LlavaConfig

        try:
            config = LlavaConfig.from_pretrained(str(tower), local_files_only=True)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"{TOWER_FLAG} {config_path}: not a readable LLaVA config ({err})") from None
        vision = config.vision_config
        try:
            image_processor = AutoImageProcessor.from_pretrained(str(tower), local_files_only=True)
        except Exception as err:  # noqa: BLE001
            raise UserError(f"{TOWER_FLAG} {tower}: cannot load its image processor ({err})") from None
        source = TowerSource(tower, "llava", vision, config.vision_feature_layer,
                             config.vision_feature_select_strategy, image_processor, {"kind": "llava", **record})
    elif raw.get("model_type") in CLIP_VISION_TYPES:
        from llava_sculpt.model.convert import load_vision_config

        try:
            vision = load_vision_config(tower)
        except UserError as err:
            raise UserError(f"{TOWER_FLAG} {err}") from None
        source = TowerSource(tower, "clip", vision, -2, "default", None, {"kind": "clip", **record})
    else:
        raise UserError(f"{TOWER_FLAG} {config_path}: model_type is {raw.get('model_type')!r}; expected a CLIP vision "
                        f"tower ({' or '.join(map(repr, CLIP_VISION_TYPES))}) or a LLaVA checkpoint ('llava')")
    check_tower_sizes(source, config_path)
    if source.image_processor is None:
        try:
            source.image_processor = build_image_processor(tower, vision.image_size)
        except UserError as err:
            raise UserError(f"{TOWER_FLAG} {err}") from None
    return source


def check_tower_sizes(src: TowerSource, config_path: Path) -> None:
    vision = src.vision_config
    if getattr(vision, "model_type", None) != "clip_vision_model":
        raise UserError(f"{TOWER_FLAG} {config_path}: its vision tower is {getattr(vision, 'model_type', None)!r}; "
                        "LLaVA-1.5 uses a CLIP vision tower (clip_vision_model)")
    sizes = {k: getattr(vision, k, None) for k in ("image_size", "patch_size", "hidden_size", "num_hidden_layers")}
    if not all(isinstance(v, int) and v > 0 for v in sizes.values()):
        raise UserError(f"{TOWER_FLAG} {config_path}: vision sizes {sizes} must all be positive integers")
    if sizes["image_size"] % sizes["patch_size"]:
        raise UserError(f"{TOWER_FLAG} {config_path}: image_size {sizes['image_size']} is not a multiple of "
                        f"patch_size {sizes['patch_size']}")
    layers = src.feature_layer if isinstance(src.feature_layer, list) else [src.feature_layer]
    n = sizes["num_hidden_layers"]
    if any(not isinstance(layer, int) or not -n - 1 <= layer <= n for layer in layers):
        raise UserError(f"{TOWER_FLAG} {config_path}: vision_feature_layer {src.feature_layer} is outside the tower's "
                        f"{n} layers (hidden states -{n + 1} .. {n})")
    if src.strategy not in ("default", "full"):
        raise UserError(f"{TOWER_FLAG} {config_path}: vision_feature_select_strategy {src.strategy!r}; expected "
                        "'default' or 'full'")


def load_tower_state(src: TowerSource) -> dict[str, torch.Tensor]:
    """The tower's weights, named as `CLIPVisionModel.state_dict()` (the LLaVA's model.vision_tower.*)."""
    try:
        if src.kind == "llava":
            from transformers import LlavaForConditionalGeneration

            llava = LlavaForConditionalGeneration.from_pretrained(str(src.path), dtype=torch.float32,
                                                                  local_files_only=True)
            return {k: v.detach().clone() for k, v in llava.model.vision_tower.state_dict().items()}
        from transformers import CLIPVisionModel

        tower = CLIPVisionModel.from_pretrained(str(src.path), config=src.vision_config, dtype=torch.float32,
                                                local_files_only=True)
        return tower.state_dict()
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{TOWER_FLAG} {src.path}: cannot load the vision tower's weights ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None


# ------------------------------------------------------------------------------------------------- projector
def seeded_projector(vision_hidden: int, text_hidden: int, seed: int) -> dict[str, torch.Tensor]:
    """mlp2x_gelu weights with nn.Linear's default initialisation drawn from `seed` (the global RNG is left as
    it was): same seed, same bits."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear_1 = torch.nn.Linear(vision_hidden, text_hidden)
        linear_2 = torch.nn.Linear(text_hidden, text_hidden)
    return {"linear_1.weight": linear_1.weight.detach(), "linear_1.bias": linear_1.bias.detach(),
            "linear_2.weight": linear_2.weight.detach(), "linear_2.bias": linear_2.bias.detach()}


# -------------------------------------------------------------------------------------------------- compose
def compose_inputs(lm: LanguageModelSource, tower: TowerSource, seed: int, dtype: str) -> dict:
    """What identifies a composition: an existing OUT with the same is reused."""
    return {"format_version": FORMAT_VERSION, "language_model": lm.record, "vision_tower": tower.record,
            "seed": seed, "dtype": dtype}


def existing_inputs(out: Path) -> dict | None:
    try:
        with open(out / COMPOSE_FILE) as f:
            return json.load(f).get("inputs")
    except (OSError, ValueError, AttributeError):
        return None


def compose(language_model: str, vision_tower: str, output_dir: str, seed: int = 0, dtype: str = "float32",
            overwrite: bool = False) -> tuple[Path, bool]:
    """Compose the checkpoint (module docstring); returns (OUT, reused)."""
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from llava_sculpt.model.convert import add_llava_tokens, resize_vocab_rows

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out} exists and is not a folder")
    lm_src = resolve_language_model(language_model)
    tower_src = resolve_tower(vision_tower)
    inputs = compose_inputs(lm_src, tower_src, seed, dtype)
    if out.is_dir() and any(out.iterdir()):
        found = existing_inputs(out)
        if found == json.loads(json.dumps(inputs)) and (out / "config.json").is_file():
            return out, True
        if not overwrite:
            why = "was composed from other inputs or settings" if found is not None else "is not a compose output"
            raise UserError(f"--output-dir {out} already exists and {why}; pass --overwrite to replace it, or "
                            "choose another folder")

    text_config = load_lm_config(lm_src)
    where = lm_src.path if lm_src.gguf_file else lm_src.folder / "config.json"
    check_hostable(text_config, where)
    tokenizer = load_lm_tokenizer(lm_src)
    eot = choose_end_of_turn(tokenizer, lm_src)
    old_rows = int(text_config.vocab_size)
    # special tokens beyond the weights' rows (transformers' GGUF reader adds <|endoftext|> to a gpt2 tokenizer
    # without one) get a new row like <image>; ordinary tokens there mean tokenizer and weights do not match
    beyond = list(range(old_rows, len(tokenizer)))
    added_vocab = set(tokenizer.get_added_vocab().values())
    if any(i not in added_vocab for i in beyond):
        raise UserError(f"{LM_FLAG} {lm_src.tokenizer_file}: the tokenizer has {len(tokenizer)} tokens but the model's "
                        f"vocab_size is {old_rows}; tokenizer and weights do not belong together")
    used_rows = min(len(tokenizer), old_rows)
    lm = load_language_model(lm_src)
    tower_state = load_tower_state(tower_src)

    added_ids = beyond + add_llava_tokens(tokenizer)
    num_rows = max(old_rows, math.ceil(len(tokenizer) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    tied = bool(lm.get_output_embeddings().weight is lm.get_input_embeddings().weight)

    text_dict = text_config.to_dict()
    text_dict.pop("quantization_config", None)  # the GGUF loading detail: the written weights are plain tensors
    text_dict.pop("_name_or_path", None)
    text_dict.update(vocab_size=num_rows, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                     bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=tied, dtype=dtype)
    vision = tower_src.vision_config
    num_patches = (vision.image_size // vision.patch_size) ** 2
    record = {"inputs": inputs, "end_of_turn": eot, "original_vocab_size": old_rows, "original_tokenizer_size": used_rows,
              "added_token_ids": added_ids, "vocab_size": num_rows, "new_rows_init": "mean of the original rows",
              "image_token_id": image_token_id, "pad_token": tokenizer.pad_token,
              "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": tied,
              "vision_feature_layer": tower_src.feature_layer,
              "vision_feature_select_strategy": tower_src.strategy, "projector": "mlp2x_gelu",
              "projector_init": f"torch.nn.Linear default, torch.manual_seed({seed})"}
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text_dict, image_token_index=image_token_id,
                         image_seq_length=num_patches + (1 if tower_src.strategy == "full" else 0),
                         projector_hidden_act="gelu", vision_feature_layer=tower_src.feature_layer,
                         vision_feature_select_strategy=tower_src.strategy, multimodal_projector_bias=True,
                         tie_word_embeddings=tied)
    config.pad_token_id = tokenizer.pad_token_id
    setattr(config, CONFIG_KEY, record)

    target = DTYPES[dtype]
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    state = {f"model.vision_tower.{k}": v for k, v in tower_state.items()}
    state.update({f"model.multi_modal_projector.{k}": v for k, v in
                  seeded_projector(vision.hidden_size, text_config.hidden_size, seed).items()})
    embed_name = "model.language_model.embed_tokens.weight"
    for key, value in lm.base_model.state_dict().items():
        state[f"model.language_model.{key}"] = value
    state[embed_name] = resize_vocab_rows(lm.get_input_embeddings().weight.detach(), num_rows, used_rows, added_ids)
    if not tied:
        state["lm_head.weight"] = resize_vocab_rows(lm.get_output_embeddings().weight.detach(), num_rows, used_rows,
                                                    added_ids)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if tied else set())
    if set(state) != expected:
        raise UserError(f"{LM_FLAG} {where} + {TOWER_FLAG} {tower_src.path}: the weights do not fill the LLaVA "
                        f"(missing {sorted(expected - set(state))[:3]}, unexpected {sorted(set(state) - expected)[:3]})")
    model.load_state_dict({k: v.to(target).contiguous() for k, v in state.items()}, strict=not tied, assign=True)
    if tied:
        model.tie_weights()
    del lm, state, tower_state
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    processor = LlavaProcessor(image_processor=tower_src.image_processor, tokenizer=tokenizer,
                               patch_size=vision.patch_size, vision_feature_select_strategy=tower_src.strategy,
                               num_additional_image_tokens=1)
    write(out, model, processor, record)
    return out, False


def write(out: Path, model, processor, record: dict) -> None:
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            write_json_atomic(os.path.join(tmp, COMPOSE_FILE), record)
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llava-sculpt compose", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(LM_FLAG, required=True, help="Hugging Face causal-LM folder, or a .gguf file (dequantised)")
    p.add_argument(TOWER_FLAG, required=True, help="CLIPVisionModel folder, or a LLaVA checkpoint whose tower is taken")
    p.add_argument("--output-dir", required=True, help="folder for the composed LLaVA-1.5 checkpoint")
    p.add_argument("--seed", type=int, default=0, help="projector initialisation seed (default 0)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights of the output (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace an --output-dir composed from other inputs")
    args = p.parse_args(argv)
    out, reused = compose(args.language_model, args.vision_tower, args.output_dir, args.seed, args.dtype,
                          args.overwrite)
    if reused:
        print(f"reusing {out}: already composed from the same inputs and settings ({out / COMPOSE_FILE})")
    else:
        print(f"composed {out} (LlavaForConditionalGeneration + LlavaProcessor; inputs and choices in "
              f"{out / COMPOSE_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
