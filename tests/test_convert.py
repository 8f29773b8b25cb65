"""`llava-sculpt convert`: original LLaVA-1.5 layout -> Hugging Face Llava.

The original-layout checkpoint is written here from the tiny HF model by an inverse mapping of our own (HF ->
LLaVA names, `<pad>`/`<image>` removed from the tokenizer and from the embedding rows), so the round trip
compares the converter against the tiny model itself, not against the converter's own tables.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_sculpt.errors import UserError
from llava_sculpt.model import convert
from llava_sculpt.model.tiny import build_tiny_model, draw_shape

REMOVED = ("<pad>", "<image>")  # tokens LLaVA's tokenizer does not have
HUB_TOWER = "openai/clip-vit-large-patch14-336"


@pytest.fixture(scope="module")
def tiny():
    model, processor = build_tiny_model(seed=3)
    model.eval()
    tok = processor.tokenizer
    removed_ids = sorted(tok.convert_tokens_to_ids(list(REMOVED)))
    keep = [i for i in range(len(tok)) if i not in removed_ids]  # new id j <-> tiny id keep[j]
    return model, processor, removed_ids, keep


def _original_tokenizer(tok, removed_ids):
    """The tiny tokenizer with <pad>/<image> deleted and the remaining ids closed up (LLaVA's has neither)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(tok.backend_tokenizer.to_str())

    def new_id(i):
        return i - sum(r < i for r in removed_ids)

    data["added_tokens"] = [dict(t, id=new_id(t["id"])) for t in data["added_tokens"] if t["content"] not in REMOVED]
    data["model"]["vocab"] = {k: new_id(v) for k, v in data["model"]["vocab"].items() if k not in REMOVED}
    for spec in data["post_processor"]["special_tokens"].values():
        spec["ids"] = [new_id(i) for i in spec["ids"]]
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>", model_max_length=2048)


def _original_weights(model, keep):
    """Inverse mapping HF -> LLaVA names. Returns (llava_state, clip_tower_state)."""
    llava, tower = {}, {}
    for name, t in model.state_dict().items():
        t = t.detach().clone()
        if name.startswith("model.vision_tower."):
            tower["vision_model." + name[len("model.vision_tower."):]] = t
        elif name.startswith("model.multi_modal_projector.linear_"):
            idx = {"1": "0", "2": "2"}[name[len("model.multi_modal_projector.linear_")]]
            llava[f"model.mm_projector.{idx}.{name.rsplit('.', 1)[1]}"] = t
        elif name.startswith("model.language_model."):
            llava["model." + name[len("model.language_model."):]] = t
        else:
            assert name == "lm_head.weight"
            llava[name] = t
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        llava[name] = llava[name][keep].clone()  # drop the rows of <pad>/<image>
    return llava, tower


def write_original(root: Path, tiny, fmt="bin", tower_inside=False, tower_name=None, drop=(), extra=None,
                   projector="mlp2x_gelu"):
    """An original LLaVA-1.5 directory (two shards + index, config with mm_* fields, tokenizer) and a separate
    CLIPVisionModel directory in the openai layout (`vision_model.*` keys, legacy preprocessor_config)."""
    model, processor, removed_ids, keep = tiny
    llava_dir, tower_dir = root / "llava", root / "clip"
    llava_dir.mkdir(parents=True)
    tower_dir.mkdir(parents=True)
    llava, tower = _original_weights(model, keep)
    if tower_inside:
        llava.update({"model.vision_tower.vision_tower." + k: v for k, v in tower.items()})
    llava.update(extra or {})
    for k in drop:
        del llava[k]
    names = sorted(llava)
    shards = [[k for k in names if "layers.1." not in k], [k for k in names if "layers.1." in k]]
    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        part = {k: llava[k] for k in keys}
        if fmt == "bin":
            fname = f"pytorch_model-{i:05d}-of-00002.bin"
            torch.save(part, llava_dir / fname)
        else:
            from safetensors.torch import save_file
            fname = f"model-{i:05d}-of-00002.safetensors"
            save_file({k: v.contiguous() for k, v in part.items()}, str(llava_dir / fname))
        weight_map.update({k: fname for k in keys})
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (llava_dir / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    text = model.config.text_config
    vision = model.config.vision_config
    cfg = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "torch_dtype": "float32",
        "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size,
        "num_attention_heads": text.num_attention_heads, "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads, "rms_norm_eps": text.rms_norm_eps,
        "vocab_size": len(keep), "max_position_embeddings": text.max_position_embeddings, "rope_theta": 10000.0,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "tie_word_embeddings": False, "use_cache": True,
        "mm_vision_tower": tower_name or str(tower_dir), "mm_projector_type": projector,
        "mm_hidden_size": vision.hidden_size, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
        "mm_patch_merge_type": "flat", "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
    }
    (llava_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    _original_tokenizer(processor.tokenizer, removed_ids).save_pretrained(llava_dir)

    vcfg = {k: getattr(vision, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "image_size", "patch_size", "hidden_act",
                                            "layer_norm_eps", "projection_dim")}
    (tower_dir / "config.json").write_text(json.dumps({**vcfg, "model_type": "clip_vision_model",
                                                       "architectures": ["CLIPVisionModel"]}))
    ip = processor.image_processor
    (tower_dir / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": vision.image_size, "size": vision.image_size, "do_center_crop": True, "do_normalize": True,
        "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(ip.image_mean),
        "image_std": list(ip.image_std), "resample": 3}))
    if not tower_inside:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in tower.items()}, str(tower_dir / "model.safetensors"))
    return llava_dir, tower_dir


