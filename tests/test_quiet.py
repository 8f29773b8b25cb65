"""Quiet, informative output: the commands a new user runs print no third-party noise (run as a user runs
them, in fresh processes, with DeepSpeed and bitsandbytes installed and no DS_ACCELERATOR / warning settings in
the environment); rerunning a finished training run says so and touches nothing; usage mistakes in
`llava-sculpt table` are one clear line; the eval driver prints a line per benchmark stage."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO, train_args
from llava_sculpt import cli

# Each is a message users reported and cannot act on (see llava_sculpt/quiet.py and train.py).
NOISE = (
    "Setting accelerator to CPU",                       # DeepSpeed accelerator auto-detection
    "gemm_4bit_forward", "kernels-community",            # bitsandbytes' optional CPU kernel
    "is deprecated",                                     # transformers 5.24: gradient_checkpointing / is_gradient_...
    "pin_memory",                                        # torch: pinning without an accelerator, every epoch
    "requires_grad=True to a scalar",                    # torch: float() of a loss that needs grad
    "use_cache=True",                                    # transformers: caching vs gradient checkpointing
    "mtime may not be reliable",                         # Trainer: checkpoints saved within a second
)
# Python's warning format ("path.py:12: FutureWarning: ..."), DeepSpeed's log format, transformers' logger
WARNING_LINE = re.compile(r"^\S+\.py:\d+: \w*Warning: |\[WARNING\]|^\[transformers\] ", re.MULTILINE)


def user_env() -> dict:
    """The environment of a user's shell: none of the settings that would hide the messages at their source
    (DS_ACCELERATOR) or change which warnings Python shows; offline and one thread for the test machine."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DS_ACCELERATOR", "PYTHONWARNINGS", "TOKENIZERS_PARALLELISM", "TRANSFORMERS_VERBOSITY")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def llava_sculpt(*argv, timeout=600) -> subprocess.CompletedProcess:
    """`llava-sculpt ARGV...` in a fresh process (the console script's code path: cli.main with sys.argv)."""
    return subprocess.run([sys.executable, "-m", "llava_sculpt.cli", *map(str, argv)], env=user_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def assert_quiet(proc: subprocess.CompletedProcess) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    found = [noise for noise in NOISE if noise in output]
    assert not found, f"noise {found} in:\n{output[-4000:]}"
    warning = WARNING_LINE.search(output)
    assert warning is None, f"a third-party warning in:\n{output[-4000:]}"


def snapshot(root) -> dict:
    """Every file and folder under root with its mtime and size."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.stat(path)
            out[os.path.relpath(path, root)] = (st.st_mtime_ns, st.st_size)
    return out


def test_both_packages_are_installed_so_the_tests_mean_something():
    assert importlib.util.find_spec("deepspeed") is not None
    assert importlib.util.find_spec("bitsandbytes") is not None


def test_cli_import_does_not_import_deepspeed_or_bitsandbytes():
    code = ("import sys, llava_sculpt.cli, llava_sculpt.errors, llava_sculpt.quiet, llava_sculpt.eval.table; "
            "print(sorted(m for m in ('deepspeed', 'bitsandbytes', 'torch', 'transformers', 'peft') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], env=user_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout


def test_bitsandbytes_kernel_notice_is_dropped():
    """The notice comes only on CPUs with AVX512-BF16 (not this one, maybe): bitsandbytes' CPU backend is
    re-run as on such a CPU, in a fresh process, without and with llava-sculpt's filters."""
    code = ("import importlib, sys\n"
            "if sys.argv[1] == 'quiet':\n"
            "    import llava_sculpt.quiet; llava_sculpt.quiet.install()\n"
            "import bitsandbytes.functional\n"
            "bitsandbytes.functional.has_avx512bf16 = lambda: True\n"
            "import bitsandbytes.backends.cpu.ops as ops\n"
            "importlib.reload(ops)\n")
    env = dict(user_env(), PYTHONWARNINGS="ignore")  # re-registering the kernels warns; not the point here
    outputs = {mode: subprocess.run([sys.executable, "-c", code, mode], env=env, cwd=REPO, capture_output=True,
                                    text=True, timeout=300) for mode in ("plain", "quiet")}
    assert all(proc.returncode == 0 for proc in outputs.values()), outputs
    if "gemm_4bit_forward" not in outputs["plain"].stderr:
        pytest.skip("this bitsandbytes no longer tries the kernels-community CPU kernel at import")
    assert "gemm_4bit_forward" not in outputs["quiet"].stdout + outputs["quiet"].stderr


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """`llava-sculpt tiny`, then a short `llava-sculpt train` with what makes each message appear:
    --gradient_checkpointing True (LLaVA's flag: transformers' deprecation, use_cache), checkpoints saved and
    rotated within a second (mtime), CPU (pin_memory, DeepSpeed's detection), LoRASculpt (its penalty)."""
    root = tmp_path_factory.mktemp("quiet")
    tiny = llava_sculpt("tiny", "--output-dir", root / "tiny", "--pretrain-steps", "2")
    run = root / "run"
    argv = ["train", *train_args(root / "tiny", run, "--method", "sculpt", "--sculpt_step", "2",
                                 "--gradient_checkpointing", "True", "--save_strategy", "steps", "--save_steps", "1",
                                 "--save_total_limit", "1", steps=3)]
    train = llava_sculpt(*argv)
    return root, run, argv, tiny, train


@pytest.mark.slow
def test_tiny_and_train_are_quiet(user_run):
    root, run, _, tiny, train = user_run
    assert_quiet(tiny)
    assert "pretrained the tiny model" in tiny.stdout and "tiny LLaVA-1.5-shaped model" in tiny.stdout
    assert_quiet(train)
    assert "done: adapter" in train.stdout and (run / "training_complete.json").is_file()
    assert json.loads((run / "run_args.json").read_text())["training_args"]["activation_checkpointing"] is True


@pytest.mark.slow
def test_generate_is_quiet(user_run):
    root, run, *_ = user_run
    questions = root / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question_id": f"q{i}", "image": f"{i:05d}.png",
                                             "text": "What colour is the shape?"}) + "\n" for i in range(2)))
    proc = llava_sculpt("generate", "--model-path", run, "--question-file", questions, "--image-folder",
                        root / "tiny" / "data" / "images", "--answers-file", root / "answers.jsonl",
                        "--max_new_tokens", "3")
    assert_quiet(proc)
    assert len((root / "answers.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_table_is_quiet(user_run):
    root, *_ = user_run
    run_dir = root / "evaluated"
    (run_dir / "scores").mkdir(parents=True)
    (run_dir / "run_meta.json").write_text(json.dumps({"method": "sculpt", "rank": 4, "target": "iconqa"}))
    for task in ("okvqa", "ocrvqa", "gqa", "textvqa", "iconqa"):
        (run_dir / "scores" / f"{task}.json").write_text(json.dumps({"task": task, "score": 50.0}))
    proc = llava_sculpt("table", run_dir)
    assert_quiet(proc)
    assert "| LoRASculpt | 50.00 |" in proc.stdout


@pytest.mark.slow
def test_rerunning_a_finished_run_says_so_and_writes_nothing(user_run):
    _, run, argv, _, _ = user_run
    before = snapshot(run)
    same = llava_sculpt(*argv)
    assert_quiet(same)
    assert "training is already complete (3 steps), with the same arguments; nothing to do" in same.stdout
    output = same.stdout + same.stderr
    assert "train_loss" not in output and "it/s" not in output and "%|" not in output  # no Trainer, no bar
    # logging / saving / data-loading flags do not make it another run
    housekeeping = llava_sculpt(*argv, "--logging_steps", "2", "--dataloader_num_workers", "1",
                                "--disable_tqdm", "false", "--save_strategy", "no")
    assert housekeeping.returncode == 0 and "already complete" in housekeeping.stdout, housekeeping.stderr
    # another learning rate is another run: refused, naming the flag, before anything is written
    other = llava_sculpt(*argv, "--learning_rate", "2e-3", "--sculpt_step", "1")
    assert other.returncode == 2
    message = " ".join(other.stderr.split())
    assert "holds a finished run (training_complete.json) trained with other arguments" in message
    assert "--learning_rate (0.001 in the finished run, 0.002 now)" in message
    assert "--sculpt_step (2 in the finished run, 1 now)" in message
    assert "new --output_dir" in message and "Traceback" not in other.stderr
    assert snapshot(run) == before


def test_table_usage_mistakes_are_one_clear_line(tmp_path, capsys):
    assert cli.main(["table", str(tmp_path), "--target", "iconqa2"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err == "llava-sculpt: error: --target 'iconqa2': the target tasks are iconqa, coco."
    assert cli.main(["table", "coco"]) == 2  # a target where a run directory belongs
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("llava-sculpt: error: 'coco' is a target task, not a run directory") and "--target coco" in err
    assert cli.main(["table", str(tmp_path), "--targte", "coco"]) == 2  # argparse's own errors: no usage dump
    err = capsys.readouterr().err
    assert "usage:" not in err and "unrecognized arguments: --targte coco" in " ".join(err.split())


def test_table_target_selects_one_table(tmp_path, capsys):
    for name, target in (("a", "iconqa"), ("b", "coco")):
        (tmp_path / name / "scores").mkdir(parents=True)
        (tmp_path / name / "run_meta.json").write_text(json.dumps({"method": "lora", "rank": 4, "target": target}))
        (tmp_path / name / "scores" / f"{target}.json").write_text(json.dumps({"task": target, "score": 10.0}))
    assert cli.main(["table", str(tmp_path / "a"), str(tmp_path / "b"), "--target", "coco"]) == 0
    out = capsys.readouterr().out
    assert "Fine-tuned on COCO-Caption" in out and "IconQA" not in out
    assert cli.main(["table", str(tmp_path / "a"), "--target", "coco"]) == 2
    assert "none of the runs was fine-tuned on coco (their tables: iconqa)" in " ".join(capsys.readouterr().err.split())


@pytest.mark.usefixtures("one_thread")
def test_eval_driver_prints_a_line_per_benchmark_stage(tiny_dir, tmp_path, capsys):
    from llava_sculpt.data.prepare.cli import main as prepare_main
    from llava_sculpt.data.prepare.synthetic_raw import write_raw_fixture
    from llava_sculpt.eval import run_benchmark

    for name in ("gqa", "iconqa"):
        write_raw_fixture(name, tmp_path / "raw" / name, seed=0, n=4)
        assert prepare_main([name, "--raw-dir", str(tmp_path / "raw" / name), "--out-dir",
                             str(tmp_path / "data" / name), "--num-train", "2"]) == 0
    argv = ["gqa", "iconqa", "--model-path", str(tiny_dir / "model"), "--data-root", str(tmp_path / "data"),
            "--eval-dir", str(tmp_path / "eval"), "--max-questions", "2", "--max-new-tokens", "3", "--num-gpus", "0",
            "--method", "zero-shot", "--no-progress"]
    capsys.readouterr()
    assert run_benchmark.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    stamp = r"^\[\s*\d+\.\ds\] "
    expected = [stamp + "loading .*model$"]
    for name in ("gqa", "iconqa"):
        expected += [stamp + f"{name}: generating 2 answer\\(s\\)$", stamp + f"{name}: scoring$",
                     stamp + f"{name}: exact_match = \\d+\\.\\d\\d \\(n=2 of the first 2 questions\\), done in "
                     "\\d+\\.\\ds$"]
    assert len(lines) == len(expected) + 1 and lines[-1].startswith("wrote "), lines
    for line, pattern in zip(lines, expected):
        assert re.match(pattern, line), (line, pattern)
    # a rerun: answers present, so no model is loaded; each benchmark is scored again
    assert run_benchmark.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [re.sub(stamp, "", line) for line in lines[:2]] == \
        [f"gqa: all 2 answers present in {tmp_path / 'eval' / 'answers' / 'gqa.jsonl'}", "gqa: scoring"]
    assert not any("loading" in line for line in lines)
