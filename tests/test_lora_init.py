"""--init_lora_weights (PEFT's pissa / olora / corda / eva initialisations) on the tiny model.

The check that matters: whatever the initialisation did to the base weights during training, the saved run
applied to the ORIGINAL base (`load_for_inference`, what merge / generate / eval use) computes the model that
was trained.  The reference is the trained model itself, as the trainer holds it at the end of training
(residual base + unconverted adapter + trained projector), run on a real training batch (image included)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from helpers import load_safetensors, run_train
from llava_sculpt.errors import UserError


def _train_and_capture(tiny_dir, out, monkeypatch, *extra, steps=2):
    """Train; just before the run is finalised, the in-training model's logits on the first training batch."""
    from llava_sculpt import train

    captured = {}
    original = train.finalise

    def spy(trainer, run, method, output_dir):
        batch = next(iter(trainer.get_train_dataloader()))
        batch = {k: v.to("cpu") for k, v in batch.items() if k != "labels"}
        model = trainer.model
        was_training = model.training
        model.eval()
        with torch.no_grad():
            captured["logits"] = model(**batch).logits.float().clone()
        model.train(was_training)
        captured["batch"] = batch
        captured["base_weight"] = {n: p.detach().clone() for n, p in model.named_parameters()
                                   if n.endswith("q_proj.base_layer.weight")}
        return original(trainer, run, method, output_dir)

    monkeypatch.setattr(train, "finalise", spy)
    assert run_train(tiny_dir, out, *extra, steps=steps) == 0
    return captured


def _reloaded_logits(run_dir, batch):
    from llava_sculpt.model.load import load_for_inference

    model, _ = load_for_inference(str(run_dir))
    with torch.no_grad():
        return model(**batch).logits.float()


def _original_base(tiny_dir):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(tiny_dir / "model").state_dict()


def _corda_args(tiny_dir, method="kpm"):
    return ["--corda_data", str(tiny_dir / "data" / "train.json"), "--corda_samples", "6", "--corda_method", method]


@pytest.mark.parametrize("init", ["pissa", "olora", "corda", "corda-ipm"])
def test_base_changing_init_saves_adapter_of_original_base(init, tiny_dir, tmp_path, monkeypatch):
    init, _, corda_method = init.partition("-")
    extra = ["--init_lora_weights", init, *(_corda_args(tiny_dir, corda_method or "kpm") if init == "corda" else [])]
    got = _train_and_capture(tiny_dir, tmp_path / "run", monkeypatch, *extra)
    run = tmp_path / "run"
    # training really ran on a residual base: its q_proj weights are not the checkpoint's
    base = _original_base(tiny_dir)
    changed = [n for n, w in got["base_weight"].items()
               if not torch.equal(w, base[n.replace("base_model.model.", "").replace(".base_layer", "")])]
    assert changed, "the base weights were not changed by the initialisation"
    # the initial adapter differs from PEFT's default one: B0 != 0 (default / gaussian start with B = 0)
    initial = load_safetensors(run / "initial_lora_adapter" / "adapter_model.safetensors")
    b0 = [v for k, v in initial.items() if "lora_B" in k]
    assert b0 and all(v.abs().max() > 0 for v in b0)
    # the saved adapter is PEFT's conversion: plain LoRA of rank 2r (r = 4 here), projector still carried
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    saved = load_safetensors(run / "adapter_model.safetensors")
    raw = load_safetensors(run / "adapter_unconverted.safetensors")
    projector = [k for k in raw if "multi_modal_projector" in k]
    assert projector and all(torch.equal(saved[k], raw[k]) for k in projector)
    # and applied to the ORIGINAL base it is the trained model
    reloaded = _reloaded_logits(run, got["batch"])
    assert torch.allclose(reloaded, got["logits"], atol=1e-4, rtol=1e-4), (reloaded - got["logits"]).abs().max()


def test_eva_init_keeps_base_and_saved_run_is_trained_model(tiny_dir, tmp_path, monkeypatch):
    got = _train_and_capture(tiny_dir, tmp_path / "run", monkeypatch, "--init_lora_weights", "eva")
    run = tmp_path / "run"
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva" and not (run / "initial_lora_adapter").exists()
    base = _original_base(tiny_dir)
    for n, w in got["base_weight"].items():  # EVA leaves the base alone
        assert torch.equal(w, base[n.replace("base_model.model.", "").replace(".base_layer", "")])
    reloaded = _reloaded_logits(run, got["batch"])
    assert torch.allclose(reloaded, got["logits"], atol=1e-4, rtol=1e-4)