def _load_converted(out: Path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    return LlavaForConditionalGeneration.from_pretrained(str(out)).eval(), AutoProcessor.from_pretrained(str(out))


PROMPT = "USER: <image>\nWhat colour is the shape? ASSISTANT:"


def test_bin_shards_round_trip_matches_tiny_logits(tmp_path, tiny):
    model, processor, removed_ids, keep = tiny
    llava_dir, tower_dir = write_original(tmp_path, tiny, fmt="bin")
    out = tmp_path / "hf"
    assert convert.main(["--model-path", str(llava_dir), "--output-dir", str(out)]) == 0  # tower from config
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.tmp")]
    hf, hf_proc = _load_converted(out)
    tok = hf_proc.tokenizer

    image_id = tok.convert_tokens_to_ids("<image>")
    assert hf.config.image_token_index == image_id == len(keep)  # appended after the original vocabulary
    assert tok.encode("<image>", add_special_tokens=False) == [image_id]
    assert "<image>" in tok.all_special_tokens
    assert tok.pad_token == "<pad>" and tok.pad_token_id == len(keep) + 1
    assert hf.config.text_config.vocab_size == 448  # 398 original + 2 added, padded to a multiple of 64

    from transformers import AutoTokenizer
    orig_tok = AutoTokenizer.from_pretrained(str(llava_dir))
    for text in ["A chat between a curious user and an artificial intelligence assistant.",
                 "What colour is the shape? red, GREEN triangle 10!", "zebra quokka"]:
        ids = tok(text).input_ids
        assert ids == orig_tok(text).input_ids
        assert ids == [keep.index(i) for i in processor.tokenizer(text).input_ids]

    image = draw_shape("blue", "circle", (40, 28))
    ref_in = processor(text=PROMPT, images=image, return_tensors="pt")
    new_in = hf_proc(text=PROMPT, images=image, return_tensors="pt")
    tiny_to_new = {old: new for new, old in enumerate(keep)} | {model.config.image_token_index: image_id}
    assert new_in.input_ids[0].tolist() == [tiny_to_new[i] for i in ref_in.input_ids[0].tolist()]
    assert (new_in.input_ids == image_id).sum() == 16
    assert torch.equal(new_in.pixel_values, ref_in.pixel_values)
    with torch.no_grad():
        ref = model(**ref_in).logits[0]  # [T, 400]
        new = hf(**new_in).logits[0]  # [T, 448]
    torch.testing.assert_close(new[:, :len(keep)], ref[:, keep], atol=1e-6, rtol=0)

    # new rows: mean of the original rows (independent computation); original rows bit-identical
    emb = hf.get_input_embeddings().weight.detach()
    orig_emb = model.get_input_embeddings().weight.detach()[keep]
    assert torch.equal(emb[:len(keep)], orig_emb)
    torch.testing.assert_close(emb[len(keep):], orig_emb.double().mean(0).float().expand(448 - len(keep), -1))

    flags = convert.read_convert_flags(out)
    assert flags["image_aspect_ratio"] == "pad" and flags["mm_use_im_start_end"] is False
    assert flags["image_token_index"] == image_id
    assert hf.config.vision_feature_layer == -2 and hf.config.vision_feature_select_strategy == "default"
    assert hf_proc.image_processor.crop_size == {"height": 32, "width": 32}


def test_safetensors_with_tower_inside_llava_weights(tmp_path, tiny):
    model, processor, _, keep = tiny
    llava_dir, tower_dir = write_original(tmp_path, tiny, fmt="safetensors", tower_inside=True,
                                          tower_name=HUB_TOWER)
    out = tmp_path / "nested" / "hf"
    from llava_sculpt.cli import main as cli_main
    assert cli_main(["convert", "--model-path", str(llava_dir), "--output-dir", str(out),
                     "--vision-tower", str(tower_dir), "--dtype", "bfloat16"]) == 0
    hf, _ = _load_converted(out)
    got = hf.state_dict()
    for name, ref in model.state_dict().items():
        if name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            ref = ref[keep]
            assert got[name].shape[0] == 448
        assert got[name].dtype == torch.bfloat16
        assert torch.equal(got[name][:ref.shape[0]], ref.to(torch.bfloat16)), name


def test_weights_only_rejects_pickled_object(tmp_path, tiny):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    llava_dir, _ = write_original(tmp_path, tiny, fmt="bin")
    shard = llava_dir / "pytorch_model-00002-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    state["model.layers.1.payload"] = Evil()
    torch.save(state, shard)
    with pytest.raises(UserError, match="pytorch_model-00002-of-00002.bin.*never executed"):
        convert.convert_llava_checkpoint(llava_dir, tmp_path / "hf")
    assert not marker.exists()
    assert not (tmp_path / "hf").exists()


def test_missing_key_names_the_key_and_writes_nothing(tmp_path, tiny):
    llava_dir, _ = write_original(tmp_path, tiny, drop=["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(UserError, match=r"missing weight\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        convert.convert_llava_checkpoint(llava_dir, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip", "llava"]


@pytest.mark.parametrize("case, pattern", [
    ("unexpected", r"00002-of-00002\.bin: unexpected weight 'model\.layers\.1\.mlp\.extra\.weight'"),
    ("shape", r"'model\.mm_projector\.2\.bias' has shape \(3,\)"),
    ("linear", r"mm_projector_type is 'linear'"),
])
def test_bad_checkpoints_raise_user_error(tmp_path, tiny, case, pattern):
    if case == "unexpected":
        llava_dir, _ = write_original(tmp_path, tiny, extra={"model.layers.1.mlp.extra.weight": torch.zeros(2)})
    elif case == "shape":
        llava_dir, _ = write_original(tmp_path, tiny, extra={"model.mm_projector.2.bias": torch.zeros(3)})
    else:
        llava_dir, _ = write_original(tmp_path, tiny, projector="linear")
    with pytest.raises(UserError, match=pattern):
        convert.convert_llava_checkpoint(llava_dir, tmp_path / "hf")


def test_hub_name_vision_tower_needs_local_dir(tmp_path, tiny, capsys):
    llava_dir, _ = write_original(tmp_path, tiny, tower_name=HUB_TOWER)
    with pytest.raises(UserError, match=r"openai/clip-vit-large-patch14-336.*no network.*--vision-tower"):
        convert.convert_llava_checkpoint(llava_dir, tmp_path / "hf")
    from llava_sculpt.errors import run_cli
    assert run_cli(convert.main, ["--model-path", str(llava_dir), "--output-dir", str(tmp_path / "hf")]) == 2
    assert "--vision-tower" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_full_clip_model_tower_dir_bin(tmp_path, tiny):
    """A CLIPModel tower (model_type 'clip', text side and position_ids buffers in pytorch_model.bin) works."""
    from safetensors.torch import load_file
    model, _, _, _ = tiny
    llava_dir, tower_dir = write_original(tmp_path, tiny)
    tower = load_file(str(tower_dir / "model.safetensors"))
    (tower_dir / "model.safetensors").unlink()
    tower.update({"text_model.embeddings.token_embedding.weight": torch.zeros(5, 4), "logit_scale": torch.ones(()),
                  "visual_projection.weight": torch.zeros(4, 32),
                  "vision_model.embeddings.position_ids": torch.arange(17)[None]})
    torch.save(tower, tower_dir / "pytorch_model.bin")
    vision = json.loads((tower_dir / "config.json").read_text())
    (tower_dir / "config.json").write_text(json.dumps({"model_type": "clip", "architectures": ["CLIPModel"],
                                                       "vision_config": vision, "text_config": {}}))
    out = tmp_path / "hf"
    convert.convert_llava_checkpoint(llava_dir, out, vision_tower=tower_dir)
    hf, _ = _load_converted(out)
    got, ref = hf.state_dict(), model.state_dict()
    tower_names = [k for k in ref if k.startswith("model.vision_tower.")]
    assert tower_names and all(torch.equal(got[k], ref[k]) for k in tower_names)
