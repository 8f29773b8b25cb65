"""--loss_normalization (LLaVA-1.5's per-micro-batch mean vs transformers 5's global token average) checked
against a loss computed by hand, and real data parallelism: two CPU processes (torchrun, gloo) against one
process with gradient accumulation that draws the same samples in the same groups."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ddp_runner import instrumented_run
from helpers import REPO, free_port, load_safetensors, logged_losses, train_args

IGNORE = -100


# ------------------------------------------------------------------------ 10: the loss of one optimizer step

# Two optimizer steps of 2 micro-batches x 2 samples (sequential sampler), sample kinds of the tiny data:
# i % 6 == 0..2 one-word answer, 3 two answers, 4 a caption, 5 text-only -> micro-batches of different token counts.
GROUPS = [[[0, 4], [3, 5]], [[1, 10], [2, 11]]]
LR, L2_LAMBDA = 0.5, 0.3


class _HandReference:
    """Two SGD steps computed directly: forward each micro-batch, cross-entropy by hand, one backward per step,
    from the run's initial weights (the same flags build the same model and adapter initialisation)."""

    def __init__(self, argv, data_path):
        from llava_sculpt.data.conversation import get_template
        from llava_sculpt.data.dataset import LlavaCollator, LlavaSupervisedDataset
        from llava_sculpt.methods import RunContext
        from llava_sculpt.model.load import load_processor
        from llava_sculpt.train import build_model, parse_args

        model_args, data_args, training_args, self.method = parse_args(argv)
        processor = load_processor(model_args.model_name_or_path)
        self.model = build_model(model_args, training_args, self.method,
                                 RunContext(model_args, data_args, training_args)).train()
        dataset = LlavaSupervisedDataset(str(data_path), data_args.image_folder, processor.tokenizer,
                                         processor.image_processor, self.model.config,
                                         get_template(model_args.version), training_args.model_max_length,
                                         data_args.image_aspect_ratio)
        collate = LlavaCollator(processor.tokenizer.pad_token_id)
        order = [i for step in GROUPS for mb in step for i in mb]  # the rows of data_path
        self.batches = [[collate([dataset[order.index(i)] for i in micro]) for micro in step] for step in GROUPS]
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.init = {n: p.detach().clone() for n, p in self.trainable.items()}

    def run(self, mode, penalty_factor=1.0):
        """(final trainable parameters, losses of the two steps, label tokens per micro-batch)"""
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(self.init[n])
        losses, counts = [], []
        for step in self.batches:
            ce_sums, ce_counts = [], []
            for batch in step:
                batch = dict(batch)
                labels = batch.pop("labels")
                logits = self.model(**batch).logits.float()
                target = labels[:, 1:].reshape(-1)
                ce_sums.append(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target,
                                               ignore_index=IGNORE, reduction="sum"))
                ce_counts.append(int((target != IGNORE).sum()))
            counts.append(ce_counts)
            if mode == "llava":  # mean over each micro-batch's own tokens, then over the micro-batches
                task = sum(s / n for s, n in zip(ce_sums, ce_counts)) / len(step)
            else:  # every label token of the optimizer step weighs the same
                task = sum(ce_sums) / sum(ce_counts)
            penalty = self.method.extra_loss(self.model)  # L2 pull towards the start (its formula: not under test)
            losses.append(float(task.detach() + penalty.detach()))
            self.model.zero_grad()
            (task + penalty_factor * penalty).backward()
            with torch.no_grad():
                for p in self.trainable.values():
                    p -= LR * p.grad
        return {n: p.detach().clone() for n, p in self.trainable.items()}, losses, counts


def _rel_err(got: dict, want: dict, start: dict) -> float:
    """|| (got - start) - (want - start) || / || want - start ||  over all tensors (the update's relative error)."""
    num = sum(float((got[n] - want[n]).double().square().sum()) for n in want)
    den = sum(float((want[n] - start[n]).double().square().sum()) for n in want)
    return (num / den) ** 0.5