def test_eva_and_gaussian_initial_factors_differ_from_default(tiny_dir):
    """At step 0 (no training): gaussian's A is N(0, 1/r) not Kaiming-uniform; EVA's A rows are orthonormal
    (right-singular vectors of the layer inputs); both keep B = 0, so the model is unchanged."""
    from llava_sculpt.methods.base import RunContext
    from llava_sculpt.methods.lora import inject_lora
    from llava_sculpt.model.load import load_base_model

    def build(init):
        torch.manual_seed(0)
        args = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_bias="none", init_lora_weights=init,
                               freeze_mm_mlp_adapter=False, per_device_train_batch_size=2, model_max_length=2048,
                               device=torch.device("cpu"), output_dir="/nonexistent", process_index=0)
        run = RunContext(SimpleNamespace(model_name_or_path=str(tiny_dir / "model"), version="v1"),
                         SimpleNamespace(data_path=str(tiny_dir / "data" / "train.json"),
                                         image_folder=str(tiny_dir / "data" / "images"), image_aspect_ratio="pad"),
                         args)
        model = inject_lora(load_base_model(str(tiny_dir / "model")), run)
        layer = model.base_model.model.model.language_model.layers[0].self_attn.q_proj
        return layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()

    a_default, b_default = build("default")
    a_gauss, b_gauss = build("gaussian")
    a_eva, b_eva = build("eva")
    assert not b_default.any() and not b_gauss.any() and not b_eva.any()
    bound = a_default.abs().max()
    assert (a_gauss.abs() > bound).any()  # Kaiming-uniform is bounded, a Gaussian is not
    rows = a_eva.shape[0]
    assert torch.allclose(a_eva @ a_eva.T, torch.eye(rows), atol=1e-4)
    assert not torch.allclose(a_default @ a_default.T, torch.eye(a_default.shape[0]), atol=1e-2)


