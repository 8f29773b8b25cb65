"""scripts/finetune.sh on several nodes: DeepSpeed's `--hostfile` launcher or torchrun on each node, and DRY_RUN=1,
which prints the launch command instead of running it. Nothing is launched here: the printed commands are read back
with the real launchers' own argument parsers (DeepSpeed's runner, torch.distributed.run) and DeepSpeed's own
hostfile parser is the reference for which hostfiles are accepted; a stand-in PYTHON records anything that would
have started."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

SCRIPTS = REPO / "scripts"
TRAIN = str(REPO / "llava_sculpt" / "train.py")
LAUNCH_VARIABLES = ("HOSTFILE", "NUM_NODES", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "DRY_RUN",
                    "NUM_GPUS", "PYTHONPATH", "MODEL_BASE", "DATA_PATH", "IMAGE_FOLDER", "OUTPUT_DIR", "DS_CONFIG",
                    "DATA_ROOT", "RUNS_DIR", "METHODS", "RANKS", "TARGETS", "BENCHMARKS", "TRAIN_ARGS", "METHOD",
                    "TARGET", "LORA_R", "WORLD_DIR", "CORDA_DATA")


@pytest.fixture
def user_dir(tmp_path):
    """A user's folder: a checkpoint folder (config.json only: a dry run never loads it), a training JSON, an image
    folder, a DeepSpeed config, and `bin/python`, a stand-in interpreter that answers the scripts' own checks
    (`-c`) with the real one and records any other call (a launch) in launched.txt."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "train.json").write_text("[]")
    (tmp_path / "images").mkdir()
    (tmp_path / "zero2.json").write_text("{}")
    (tmp_path / "bin").mkdir()
    stub = tmp_path / "bin" / "python"
    stub.write_text(f'#!/usr/bin/env bash\n[ "$1" != -c ] || exec {sys.executable} "$@"\n'
                    f'printf "%s\\n" "$@" >> {tmp_path}/launched.txt\n')
    stub.chmod(0o755)
    return tmp_path


def run(script: str, cwd: Path, *args, **env) -> subprocess.CompletedProcess:
    """`bash scripts/SCRIPT args` from `cwd` with only the given launch variables set (paths relative to cwd)."""
    full = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    full.update(PYTHON="bin/python", MODEL_BASE="model", DATA_PATH="train.json", IMAGE_FOLDER="images",
                OUTPUT_DIR="runs/x", DS_CONFIG="zero2.json", OMP_WAIT_POLICY="PASSIVE")
    full.update({k: str(v) for k, v in env.items()})
    full = {k: v for k, v in full.items() if v != "<unset>"}
    return subprocess.run(["bash", os.path.relpath(SCRIPTS / script, cwd), *map(str, args)], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=120)


def printed_command(proc, user_dir) -> list[str]:
    """The one line DRY_RUN printed, split as a shell splits it: PYTHONPATH=REPO, then PYTHON and its arguments."""
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    words = shlex.split(lines[0])
    assert words[0] == f"PYTHONPATH={REPO}"
    assert words[1] == str(user_dir / "bin" / "python")
    assert not (user_dir / "launched.txt").exists() and not (user_dir / "runs").exists()
    return words[2:]


def train_flags(argv: list[str]) -> dict[str, str]:
    return {flag: argv[i + 1] for i, flag in enumerate(argv[:-1]) if flag.startswith("--")}


def test_one_node_dry_run_prints_the_command_it_runs_unchanged(user_dir):
    """Without HOSTFILE / NNODES: DeepSpeed's launcher with --num_gpus, exactly the command the script then runs
    (the stand-in records it); MASTER_ADDR / MASTER_PORT / NODE_RANK=0 in the environment change nothing."""
    extra = ("--max_steps", "5", "--run_name", "a b's")   # a word that needs quoting
    env = dict(NUM_GPUS=4, MASTER_ADDR="10.0.0.1", MASTER_PORT=29511, NODE_RANK=0)
    argv = printed_command(run("finetune.sh", user_dir, *extra, DRY_RUN=1, **env), user_dir)
    proc = run("finetune.sh", user_dir, *extra, **env)
    assert proc.returncode == 0, proc.stderr
    assert (user_dir / "launched.txt").read_text().splitlines() == argv
    assert argv[:5] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "4", TRAIN]
    flags = train_flags(argv)
    assert flags["--deepspeed"] == str(user_dir / "zero2.json")
    assert flags["--model_name_or_path"] == str(user_dir / "model")
    assert flags["--per_device_train_batch_size"] == "4" and flags["--gradient_accumulation_steps"] == "1"
    assert argv[-4:] == list(extra)
    assert not {"--hostfile", "--master_addr", "--master_port", "--node_rank"} & set(argv)