@pytest.mark.parametrize("mode", ["llava", "global_tokens"])
def test_loss_normalization_matches_hand_computed_sgd(tiny_dir, tmp_path, mode):
    """Gradient accumulation 2, plain SGD (update = -lr * gradient, no clipping) and the L2 method, whose
    penalty is non-zero from the 2nd step on: the trained weights equal two steps computed by hand."""
    samples = json.loads((tiny_dir / "data" / "train.json").read_text())
    data_path = tmp_path / "train.json"
    data_path.write_text(json.dumps([samples[i] for step in GROUPS for mb in step for i in mb]))
    out = tmp_path / "run"
    argv = train_args(tiny_dir, out, "--gradient_accumulation_steps", 2, "--train_sampling_strategy", "sequential",
                      "--optim", "sgd", "--learning_rate", LR, "--mm_projector_lr", LR,
                      "--lr_scheduler_type", "constant", "--max_grad_norm", 0, "--method", "l2",
                      "--l2_lambda", L2_LAMBDA, "--loss_normalization", mode, steps=2)
    argv[argv.index("--data_path") + 1] = str(data_path)
    assert instrumented_run(argv, tmp_path / "dump") == 0
    assert json.loads((tmp_path / "dump" / "rank0_ids.json").read_text())[:8] == list(range(8))  # in order
    trained = {k[len("param/"):]: v for k, v in load_safetensors(tmp_path / "dump" / "rank0.safetensors").items()
               if k.startswith("param/")}

    argv[argv.index("--output_dir") + 1] = str(tmp_path / "unused")
    ref = _HandReference(argv, data_path)
    want, losses, counts = ref.run(mode)
    assert all(a != b for a, b in counts), counts  # the micro-batches of each step differ in label tokens
    assert trained.keys() == want.keys()
    err = _rel_err(trained, want, ref.init)
    assert err < 1e-5, err  # fp32, the same operations grouped differently: ~2e-8 here
    assert logged_losses(out) == pytest.approx(losses, rel=1e-6)
    # the comparison tells the two modes apart, and a penalty counted 0 or 2 times per optimizer step
    assert _rel_err(trained, ref.run("global_tokens" if mode == "llava" else "llava")[0], ref.init) > 1e-3
    for factor in (0.0, 2.0):
        assert _rel_err(trained, ref.run(mode, penalty_factor=factor)[0], ref.init) > 1e-3, factor


# ------------------------------------------------------------------------ 11: two processes vs one

METHOD_FLAGS = {"lora": [], "l2": ["--method", "l2", "--l2_lambda", "0.3"],
                "sculpt": ["--method", "sculpt", "--sculpt_step", "2", "--cmr_lambda", "0.5"]}
CASES = [("lora", "llava"), ("l2", "llava"), ("sculpt", "llava"), ("l2", "global_tokens"),
         ("sculpt", "global_tokens")]
STEPS, BATCH = 6, 2  # 6 optimizer steps x 2 processes x 2 samples = the 24 tiny samples, one epoch


def _case_argv(tiny_dir, out, method, mode, grad_accum):
    return train_args(tiny_dir, out, "--use_cpu", "True", "--loss_normalization", mode,
                      "--gradient_accumulation_steps", grad_accum, "--per_device_train_batch_size", BATCH,
                      *METHOD_FLAGS[method], steps=STEPS)


@pytest.fixture(scope="module")
def ddp_runs(tiny_dir, tmp_path_factory):
    """Every case trained by 2 processes (one torchrun launch, the cases one after another) with gradient
    accumulation 1, and by 1 process with gradient accumulation 2."""
    root = tmp_path_factory.mktemp("ddp")
    spec, runs = [], {}
    for method, mode in CASES:
        name = f"{method}-{mode}"
        runs[method, mode] = {"single": root / name / "single", "ddp": root / name / "ddp"}
        spec.append({"argv": _case_argv(tiny_dir, root / name / "ddp" / "out", method, mode, 1),
                     "dump": str(root / name / "ddp" / "dump")})
    (root / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "tests/ddp_runner.py", str(root / "spec.json")]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process
    try:
        for (method, mode), dirs in runs.items():
            argv = _case_argv(tiny_dir, dirs["single"] / "out", method, mode, 2)
            assert instrumented_run(argv, dirs["single"] / "dump") == 0
    finally:
        torch.set_num_threads(threads)
    return runs


def _dump(run: Path, rank: int):
    tensors = load_safetensors(run / "dump" / f"rank{rank}.safetensors")
    return tensors, json.loads((run / "dump" / f"rank{rank}_ids.json").read_text())


def _penalties(run_dir: Path) -> list[float]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return [v for h in state["log_history"] for k, v in h.items() if k.endswith("_penalty")]


