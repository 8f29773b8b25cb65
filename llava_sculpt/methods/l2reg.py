"""L2-Regularization baseline (paper Table 1 row (d); Appendix F: "L2 regularization with a hyperparameter
(1e-3) to the LoRA weights, guiding the fine-tuned model closer to the pretrained model"; the idea of a
quadratic pull towards the starting weights is the paper's ref. [28], EWC: Kirkpatrick et al., PNAS'17, Eq. 3,
here with a uniform importance F_i = 1 and lambda in place of lambda/2, as Appendix F states it).

    L = L_task + lambda * sum_t || theta_t - theta0_t ||_F^2          (a plain sum of squares over all entries)

Not normalised by the number of tensors or by their sizes: on LLaVA-7B at r = 32 (448 adapter tensors,
131,072 entries in one q_proj A) such a mean would be ~6e7 times weaker, its gradient (rms ~3e-13) would
change no entry of a bf16 task gradient, and `--method l2` would silently train plain LoRA.

theta_t runs over the regularised tensors and theta0_t is each tensor's value when training starts:
with a fresh adapter B's reference is 0 and A's is its random initialisation (with --lora_weight_path, the
loaded adapter).  The regularised tensors are every trainable tensor of the adapter (lora_A / lora_B, plus
the biases --lora_bias trains, if any).  The projector is fully fine-tuned, not a LoRA weight, so it is left
out by default; `--l2_include_projector True` adds its weights and biases (reference = the base checkpoint's
projector, or the --lora_weight_path one).  The value logged as `l2_penalty` includes lambda.

theta0 is part of the method state (`method_state.safetensors`, keys = parameter names), so a resumed run
pulls towards the same reference.  The penalty is computed in float32 (float64 if the weights are), whatever
the training dtype.  DeepSpeed: ZeRO-0/1/2 keep full parameters on every rank and need nothing special;
under ZeRO-3 the partitioned tensors are gathered for the capture of theta0 and for the penalty
(`deepspeed.zero.GatheredParameters`), see `methods.zero.gathered`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from llava_sculpt.errors import UserError
from llava_sculpt.methods.base import FineTuningMethod, RunContext
from llava_sculpt.methods.lora import inject_lora
from llava_sculpt.methods.zero import full_shape, gathered, unwrap


@dataclass
class L2Flags:
    l2_lambda: float = field(default=1e-3, metadata={"help": "--method l2: weight lambda of the L2 pull of the "
                             "adapter towards its starting value (paper Appendix F: 1e-3)"})
    l2_include_projector: bool = field(default=False, metadata={"help": "--method l2: also pull the fully "
                                       "trained projector towards its starting value (default: LoRA tensors only)"})


def regularised_parameters(model, include_projector: bool = False) -> dict[str, torch.nn.Parameter]:
    """{name: parameter} of the tensors the penalty covers: trainable adapter tensors, and the projector's
    trainable tensors when `include_projector`.  Names are the PEFT model's `named_parameters()` names."""
    out = {}
    for name, param in unwrap(model).named_parameters():
        if not param.requires_grad:
            continue
        if "multi_modal_projector" in name and "lora_" not in name and not include_projector:
            continue
        out[name] = param
    return out


def l2_penalty(params: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_t ||params[t] - refs[t]||_F^2, a differentiable scalar (refs are constants; EWC Eq. 3 with F = 1).

    Computed in float64 if any parameter is float64, else in float32."""
    if len(params) != len(refs) or not params:
        raise ValueError(f"need the same non-zero number of parameters and references, got {len(params)} "
                         f"and {len(refs)}")
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
    total = None
    with torch.autocast(params[0].device.type, enabled=False):
        for p, ref in zip(params, refs):
            term = (p.to(dtype) - ref.detach().to(dtype)).square().sum()
            total = term if total is None else total + term
    return total


class L2Method(FineTuningMethod):
    name = "l2"
    flags_class = L2Flags

    def __init__(self, flags=None):
        super().__init__(flags if flags is not None else L2Flags())
        self.theta0: dict[str, torch.Tensor] = {}   # name -> float32/64 copy of the starting value
        self._bound: list[tuple[torch.nn.Parameter, torch.Tensor]] | None = None

    def inject(self, model, run: RunContext):
        return inject_lora(model, run)

    def on_train_begin(self, model, run: RunContext) -> None:
        self._bind(model)

    def _bind(self, model) -> None:
        """Pair every regularised parameter with its reference; capture the references if there are none
        yet (fresh run), else check that the loaded ones (resumed run) belong to this model."""
        params = regularised_parameters(model, self.flags.l2_include_projector)
        if not params:
            raise UserError("--method l2: the model has no trainable adapter tensor to regularise")
        if not self.theta0:
            with torch.no_grad(), gathered(list(params.values())):
                self.theta0 = {n: p.detach().to(torch.float64 if p.dtype == torch.float64 else torch.float32)
                               .clone() for n, p in params.items()}
        elif set(self.theta0) != set(params) or any(self.theta0[n].shape != full_shape(p) for n, p in params.items()):
            missing = sorted(set(params) - set(self.theta0))[:2]
            extra = sorted(set(self.theta0) - set(params))[:2]
            raise UserError("--method l2: the saved reference weights (method_state.safetensors of the checkpoint "
                            f"being resumed) do not match the model's trainable tensors (missing e.g. {missing}, "
                            f"unexpected e.g. {extra}, or different shapes); resume with the same --lora_r, "
                            "targets and --l2_include_projector as the original run")
        self._bound = [(p, self.theta0[n].to(p.device)) for n, p in params.items()]

    def extra_loss(self, model) -> torch.Tensor:
        if self._bound is None:
            self._bind(model)
        params = [p for p, _ in self._bound]
        with gathered(params):
            return self.flags.l2_lambda * l2_penalty(params, [r for _, r in self._bound])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.theta0)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.theta0 = {k: v.clone() for k, v in state.items()}
        self._bound = None