def test_one_node_cpu_dry_run(user_dir):
    """NUM_GPUS=0: the CPU command (llava_sculpt.train without DeepSpeed), printed, not run."""
    argv = printed_command(run("finetune.sh", user_dir, DRY_RUN=1, NUM_GPUS=0), user_dir)
    assert argv[:2] == ["-m", "llava_sculpt.train"] and "--deepspeed" not in argv


@pytest.mark.parametrize("num_gpus", ["<unset>", "2"])
def test_hostfile_dry_run_reads_back_with_deepspeeds_parser(user_dir, num_gpus):
    """HOSTFILE (relative to the caller, with comments, a blank line, spaces and CRLF, which DeepSpeed accepts) with
    NUM_NODES, MASTER_ADDR, MASTER_PORT: DeepSpeed's own runner parser reads the printed command back as --hostfile
    (absolute), --num_nodes, --master_addr, --master_port, the repository's train.py and its flags; NUM_GPUS is
    passed only when set (else the slots count)."""
    from deepspeed.launcher.runner import _parse_hostfile, parse_args

    text = "# our cluster\nnode-a slots=8\r\n\n   node-b   slots=8  # second\nnode-c slots=4\n"
    (user_dir / "hosts").write_text(text)
    assert list(_parse_hostfile(text.splitlines(keepends=True))) == ["node-a", "node-b", "node-c"]  # DeepSpeed: ok
    argv = printed_command(run("finetune.sh", user_dir, "--max_steps", "7", DRY_RUN=1, HOSTFILE="hosts",
                               NUM_NODES=2, MASTER_ADDR="node-a", MASTER_PORT=29600, NUM_GPUS=num_gpus), user_dir)
    assert argv[:2] == ["-m", "deepspeed.launcher.runner"]
    args = parse_args(argv[2:])
    assert args.hostfile == str(user_dir / "hosts") and args.num_nodes == 2
    assert args.master_addr == "node-a" and args.master_port == 29600
    assert args.num_gpus == (-1 if num_gpus == "<unset>" else 2)   # -1: DeepSpeed's "every slot"
    assert args.user_script == TRAIN
    flags = train_flags(args.user_args)
    assert flags["--deepspeed"] == str(user_dir / "zero2.json") and flags["--output_dir"] == str(user_dir / "runs/x")
    assert args.user_args[-2:] == ["--max_steps", "7"]
    # without MASTER_ADDR / NUM_NODES: DeepSpeed's defaults (the first host's address, every host)
    argv = printed_command(run("finetune.sh", user_dir, DRY_RUN=1, HOSTFILE="hosts", NUM_GPUS=num_gpus), user_dir)
    args = parse_args(argv[2:])
    assert args.master_addr == "" and args.num_nodes == -1 and args.hostfile == str(user_dir / "hosts")


def test_torchrun_dry_run_reads_back_with_torchruns_parser(user_dir):
    """NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT: `python -m torch.distributed.run` with --nnodes, --node_rank,
    --nproc_per_node NUM_GPUS, --master_addr, --master_port, then train.py with --deepspeed CONFIG (the Trainer
    starts DeepSpeed itself)."""
    from torch.distributed.run import get_args_parser

    argv = printed_command(run("finetune.sh", user_dir, "--max_steps", "2", DRY_RUN=1, NNODES=4, NODE_RANK=3,
                               MASTER_ADDR="gpu-node-01", MASTER_PORT=29700, NUM_GPUS=8), user_dir)
    assert argv[:2] == ["-m", "torch.distributed.run"]
    args = get_args_parser().parse_args(argv[2:])
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("4", 3, "8")
    assert (args.master_addr, args.master_port) == ("gpu-node-01", 29700)
    assert args.training_script == TRAIN
    flags = train_flags(args.training_script_args)
    assert flags["--deepspeed"] == str(user_dir / "zero2.json") and flags["--bf16"] == "True"
    assert args.training_script_args[-2:] == ["--max_steps", "2"]
    # one node through torchrun: NODE_RANK defaults to 0, MASTER_ADDR to torchrun's own (127.0.0.1)
    argv = printed_command(run("finetune.sh", user_dir, DRY_RUN=1, NNODES=1, NUM_GPUS=2), user_dir)
    args = get_args_parser().parse_args(argv[2:])
    assert (args.nnodes, args.node_rank, args.nproc_per_node, args.master_addr) == ("1", 0, "2", "127.0.0.1")


