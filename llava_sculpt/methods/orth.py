"""Orth-Reg baseline (paper Table 1 row (c)): the orthogonal regularisation of PEGO (Hu et al., "Learn to
Preserve and Diversify: Parameter-Efficient Group with Orthogonal Regularization for Domain
Generalization", ECCV'24), without its group of several LoRA modules (paper Appendix F).

    L = L_task + lambda * sum_{l in targets} || W0_l (s B_l A_l)^T ||_1        s = alpha / r

W0 [out, in] is the frozen pretrained weight, A [r, in] and B [out, r] the LoRA pair, ||.||_1 the entry-wise
L1 norm of the [out, out] matrix: it pushes the rows of the update towards being orthogonal to the rows of
W0.  Targets: the LoRA pairs on the language model's q_proj and v_proj (`--orth_targets`, names of the
adapted linears), summed over layers, lambda = 1e-3 (`--orth_lambda`).  B starts at 0, so the penalty is 0
at the first step.  The value logged as `orth_penalty` includes lambda.

Computation without the [out, out] matrix (`orth_penalty`): with C = s W0 A^T ([out, r], small),
W0 (s B A)^T = C B^T, taken in row chunks P_i = C[i:j] B^T ([chunk, out]) inside a custom autograd function.
The same pass accumulates the gradients (the penalty is a scalar, so backward only scales them by grad_out):
G_i = sign(P_i),  dC[i:j] = G_i B,  dB = sum_i G_i^T C[i:j],  dA = s dC^T W0.  Extra memory is
O(chunk * out + out * r); W0 is read in row chunks and never copied whole (it may be bf16 while A, B are
fp32).  sign(0) = 0, the sub-gradient autograd uses for |x| at 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llava_sculpt.errors import UserError
from llava_sculpt.methods.base import FineTuningMethod, RunContext
from llava_sculpt.methods.zero import gathered, unwrap
from llava_sculpt.methods.lora import inject_lora


@dataclass
class OrthFlags:
    orth_lambda: float = field(default=1e-3, metadata={"help": "--method orth: weight lambda of the orthogonal "
                               "regulariser ||W0 (s B A)^T||_1 (paper Appendix F: 1e-3)"})
    orth_targets: str = field(default="q_proj,v_proj", metadata={"help": "--method orth: comma-separated names "
                              "of the adapted language-model linears the regulariser covers"})
    orth_chunk_rows: int = field(default=256, metadata={"help": "--method orth: rows of W0 per chunk when "
                                 "computing the penalty (memory O(chunk * out))"})


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class _ChunkedOrthL1(torch.autograd.Function):
    """||W0 (s B A)^T||_1 in row chunks.  The output is a scalar, so its gradients are grad_out times fixed
    tensors: they are accumulated in the same pass over the chunks as the value, and only these [r, in] and
    [out, r] tensors are kept for backward (no reference to A, B or W0: under ZeRO-3 those are partitioned
    again by the time backward runs)."""

    @staticmethod
    def forward(ctx, lora_A, lora_B, weight, scaling, chunk_rows, want_grads):
        dtype = _compute_dtype(lora_A, lora_B, weight)
        out_features = weight.shape[0]
        with torch.no_grad(), torch.autocast(lora_A.device.type, enabled=False):
            a, b = lora_A.detach().to(dtype), lora_B.detach().to(dtype)             # [r, in], [out, r]
            c = torch.empty(out_features, a.shape[0], dtype=dtype, device=a.device)  # C = s W0 A^T, [out, r]
            for i in range(0, out_features, chunk_rows):
                c[i:i + chunk_rows] = weight.detach()[i:i + chunk_rows].to(dtype) @ a.T
            c.mul_(scaling)
            total = torch.zeros((), dtype=torch.float64, device=a.device)
            grad_c = torch.empty_like(c) if want_grads else None    # dL/dC, [out, r]
            grad_b = torch.zeros_like(b) if want_grads else None    # dL/dB, [out, r]
            for i in range(0, out_features, chunk_rows):
                p = c[i:i + chunk_rows] @ b.T                       # rows of W0 (s B A)^T, [chunk, out]
                total += p.abs().sum(dtype=torch.float64)
                if want_grads:
                    g = p.sign_()                                   # d|P|/dP, sign(0) = 0
                    grad_c[i:i + chunk_rows] = g @ b
                    grad_b += g.T @ c[i:i + chunk_rows]
                del p
            if want_grads:                                          # dL/dA = s dC^T W0, [r, in]
                grad_a = torch.zeros(a.shape, dtype=dtype, device=a.device)
                for i in range(0, out_features, chunk_rows):
                    grad_a += grad_c[i:i + chunk_rows].T @ weight.detach()[i:i + chunk_rows].to(dtype)
                grad_a.mul_(scaling)
                ctx.save_for_backward(grad_a.to(lora_A.dtype), grad_b.to(lora_B.dtype))
        return total.to(dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        grad_a, grad_b = ctx.saved_tensors
        return grad_a * grad_out.to(grad_a.dtype), grad_b * grad_out.to(grad_b.dtype), None, None, None, None


def orth_penalty(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                 chunk_rows: int = 256) -> torch.Tensor:
    """|| weight (scaling * lora_B @ lora_A)^T ||_1 without forming the [out, out] matrix.

    weight [out, in] (no gradient), lora_A [r, in], lora_B [out, r].  float64 if any input is, else float32."""
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2 or lora_B.shape[1] != lora_A.shape[0] \
            or tuple(weight.shape) != (lora_B.shape[0], lora_A.shape[1]):
        raise ValueError(f"expected weight [out, in], lora_A [r, in], lora_B [out, r]; got {tuple(weight.shape)}, "
                         f"{tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    if int(chunk_rows) != chunk_rows or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    want_grads = torch.is_grad_enabled() and (lora_A.requires_grad or lora_B.requires_grad)
    return _ChunkedOrthL1.apply(lora_A, lora_B, weight, float(scaling), int(chunk_rows), want_grads)


def orth_penalty_dense(weight, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """Reference: the [out, out] matrix W0 (s B A)^T materialised, plain autograd."""
    return (weight.detach() @ (scaling * (lora_B @ lora_A)).T).abs().sum()


def orth_target_layers(model, targets: list[str]) -> list[tuple[str, torch.nn.Module]]:
    """(name, PEFT LoraLayer) of every adapted layer whose last name component is in `targets`."""
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in unwrap(model).named_modules()
            if isinstance(module, LoraLayer) and name.rsplit(".", 1)[-1] in targets and module.active_adapters
            and module.active_adapters[0] in module.lora_A]


def _base_weight(module) -> torch.Tensor:
    """W0 [out, in] of a LoRA layer, dequantised for a bitsandbytes base (constant)."""
    from peft.utils.integrations import dequantize_module_weight

    base = module.get_base_layer()
    weight = base.weight
    if type(weight).__name__ in ("Params4bit", "Int8Params"):
        with torch.no_grad():
            weight = dequantize_module_weight(base)
    return weight.detach()


class OrthMethod(FineTuningMethod):
    name = "orth"
    flags_class = OrthFlags

    def __init__(self, flags=None):
        super().__init__(flags if flags is not None else OrthFlags())
        self.targets = [t.strip() for t in self.flags.orth_targets.split(",") if t.strip()]
        self._layers: list[tuple[str, torch.nn.Module]] | None = None

    def inject(self, model, run: RunContext):
        if self.flags.orth_chunk_rows < 1:
            raise UserError(f"--orth_chunk_rows must be >= 1, got {self.flags.orth_chunk_rows}")
        model = inject_lora(model, run)
        self._find_layers(model)
        return model

    def _find_layers(self, model) -> None:
        layers = orth_target_layers(model, self.targets)
        if not layers:
            raise UserError(f"--orth_targets {self.flags.orth_targets!r}: no adapted layer has one of these names "
                            "(expected names of the language model's linears, e.g. q_proj,v_proj)")
        found = {name.rsplit(".", 1)[-1] for name, _ in layers}
        if set(self.targets) - found:
            raise UserError(f"--orth_targets {self.flags.orth_targets!r}: {sorted(set(self.targets) - found)} "
                            f"match no adapted layer (adapted names here: e.g. {sorted(found)})")
        self._layers = layers

    def on_train_begin(self, model, run: RunContext) -> None:
        self._find_layers(model)

    def extra_loss(self, model) -> torch.Tensor:
        if self._layers is None:
            self._find_layers(model)
        total = None
        for _, module in self._layers:
            adapter = module.active_adapters[0]
            lora_A, lora_B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            base = module.get_base_layer()
            with gathered([lora_A, lora_B, base.weight]):
                term = orth_penalty(_base_weight(module), lora_A, lora_B, module.scaling[adapter],
                                    self.flags.orth_chunk_rows)
            total = term if total is None else total + term
        return self.flags.orth_lambda * total
