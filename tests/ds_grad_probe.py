"""Test probe: `python tests/ds_grad_probe.py OUT.pt TRAIN-ARGS...` trains like `llava_sculpt/train.py` under
DeepSpeed and records, for the LoRA tensors of the language model's q/k/v layers,
  * after step 1: the 16-bit parameters and base weights the model holds (the inputs of step 2's CMR),
  * after step 2: DeepSpeed's fp32 Adam first moment (with --adam_beta1 0 it is the fp32 gradient the
    optimizer stepped with), read through DeepSpeed's public `safe_get_full_optimizer_state`.
It only observes (a Trainer callback); nothing in the training is changed."""
from __future__ import annotations

import sys

import torch
import transformers

import llava_sculpt.train as train

OUT = sys.argv[1]
TARGETS = ("q_proj", "k_proj", "v_proj")
record: dict[str, dict[str, torch.Tensor]] = {"params": {}, "weights": {}, "grads": {}}


def regularised(model):
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS and "language_model" in name and hasattr(module, "lora_A"):
            yield name, module


class Probe(transformers.TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        from deepspeed.utils import safe_get_full_optimizer_state

        if state.global_step == 1:
            for name, module in regularised(model):
                record["weights"][name] = module.base_layer.weight.detach().clone()
                for part in ("lora_A", "lora_B"):
                    record["params"][f"{name}.{part}"] = getattr(module, part)["default"].weight.detach().clone()
        elif state.global_step == 2:
            for name, module in regularised(model):
                for part in ("lora_A", "lora_B"):
                    param = getattr(module, part)["default"].weight
                    record["grads"][f"{name}.{part}"] = safe_get_full_optimizer_state(param, "exp_avg").clone()
            torch.save(record, OUT)


class ProbedTrainer(train.LlavaSculptTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(Probe())


train.LlavaSculptTrainer = ProbedTrainer
sys.exit(train.run_cli(train.main, sys.argv[2:]))