def test_pissa_resume_from_checkpoint(tiny_dir, tmp_path, capsys):
    """A checkpoint holds the converted adapter and the unconverted one; resuming from checkpoint-1 (the model
    re-initialised with PiSSA, the unconverted adapter loaded) ends where the uninterrupted run ends."""
    import shutil

    save = ("--init_lora_weights", "pissa", "--save_strategy", "steps", "--save_steps", "1")
    straight = tmp_path / "straight"
    assert run_train(tiny_dir, straight, *save, steps=2) == 0
    ckpt = straight / "checkpoint-1"
    assert (ckpt / "adapter_unconverted.safetensors").is_file()
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 8
    resumed = tmp_path / "resumed"
    shutil.copytree(ckpt, resumed / "checkpoint-1")
    capsys.readouterr()
    assert run_train(tiny_dir, resumed, *save, steps=2) == 0  # resumes from checkpoint-1 (LLaVA's behaviour)
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((resumed / "training_complete.json").read_text())["global_step"] == 2
    a = load_safetensors(resumed / "adapter_model.safetensors")
    b = load_safetensors(straight / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def _args(**kw):
    base = dict(init_lora_weights="default", corda_data=None, corda_method="kpm", corda_samples=256,
                deepspeed=None, bits=16, lora_weight_path=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_flag_validation(tiny_dir, tmp_path):
    from llava_sculpt.methods.lora_init import validate

    validate(_args())
    with pytest.raises(UserError, match="--init_lora_weights corda needs --corda_data"):
        validate(_args(init_lora_weights="corda"))
    with pytest.raises(UserError, match="no such file"):
        validate(_args(init_lora_weights="corda", corda_data=str(tmp_path / "missing.json")))
    with pytest.raises(UserError, match="only used by --init_lora_weights corda"):
        validate(_args(init_lora_weights="pissa", corda_data=str(tiny_dir / "data" / "train.json")))
    for init in ("pissa", "olora", "eva"):
        with pytest.raises(UserError, match="ZeRO-3"):
            validate(_args(init_lora_weights=init, deepspeed={"zero_optimization": {"stage": 3}}))
    validate(_args(init_lora_weights="eva", deepspeed={"zero_optimization": {"stage": 2}}))
    with pytest.raises(UserError, match="--bits 4"):
        validate(_args(init_lora_weights="pissa", bits=4))
    with pytest.raises(UserError, match="--method sculpt with --init_lora_weights pissa"):
        validate(_args(init_lora_weights="pissa"), method="sculpt")
    validate(_args(init_lora_weights="eva"), method="sculpt")
    with pytest.raises(UserError, match="trains no LoRA"):
        validate(_args(init_lora_weights="olora"), uses_lora=False)
    # through the CLI: corda without data fails before any model is loaded
    with pytest.raises(UserError, match="--corda_data"):
        from llava_sculpt.train import main
        from helpers import train_args

        main(train_args(tiny_dir, tmp_path / "x", "--init_lora_weights", "corda"))


def test_eva_batch_size_rule_by_hand():
    """PEFT skips a batch with fewer than round(rho r) tokens: the batch grows until the fewest-token samples
    seen fill it; an explicit --eva_batch_size wins."""
    from llava_sculpt.methods.lora_init import eva_batch_size, eva_tokens

    assert eva_batch_size(0, 16, 64, [2, 3, 2]) == 32  # IconQA-like: a letter + </s> per sample, rank 32
    assert eva_batch_size(0, 16, 16, [2, 9]) == 16     # the training batch already suffices
    assert eva_batch_size(0, 1, 32, [5, 7]) == 7       # ceil(32 / 5)
    assert eva_batch_size(48, 16, 64, [1]) == 48
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
             "labels": torch.tensor([[-100, -100, 7, 2, -100], [-100, 5, 6, 7, 2]])}
    assert eva_tokens(batch).tolist() == [2, 4] and eva_tokens(batch, use_label_mask=False).tolist() == [4, 5]


def test_eva_with_too_few_tokens_per_batch(tiny_dir, tmp_path, capsys):
    """Rank 16 (32 components) at batch size 1 (the tiny data has 4-20 label tokens per sample): PEFT alone
    would cycle over the data forever; the batch is raised and training runs, and a batch size forced too
    small ends with a clear error instead of a hang."""
    args = ["--init_lora_weights", "eva", "--lora_r", "16", "--lora_alpha", "32", "--per_device_train_batch_size", "1"]
    assert run_train(tiny_dir, tmp_path / "auto", *args, steps=1) == 0
    out = capsys.readouterr().out
    assert "32 components (rank 16 x rho 2) over batches of 8" in out  # ceil(32 / 4): 4 tokens in sample 0
    config = json.loads((tmp_path / "auto" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] == "eva"
    assert run_train(tiny_dir, tmp_path / "forced", *args, "--eva_batch_size", "1", steps=1) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no batch of batch size 1 holds the 32 tokens PEFT's SVD needs" in err


# every (method, init) the method would mishandle: asymlora builds its own PEFT layers (no CorDA / EVA pass, no
# conversion of the saves); sculpt's masks and orth's penalty are defined on factors of the original base
REFUSED = ([("asymlora", init) for init in ("pissa", "olora", "corda", "eva")]
           + [(method, init) for method in ("sculpt", "orth") for init in ("pissa", "olora", "corda")])


@pytest.mark.parametrize("method,init", REFUSED)
def test_methods_refuse_inits_they_would_mishandle(method, init):
    from llava_sculpt.methods.lora_init import METHOD_INITS, validate

    allowed = METHOD_INITS[method][0]
    use = ", ".join(allowed[:-1]) + f" or {allowed[-1]}"
    with pytest.raises(UserError) as err:  # corda without --corda_data: the method's refusal comes first
        validate(_args(init_lora_weights=init), method=method)
    text = str(err.value)
    assert text.startswith(f"--method {method} with --init_lora_weights {init}: ")
    assert text.endswith(f"; use --init_lora_weights {use}")


def test_methods_accept_the_inits_they_handle(tiny_dir):
    from llava_sculpt.methods import METHODS
    from llava_sculpt.methods.lora_init import INIT_CHOICES, validate

    refused = set(REFUSED)
    for method, cls in METHODS.items():
        if not cls.uses_lora:
            continue
        for init in INIT_CHOICES:
            if (method, init) in refused:
                continue
            extra = {"corda_data": str(tiny_dir / "data" / "train.json")} if init == "corda" else {}
            validate(_args(init_lora_weights=init, **extra), method=method)
    assert {m for m, _ in refused} == {"asymlora", "sculpt", "orth"}


def test_asymlora_with_a_base_changing_init_stops_before_training(tiny_dir, tmp_path, capsys):
    """Through the CLI: exit 2, the flag and what is allowed named, nothing written.  Before, pissa / olora
    trained AsymLoRA on a residual base whose saves were not converted back (initial logits off the base's by
    0.1-0.2 on the tiny model) and eva silently trained from the default init."""
    from helpers import train_args
    from llava_sculpt.cli import main

    for init in ("pissa", "eva"):
        out = tmp_path / init
        assert main(["train", *train_args(tiny_dir, out, "--method", "asymlora", "--init_lora_weights", init)]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"--method asymlora with --init_lora_weights {init}:" in err
        assert "use --init_lora_weights default or gaussian" in err
        assert not out.exists()


def test_corda_data_help_says_which_data_each_mode_takes(capsys):
    """--corda_method ipm previews the DOWNSTREAM task: its --corda_data is downstream data, not source data."""
    from llava_sculpt.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    corda_data = text.split("--corda_data CORDA_DATA, --corda-data CORDA_DATA")[1].split("--corda_image_folder")[0]
    assert "SOURCE-task samples" in corda_data and "for --corda_method kpm" in corda_data
    assert "DOWNSTREAM-task samples" in corda_data and "for ipm" in corda_data