@pytest.mark.slow
@pytest.mark.parametrize("method,mode", CASES)
def test_two_processes_equal_one_with_accumulation(ddp_runs, method, mode):
    single, ddp = ddp_runs[method, mode]["single"], ddp_runs[method, mode]["ddp"]
    one, one_ids = _dump(single, 0)
    r0, r0_ids = _dump(ddp, 0)
    r1, r1_ids = _dump(ddp, 1)
    # The same samples in the same groups: the shuffled order is the same in both runs (accelerate's seedable
    # sampler, seeded by --seed), and batch b of it goes to process b % 2, so optimizer step k sees micro-batches
    # 2k and 2k+1 of the order in both runs.
    one_ids, r0_ids, r1_ids = one_ids[:STEPS * 2 * BATCH], r0_ids[:STEPS * BATCH], r1_ids[:STEPS * BATCH]
    assert sorted(one_ids) == list(range(24)) and one_ids != sorted(one_ids)  # one shuffled epoch
    for k in range(STEPS):
        pairs = one_ids[4 * k:4 * k + 2], one_ids[4 * k + 2:4 * k + 4]
        assert pairs == (r0_ids[2 * k:2 * k + 2], r1_ids[2 * k:2 * k + 2]), k

    # the processes hold identical weights and method state (LoRASculpt's masks, L2's theta0), bit for bit
    assert r0.keys() == r1.keys() == one.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    # ... and equal to the one-process run.  Here even bit for bit: each micro-batch's gradient is computed alike
    # (one thread each), and a/2 + b/2 (accumulation) = (a + b)/2 (all-reduce, then DDP's mean) in fp32 as the
    # factors are powers of two; the tolerance only allows for another summation order (other thread counts).
    assert logged_losses(ddp / "out") == pytest.approx(logged_losses(single / "out"), rel=1e-6)
    assert _penalties(ddp / "out") == pytest.approx(_penalties(single / "out"), rel=1e-6)
    assert len(logged_losses(ddp / "out")) == STEPS
    for name in ["adapter_model.safetensors", "mm_projector.safetensors"]:
        a, b = load_safetensors(ddp / "out" / name), load_safetensors(single / "out" / name)
        assert a.keys() == b.keys(), name
        for k in a:
            assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-8), (name, k, float((a[k] - b[k]).abs().max()))
    method_files = sorted(p.relative_to(ddp / "out") for p in (ddp / "out").rglob("method_state*"))
    if method == "lora":
        assert method_files == [] and not any(k.startswith("method/") for k in r0)
        return
    assert method_files == [Path("method_state.safetensors")]  # written once, by the main process
    saved = load_safetensors(ddp / "out" / "method_state.safetensors")
    assert saved.keys() == {k[len("method/"):] for k in r0 if k.startswith("method/")}
    assert all(torch.equal(saved[k], r0[f"method/{k}"]) for k in saved)
    if method == "sculpt":
        masks = {k: v for k, v in saved.items() if k.startswith("mask/")}
        assert len(masks) == 28 and int(saved["pruned_at_step"]) == 2  # pruning happened, in both runs alike
        assert all(torch.equal(one[f"method/{k}"], masks[k]) for k in masks) and int(one["method/pruned_at_step"]) == 2
        adapter = load_safetensors(ddp / "out" / "adapter_model.safetensors")
        assert sum(int(torch.count_nonzero(v)) for k, v in adapter.items() if "lora_" in k) == \
            sum(int(m.sum()) for m in masks.values())
    else:
        assert all(torch.equal(one[f"method/{k}"], saved[k]) for k in saved)  # theta0 of the L2 pull


def test_flag_documented_and_defaults_to_llava():
    from llava_sculpt.train import TrainingArguments, build_parser

    help_text = " ".join(build_parser().format_help().split())
    assert "--loss_normalization {llava,global_tokens}" in help_text and "transformers 5's default" in help_text
    field = TrainingArguments.__dataclass_fields__["loss_normalization"]
    assert field.default == "llava"


def test_cpu_processes_without_use_cpu_are_refused(monkeypatch):
    """On a machine without an accelerator, several processes without --use_cpu would each train their own
    copy (no DDP wrapper) on a share of the data: refused before anything is loaded."""
    from types import SimpleNamespace

    from llava_sculpt.errors import UserError
    from llava_sculpt.train import check_cpu_data_parallel

    args = SimpleNamespace(deepspeed=None, use_cpu=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--use_cpu True"):
        check_cpu_data_parallel(args)
    check_cpu_data_parallel(SimpleNamespace(deepspeed=None, use_cpu=True))
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_cpu_data_parallel(args)
