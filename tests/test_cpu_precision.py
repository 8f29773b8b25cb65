"""bf16 on a CPU that only emulates it: `train --bf16 True` and `eval --dtype bfloat16` still run, and say
that float32 is the fast choice there; where the CPU has native bf16 (or training is on a GPU) they say nothing."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import llava_sculpt.training.arguments as arguments
import llava_sculpt.training.validation as validation
from llava_sculpt.eval.generate import check_cpu_dtype


@pytest.mark.parametrize("native", [True, False])
def test_train_notes_emulated_bf16_on_cpu(monkeypatch, capsys, native):
    monkeypatch.setattr(validation, "cpu_bf16_is_native", lambda: native)
    monkeypatch.setattr(validation, "has_accelerator", lambda: False)
    validation.check_cpu_precision(SimpleNamespace(bf16=True, use_cpu=True))
    out = capsys.readouterr().out
    assert ("--bf16 True on a CPU without native bfloat16" in out and "--bf16 False" in out) == (not native)
    validation.check_cpu_precision(SimpleNamespace(bf16=False, use_cpu=True))  # float32: nothing to say
    assert capsys.readouterr().out == ""


def test_train_on_a_gpu_says_nothing(monkeypatch, capsys):
    monkeypatch.setattr(validation, "cpu_bf16_is_native", lambda: False)
    monkeypatch.setattr(validation, "has_accelerator", lambda: True)
    validation.check_cpu_precision(SimpleNamespace(bf16=True, use_cpu=False))
    assert capsys.readouterr().out == ""
    validation.check_cpu_precision(SimpleNamespace(bf16=True, use_cpu=True))  # --use_cpu: on the CPU after all
    assert "--bf16 True on a CPU" in capsys.readouterr().out


@pytest.mark.parametrize("native", [True, False])
def test_eval_notes_emulated_bf16_on_cpu(monkeypatch, capsys, native):
    monkeypatch.setattr(arguments, "cpu_bf16_is_native", lambda: native)
    check_cpu_dtype(torch.bfloat16, "cpu")
    assert ("--dtype bfloat16 on a CPU without native bfloat16" in capsys.readouterr().err) == (not native)
    check_cpu_dtype(torch.float32, "cpu")
    check_cpu_dtype(torch.bfloat16, "cuda:0")
    assert capsys.readouterr().err == ""
