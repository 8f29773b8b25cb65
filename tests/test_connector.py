"""--connector {full,lora,frozen,sculpt} (the paper's Table 2): which tensors train, at which learning rate, what a
run saves and how it loads, the aliases --freeze_mm_mlp_adapter True / --sculpt_connector True, the refusals."""
from __future__ import annotations

import glob
import json
import re

import pytest
import torch

from helpers import generate_two_answers, load_safetensors, one_line, run_train, train_args
from test_train import sample_inputs

# a large rate, so that every trained tensor moves in 3 steps; three distinct rates to tell the groups apart
RATES = ["--learning_rate", "0.05", "--mm_projector_lr", "0.01", "--mm_projector_lora_lr", "0.02"]
PROJECTOR_LINEARS = ("linear_1", "linear_2")


def train_traced(tiny_dir, out, *args, steps=3):
    """`run_train` in-process; returns (every parameter of the model right after build_model, the trainer at
    finalise).  main looks build_model / finalise up in llava_sculpt.train, so patching them there applies."""
    import llava_sculpt.train as train

    seen = {}
    build, finalise = train.build_model, train.finalise

    def build_model(*a, **k):
        model = build(*a, **k)
        seen["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    def capture(trainer, *a, **k):
        seen["trainer"] = trainer
        return finalise(trainer, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "build_model", build_model)
        mp.setattr(train, "finalise", capture)
        assert run_train(tiny_dir, out, *args, steps=steps) == 0
    return seen["before"], seen["trainer"]


def kind(name: str) -> str:
    """What a parameter of the (PEFT) model is, from its name."""
    if "multi_modal_projector" not in name:
        return "lm_lora" if "lora_" in name else "frozen_rest"
    if "lora_" in name:
        return "projector_lora"
    if ".modules_to_save." in name:
        return "projector_trained_copy"  # PEFT's trainable copy of the fully trained projector
    return "projector_own"  # the projector's own weights (base_layer / original_module / plain)


def base_projector(tiny_dir) -> dict[str, torch.Tensor]:
    """The base checkpoint's projector as stored on disk: linear_1.weight, ..."""
    state = {}
    for path in glob.glob(str(tiny_dir / "model" / "*.safetensors")):
        for key, value in load_safetensors(path).items():
            if "multi_modal_projector." in key:
                state[key.split("multi_modal_projector.", 1)[1]] = value
    assert len(state) == 4
    return state


CASES = {  # name -> (--connector, extra flags, the kinds of tensor that train)
    "full": ("full", [], {"lm_lora", "projector_trained_copy"}),
    "lora": ("lora", [], {"lm_lora", "projector_lora"}),
    "frozen": ("frozen", [], {"lm_lora"}),
    "sculpt": ("sculpt", ["--method", "sculpt", "--cmr_beta", "0.1"], {"lm_lora", "projector_lora"}),
    "dora-lora": ("lora", ["--method", "dora"], {"lm_lora", "projector_lora"}),  # + DoRA's magnitude vectors
}


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("connector")
    out = {}
    for case, (connector, extra, _) in CASES.items():
        run_dir = root / case
        before, trainer = train_traced(tiny_dir, run_dir, *RATES, "--connector", connector, *extra)
        out[case] = (run_dir, before, trainer)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_exactly_the_connector_tensors_change(case, runs, tiny_dir):
    connector = CASES[case][0]
    run_dir, before, trainer = runs[case]
    after = dict(trainer.model.named_parameters())
    assert set(after) == set(before)
    changed = {n for n, p in after.items() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in after.items() if p.requires_grad}
    expected_kinds = CASES[case][2]
    assert changed == trainable == {n for n in after if kind(n) in expected_kinds}, case
    assert {kind(n) for n in changed} == expected_kinds
    on_projector = sorted(re.sub(r"^.*multi_modal_projector\.", "", n) for n in changed if kind(n) == "projector_lora")
    lora_ab = [f"{lin}.lora_{ab}.default.weight" for lin in PROJECTOR_LINEARS for ab in "AB"]
    dora_m = [f"{lin}.lora_magnitude_vector.default.weight" for lin in PROJECTOR_LINEARS]
    assert on_projector == (sorted(lora_ab + dora_m) if case == "dora-lora" else lora_ab if connector in (
        "lora", "sculpt") else [])
    # the projector's own weights: bit for bit the base checkpoint's (full: the frozen original PEFT keeps)
    base = base_projector(tiny_dir)
    own = {n: p for n, p in after.items() if kind(n) == "projector_own"}
    assert len(own) == 4
    for name, param in own.items():
        short = re.sub(r"^.*multi_modal_projector\.(original_module\.)?", "", name).replace(".base_layer", "")
        assert torch.equal(param.detach(), base[short].to(param.dtype)), name
    record = json.loads((run_dir / "run_args.json").read_text())
    assert record["training_args"]["connector"] == connector
    assert record["training_args"]["freeze_mm_mlp_adapter"] == (connector == "frozen")


@pytest.mark.parametrize("case", list(CASES))
def test_optimizer_groups_and_rates(case, runs):
    """Each group's starting rate (the scheduler's initial_lr) and exactly the tensors it holds."""
    connector = CASES[case][0]
    _, _, trainer = runs[case]
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    by_rate: dict[float, set[str]] = {}
    for group in trainer.optimizer.param_groups:
        by_rate.setdefault(group["initial_lr"], set()).update(names[id(p)] for p in group["params"])
    lm = {n for n in names.values() if kind(n) == "lm_lora"}
    expected = {0.05: lm}
    if connector == "full":
        expected[0.01] = {n for n in names.values() if kind(n) == "projector_trained_copy"}
    if connector in ("lora", "sculpt"):
        expected[0.02] = {n for n in names.values() if kind(n) == "projector_lora"}
    assert by_rate == expected


@pytest.mark.parametrize("case", list(CASES))
def test_saved_files(case, runs):
    connector = CASES[case][0]
    run_dir = runs[case][0]
    adapter = load_safetensors(run_dir / "adapter_model.safetensors")
    config = json.loads((run_dir / "adapter_config.json").read_text())
    on_projector = sorted(k for k in adapter if "multi_modal_projector" in k)
    if connector == "full":
        assert config["modules_to_save"] == ["multi_modal_projector"] and len(on_projector) == 4
        assert all("lora_" not in k for k in on_projector)
        trained = load_safetensors(run_dir / "mm_projector.safetensors")
        copy = {k.split(".modules_to_save.")[0]: v for k, v in adapter.items() if "multi_modal_projector" in k}
        assert len(trained) == 4 and all(any(torch.equal(v, c) for c in copy.values()) for v in trained.values())
    else:
        assert not (run_dir / "mm_projector.safetensors").exists()  # nothing of the projector's own weights trained
        assert not config["modules_to_save"]
    if connector in ("lora", "sculpt"):
        dora = [f"{lin}.lora_magnitude_vector" for lin in PROJECTOR_LINEARS] if case == "dora-lora" else []
        assert [k.split("multi_modal_projector.")[1] for k in on_projector] == sorted(
            [f"{lin}.lora_{ab}.weight" for lin in PROJECTOR_LINEARS for ab in "AB"] + dora)
    if connector == "frozen":
        assert on_projector == []


def test_lora_connector_merges_and_loads_as_trained(runs, tiny_dir, tmp_path, tiny_processor):
    """The in-training model's logits = merge's = plain PEFT's = load_for_inference's (generate / eval); the merged
    projector is W0 + (alpha / r) B A, computed here in float64 from the saved factors; generate answers alike."""
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    from llava_sculpt.cli import main
    from llava_sculpt.model.load import load_for_inference

    run_dir, _, trainer = runs["lora"]
    inputs = sample_inputs(tiny_processor, tiny_dir)
    trained = trainer.model.eval()
    merged_dir = tmp_path / "merged"
    assert main(["merge", "--model-path", str(run_dir), "--output-dir", str(merged_dir)]) == 0
    merged = LlavaForConditionalGeneration.from_pretrained(merged_dir).eval()
    plain = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(tiny_dir / "model"),
                                      str(run_dir)).eval()
    loaded, _ = load_for_inference(str(run_dir))
    base = LlavaForConditionalGeneration.from_pretrained(tiny_dir / "model").eval()
    with torch.no_grad():
        reference = trained(**inputs).logits
        for other in (merged, plain, loaded):
            assert torch.allclose(other(**inputs).logits, reference, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(base(**inputs).logits, reference, atol=1e-3)

    adapter = load_safetensors(run_dir / "adapter_model.safetensors")
    scale = 8 / 4  # --lora_alpha 8, --lora_r 4 (tests/helpers.py)
    got = merged.model.multi_modal_projector.state_dict()
    for key, w0 in base_projector(tiny_dir).items():
        linear, part = key.split(".")
        if part == "bias":
            assert torch.equal(got[key], w0), key  # LoRA has no bias (--lora_bias none)
            continue
        a, b = (next(v for k, v in adapter.items() if f"multi_modal_projector.{linear}.lora_{ab}." in k).double()
                for ab in "AB")
        assert b.abs().max() > 0, key
        assert torch.allclose(got[key].double(), w0.double() + scale * b @ a, atol=1e-6), key

    (tmp_path / "g_run").mkdir()
    (tmp_path / "g_merged").mkdir()
    answers_run = generate_two_answers(run_dir, tiny_dir / "data" / "images", tmp_path / "g_run", 4)
    answers_merged = generate_two_answers(merged_dir, tiny_dir / "data" / "images", tmp_path / "g_merged", 4)
    assert [a["text"] for a in answers_run] == [a["text"] for a in answers_merged]


def test_dora_connector_merges_as_trained(runs, tmp_path, tiny_dir, tiny_processor):
    from transformers import LlavaForConditionalGeneration

    from llava_sculpt.merge import merge_run

    run_dir, _, trainer = runs["dora-lora"]
    merged = LlavaForConditionalGeneration.from_pretrained(merge_run(str(run_dir), str(tmp_path / "merged"))).eval()
    inputs = sample_inputs(tiny_processor, tiny_dir)
    with torch.no_grad():
        assert torch.allclose(merged(**inputs).logits, trainer.model.eval()(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_sculpt_connector_has_the_connector_cmr(runs):
    """--connector sculpt is LoRASculpt's connector variant: the projector's LoRA layers are registered for the L1
    CMR of Eq. 10 (and not pruned)."""
    method = runs["sculpt"][2].method
    assert sorted(layer.name.rsplit(".", 1)[-1] for layer in method.layers if layer.kind == "connector") == \
        list(PROJECTOR_LINEARS)
    assert method.flags.sculpt_connector is True
    assert not any("multi_modal_projector" in name for name in method.masks)


def cli_args(tiny_dir, out, *extra, steps=3) -> list[str]:
    """tests/helpers.py's training flags; without the LoRA flags for LLaVA's stage 1, which refuses them."""
    args = train_args(tiny_dir, out, *extra, steps=steps)
    if "projector" not in extra:
        return args
    lora = {i for i, a in enumerate(args) if a in ("--lora_r", "--lora_alpha", "--lora_dropout")}
    return [a for i, a in enumerate(args) if i not in lora and i - 1 not in lora]


def _parsed(tiny_dir, *extra):
    from llava_sculpt.training.arguments import parse_args
    from llava_sculpt.training.run_dir import run_args_record

    model_args, data_args, training_args, method = parse_args(cli_args(tiny_dir, "/nonexistent/out", *extra))
    record = run_args_record(model_args, data_args, training_args, method)
    return record, method


@pytest.mark.parametrize("alias, new, fully_trained", [
    (["--freeze_mm_mlp_adapter", "True"], ["--connector", "frozen"], False),
    (["--method", "sculpt", "--sculpt_connector", "True"], ["--method", "sculpt", "--connector", "sculpt"], False),
    (["--freeze_mm_mlp_adapter", "False"], ["--connector", "full"], True),
    (["--method", "sculpt", "--sculpt_connector", "False"], ["--method", "sculpt", "--connector", "full"], True),
])
def test_aliases_give_the_same_run(alias, new, fully_trained, tiny_dir):
    """The old flag and --connector give the same run_args.json record (so the same run: the alias is set from
    --connector and --connector from the alias)."""
    (old_record, old_method), (new_record, new_method) = _parsed(tiny_dir, *alias), _parsed(tiny_dir, *new)
    assert old_record == new_record
    assert old_method.trains_projector == new_method.trains_projector == fully_trained


def test_default_is_what_each_method_did(tiny_dir):
    for method in ("lora", "sculpt", "dora", "dare", "full", "spider", "asymlora"):
        record, obj = _parsed(tiny_dir, "--method", method)
        assert record["training_args"]["connector"] == "full" and not record["training_args"]["freeze_mm_mlp_adapter"]
        assert obj.trains_projector, method
    record, _ = _parsed(tiny_dir, "--method", "projector")
    assert record["training_args"]["connector"] == "full"


@pytest.mark.parametrize("method", ["lora", "dora", "l2", "orth"])
def test_lora_connector_methods_accepted(method, tiny_dir):
    record, obj = _parsed(tiny_dir, "--method", method, "--connector", "lora")
    assert record["training_args"]["connector"] == "lora" and not obj.trains_projector


@pytest.mark.parametrize("extra, named", [
    (["--connector", "lora", "--freeze_mm_mlp_adapter", "True"], "contradict"),
    (["--connector", "frozen", "--freeze_mm_mlp_adapter", "False"], "--freeze_mm_mlp_adapter False contradicts"),
    (["--method", "sculpt", "--connector", "full", "--sculpt_connector", "True"], "contradict"),
    (["--method", "sculpt", "--connector", "sculpt", "--sculpt_connector", "False"], "--sculpt_connector False"),
    (["--method", "sculpt", "--sculpt_connector", "True", "--freeze_mm_mlp_adapter", "True"], "contradict"),
    (["--method", "sculpt", "--connector", "lora"], "--connector sculpt"),
    (["--method", "dare", "--connector", "lora"], "--method dare"),
    (["--method", "tailor", "--connector", "lora"], "--method tailor"),
    (["--method", "intruders", "--connector", "lora"], "--method intruders"),
    (["--method", "asymlora", "--connector", "lora"], "--method asymlora"),
    (["--method", "full", "--connector", "lora"], "without LoRA"),
    (["--method", "spider", "--connector", "lora"], "without LoRA"),
    (["--connector", "sculpt"], "only with --method sculpt"),
    (["--sculpt_connector", "True"], "only with --method sculpt"),
    (["--method", "projector", "--connector", "lora"], "--connector lora with LLaVA's stage-1"),
    (["--method", "projector", "--connector", "frozen"], "--connector frozen with LLaVA's stage-1"),
    (["--method", "projector", "--freeze_mm_mlp_adapter", "True"], "--freeze_mm_mlp_adapter True with LLaVA's stage-1"),
])
def test_refusals(extra, named, tiny_dir, tmp_path, capsys):
    from llava_sculpt.cli import main

    out = tmp_path / "refused"
    assert main(["train", *cli_args(tiny_dir, out, *extra)]) == 2
    err = one_line(capsys.readouterr().err)
    assert named in err and "Traceback" not in err, err
    assert not out.exists()


def test_unknown_value_is_an_argparse_error(tiny_dir, tmp_path, capsys):
    from llava_sculpt.cli import main

    with pytest.raises(SystemExit) as exit_info:  # argparse's own exit, as for every flag with choices
        main(["train", *cli_args(tiny_dir, tmp_path / "x", "--connector", "partial")])
    assert exit_info.value.code == 2
    assert "--connector: invalid choice: 'partial'" in capsys.readouterr().err


def test_finished_or_checkpointed_run_refuses_another_connector(tiny_dir, tmp_path, capsys):
    from llava_sculpt.cli import main

    out = tmp_path / "run"
    assert run_train(tiny_dir, out, "--connector", "lora", "--save_strategy", "steps", "--save_steps", "1",
                     steps=2) == 0
    capsys.readouterr()
    assert run_train(tiny_dir, out, "--connector", "lora", steps=2) == 0  # the same run: nothing to do
    assert "already complete" in capsys.readouterr().out
    assert main(["train", *train_args(tiny_dir, out, "--connector", "full", steps=2)]) == 2
    err = one_line(capsys.readouterr().err)
    assert '--connector ("lora" in the finished run, "full" now)' in err, err
    # an unfinished run: resuming its checkpoint with another connector is refused before loading it
    (out / "training_complete.json").unlink()
    assert main(["train", *train_args(tiny_dir, out, "--connector", "frozen", steps=3)]) == 2
    err = one_line(capsys.readouterr().err)
    assert "checkpoint-2 was trained with --connector lora" in err and "Traceback" not in err, err


def test_every_method_has_a_connector_answer():
    """Each fine-tuning method either supports --connector lora or has its own reason for refusing it."""
    from llava_sculpt.methods import METHODS
    from llava_sculpt.training.arguments import _NO_LORA_CONNECTOR, CONNECTOR_METHODS

    assert set(CONNECTOR_METHODS["lora"]) | set(_NO_LORA_CONNECTOR) == set(METHODS)
    assert not set(CONNECTOR_METHODS["lora"]) & set(_NO_LORA_CONNECTOR)