BAD_HOSTFILE = "# two nodes\nnode-a slots=8\n\nnode-b\n"


@pytest.mark.parametrize("env,hostfile,words", [
    (dict(HOSTFILE="no/hosts"), None, "HOSTFILE={dir}/no/hosts does not exist (expected DeepSpeed's hostfile"),
    (dict(HOSTFILE="hosts"), BAD_HOSTFILE, "HOSTFILE={dir}/hosts line 4 (node-b) has no slots=N"),
    (dict(HOSTFILE="hosts"), "node-a slots=8\nnode-a slots=4\n", "line 2 names node-a again (first on line 1)"),
    (dict(HOSTFILE="hosts"), "# nobody\n\n", "HOSTFILE={dir}/hosts names no host"),
    (dict(HOSTFILE="hosts"), "node-a slots=0\n", "line 1 (node-a slots=0) gives the host no GPU"),
    (dict(HOSTFILE="hosts", NUM_NODES=3), "a slots=1\nb slots=1\n", "NUM_NODES=3, but HOSTFILE={dir}/hosts lists 2"),
    (dict(NUM_NODES=2), None, "NUM_NODES=2 is set without HOSTFILE"),
    (dict(HOSTFILE="hosts", NNODES=2, NODE_RANK=0, MASTER_ADDR="a"), "a slots=1\n", "HOSTFILE and NNODES are both set"),
    (dict(NNODES=2, NODE_RANK=0), None, "set MASTER_ADDR (NNODES=2: the address of the node with NODE_RANK=0,"
     ' which every node can reach; under SLURM MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1))'),
    (dict(NNODES=2, MASTER_ADDR="a"), None, "set NODE_RANK (NNODES=2: this node's rank, 0 to 1, a different one on"
     " each node; under SLURM NODE_RANK=$SLURM_NODEID)"),
    (dict(NNODES=2, NODE_RANK=2, MASTER_ADDR="a"), None, "NODE_RANK=2 is not in [0, NNODES) = [0, 2)"),
    (dict(NNODES=2, NODE_RANK=-1, MASTER_ADDR="a"), None, "NODE_RANK=-1 is not in [0, NNODES) = [0, 2)"),
    (dict(NNODES=1, NODE_RANK=1), None, "NODE_RANK=1 is not in [0, NNODES) = [0, 1)"),
    (dict(NNODES="two"), None, "NNODES=two is not a positive number of nodes"),
    (dict(NODE_RANK=1), None, "NODE_RANK=1 is set without NNODES"),
    (dict(NNODES=2, NODE_RANK=0, MASTER_ADDR="a", MASTER_PORT="http"), None, "MASTER_PORT=http is not a port"),
    (dict(NNODES=2, NODE_RANK=0, MASTER_ADDR="a", NUM_GPUS=0), None, "NUM_GPUS=0 (a CPU run on this machine"),
    (dict(HOSTFILE="hosts", NUM_GPUS=0), "a slots=1\n", "NUM_GPUS=0 (a CPU run on this machine"),
    (dict(DRY_RUN="yes"), None, "DRY_RUN=yes: expected 1"),
    (dict(NNODES=2, NODE_RANK=0, MASTER_ADDR="a", MODEL_BASE="<unset>", DATA_PATH="<unset>",
          IMAGE_FOLDER="<unset>"), None, "NNODES is set, but MODEL_BASE, DATA_PATH and IMAGE_FOLDER are not"),
    (dict(DRY_RUN=1, MODEL_BASE="<unset>", DATA_PATH="<unset>", IMAGE_FOLDER="<unset>"), None,
     "DRY_RUN=1 needs MODEL_BASE, DATA_PATH and IMAGE_FOLDER"),
])
@pytest.mark.parametrize("dry_run", ["0", "1"])
def test_bad_launch_variables_stop_in_one_line_before_anything_starts(user_dir, env, hostfile, words, dry_run):
    """Each bad setting: exit 2, one line naming the variable (and the hostfile's line), nothing launched or created,
    with or without DRY_RUN (the embedded default, which builds a world, is never reached)."""
    if hostfile is not None:
        (user_dir / "hosts").write_text(hostfile)
    env = {"DRY_RUN": dry_run, "NUM_GPUS": 8, "WORLD_DIR": "world", **env}
    proc = run("finetune.sh", user_dir, **env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert words.format(dir=user_dir) in lines[0], lines[0]
    assert proc.stdout == ""
    assert not (user_dir / "launched.txt").exists() and not (user_dir / "runs").exists()
    assert not (user_dir / "world").exists()


def test_deepspeed_refuses_the_hostfile_we_refuse():
    """The reference for the hostfile rules: DeepSpeed's own parser rejects a line without slots= and a repeated
    host, and skips comments and blank lines (so the script stops where DeepSpeed's launcher would, but before
    it starts)."""
    from deepspeed.launcher.runner import _parse_hostfile

    with pytest.raises(ValueError, match="bad entry: node-b"):
        _parse_hostfile(BAD_HOSTFILE.splitlines(keepends=True))
    with pytest.raises(ValueError, match="multiple entries"):
        _parse_hostfile(["node-a slots=8\n", "node-a slots=4\n"])
    with pytest.raises(ValueError, match="empty"):
        _parse_hostfile(["# nobody\n", "\n"])


def prepared_data_root(root: Path) -> Path:
    """DATA_ROOT with what reproduce_table1.sh checks for one target (iconqa) and BENCHMARKS=iconqa."""
    (root / "iconqa" / "images").mkdir(parents=True)
    (root / "iconqa" / "train.json").write_text("[]")
    (root / "iconqa" / "manifest.json").write_text(json.dumps({"image_folder": str(root / "iconqa" / "images")}))
    return root


def test_reproduce_table1_dry_run_prints_each_runs_hostfile_command(user_dir):
    """reproduce_table1.sh passes HOSTFILE / MASTER_ADDR through finetune.sh: with DRY_RUN=1 one command a run (a
    finished run skipped) and nothing else: no zero-shot evaluation, no table, nothing created."""
    from deepspeed.launcher.runner import parse_args

    prepared_data_root(user_dir / "data")
    (user_dir / "hosts").write_text("node-a slots=8\nnode-b slots=8\n")
    finished = user_dir / "t1" / "iconqa" / "sculpt_r16"
    finished.mkdir(parents=True)
    (finished / "training_complete.json").write_text("{}")
    proc = run("reproduce_table1.sh", user_dir, DRY_RUN=1, HOSTFILE="hosts", MASTER_ADDR="node-a", DATA_ROOT="data",
               RUNS_DIR="t1", METHODS="lora sculpt", RANKS="16 64", TARGETS="iconqa", BENCHMARKS="iconqa",
               TRAIN_ARGS="--max_steps 3")
    assert proc.returncode == 0, proc.stderr
    runs = []
    for line in proc.stdout.splitlines():
        words = shlex.split(line)
        # the repository first on PYTHONPATH (finetune.sh, called by reproduce_table1.sh, puts it first again)
        assert words[0].startswith(f"PYTHONPATH={REPO}:") and words[2:4] == ["-m", "deepspeed.launcher.runner"]
        args = parse_args(words[4:])
        assert (args.hostfile, args.master_addr) == (str(user_dir / "hosts"), "node-a")
        flags = train_flags(args.user_args)
        assert flags["--data_path"] == str(user_dir / "data" / "iconqa" / "train.json")
        assert args.user_args[-2:] == ["--max_steps", "3"]
        runs.append((flags["--method"], flags["--lora_r"], flags["--output_dir"]))
    assert runs == [("lora", "16", str(user_dir / "t1" / "iconqa" / "lora_r16")),
                    ("lora", "64", str(user_dir / "t1" / "iconqa" / "lora_r64")),
                    ("sculpt", "64", str(user_dir / "t1" / "iconqa" / "sculpt_r64"))]
    assert sorted(p.name for p in (user_dir / "t1").rglob("*")) == ["iconqa", "sculpt_r16", "training_complete.json"]
    assert not (user_dir / "launched.txt").exists()


@pytest.mark.parametrize("env,words", [
    (dict(NNODES=2, NODE_RANK=0, MASTER_ADDR="a"), "NNODES=2: reproduce_table1.sh trains and evaluates in turn"),
    (dict(HOSTFILE="none"), "HOSTFILE={dir}/none does not exist"),
])
def test_reproduce_table1_checks_the_launch_variables_first(user_dir, env, words):
    """A bad launch setting stops reproduce_table1.sh before the zero-shot evaluation (hours on a 7B model), not at
    its first training run; torchrun's NNODES is refused there (each node would run the evaluations too)."""
    prepared_data_root(user_dir / "data")
    proc = run("reproduce_table1.sh", user_dir, DATA_ROOT="data", RUNS_DIR="t1", TARGETS="iconqa",
               BENCHMARKS="iconqa", **env)
    assert proc.returncode == 2, proc.stderr
    assert words.format(dir=user_dir) in " ".join(proc.stderr.split())
    assert not (user_dir / "t1").exists() and not (user_dir / "launched.txt").exists()
