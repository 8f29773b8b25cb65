"""LoRASculpt (Liang et al., CVPR 2025): sparse LoRA after a warm-up + Conflict Mitigation Regularizer.

    L = L_task + lambda * mean_{l in q,k,v} ||M_l * (B_l A_l)||_F                 (paper Eq. 8-9, the release)
          [or lambda * sum_{l in q,k,v} ...  with --cmr_reduction sum               (Appendix E, Algorithm 1)]
              [+ beta * sum_{l in projector} ||M_l * (B_l A_l)||_1]             (Eq. 10-11, --connector sculpt)
    M = tanh(omega * |1 / log(|W / ||W||_F| + eps)|)                            (Eq. 6-7)
    after `--sculpt_step` optimizer steps, once:  A <- M_A * A,  B <- M_B * B     (Eq. 2-3)
    with M_A, M_B keeping the top s_A, s_B fraction of |A|, |B| (every LM LoRA matrix separately).

How it is wired (no change to the training loop):
* Pruned entries stay exactly zero because their gradients are masked (a tensor hook on each LoRA
  parameter) and their Adam moments are zeroed once at the pruning step: AdamW then moves them by exactly 0
  (m = v = 0 -> update 0; decoupled weight decay of 0 is 0).  The masks are computed once, saved in every
  checkpoint (`method_state.safetensors`) and restored on resume.
* The CMR never keeps M, B A or M * (B A) alive: its value and its gradients w.r.t. A and B are computed
  chunk by chunk (`sculpt_ops.cmr_penalty`, extra memory O(chunk * in)) right after the forward pass, and
  the gradients are added by the same tensor hooks during backward.  A scalar "carrier" added to the loss
  tells the hooks the factor the loss is multiplied by in backward (1/gradient-accumulation, fp16 loss
  scale), so the update equals that of adding the differentiable penalty to the loss.  This works the same
  without DeepSpeed and under ZeRO-2/3; under ZeRO-3 each target layer's W, A and B are gathered for the
  computation (one extra all-gather of the q/k/v weights per optimizer step; the CMR is computed once per
  optimizer step and reused by the accumulated micro-batches, since A and B do not change in between).
* 4-bit base (QLoRA): W is dequantised per row chunk.
* `--cmr_impl fused` (default) computes each chunk with one compiled kernel that reads W once
  (`cmr_fused.cmr_value_and_grads_fused`); `chunked` is the eager reference, `dense` the authors' dense way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from llava_sculpt.errors import UserError
from llava_sculpt.methods.base import FineTuningMethod, RunContext
from llava_sculpt.methods.lora import inject_lora
from llava_sculpt.methods.zero import (clip_coefficient, gathered, local_fp32_grad_slices, register_fp32_grad_hook,
                                       zero_optimizer)
from llava_sculpt.methods.cmr_fused import CMR_IMPLS, cmr_value_and_grads_impl
from llava_sculpt.methods.sculpt_ops import (cmr_penalty, frobenius_sq_norm, prune_to_topk, sparsity_stats,
                                             write_sparsity_json)

__all__ = ["SculptArguments", "SculptMethod", "cmr_penalty", "prune_to_topk"]

ADAPTER_NAME = "default"


@dataclass
class SculptArguments:
    sculpt_ratio: float = field(default=0.1, metadata={"help": "LoRASculpt: fraction of entries KEPT in every LoRA "
                                "matrix at the pruning step (s_A = s_B; Eq. 3; authors' default 0.1)"})
    sculpt_ratio_a: float | None = field(default=None, metadata={"help": "LoRASculpt: s_A for the A matrices "
                                         "(default --sculpt_ratio)"})
    sculpt_ratio_b: float | None = field(default=None, metadata={"help": "LoRASculpt: s_B for the B matrices "
                                         "(default --sculpt_ratio)"})
    sculpt_step: int = field(default=100, metadata={"help": "LoRASculpt: prune once after this many optimizer "
                             "steps (authors' STEP_THRESHOLD 100)"})
    cmr_lambda: float = field(default=1e-3, metadata={"help": "LoRASculpt: weight of the CMR (alpha of Eq. 9)"})
    cmr_omega: float = field(default=1.0, metadata={"help": "LoRASculpt: steepness omega of the retention mask (Eq. 7)"})
    cmr_targets: str = field(default="q_proj,k_proj,v_proj", metadata={"help": "LoRASculpt: LM layers the CMR "
                             "regularises (comma-separated names)"})
    cmr_reduction: str = field(default="mean", metadata={"help": "LoRASculpt: how the per-layer CMR terms of the "
                               "--cmr_targets layers are combined: mean (the authors' release, which reproduces "
                               "Table 1) or sum (Appendix E, Algorithm 1); the connector term is a sum in both",
                               "choices": ["mean", "sum"]})
    sculpt_connector: bool = field(default=False, metadata={"help": "LoRASculpt: LoRA on the projector's two "
                                   "linears instead of full fine-tuning, with the L1 CMR of Eq. 10 (no pruning); "
                                   "True = --connector sculpt, kept as its alias"})
    cmr_beta: float = field(default=1e-5, metadata={"help": "LoRASculpt: weight beta of the connector CMR (Eq. 11)"})
    cmr_chunk_rows: int = field(default=256, metadata={"help": "LoRASculpt: rows per chunk of the CMR "
                                "computation (memory/speed trade-off; the value does not change results)"})
    cmr_impl: str = field(default="fused", metadata={"help": "LoRASculpt: how the CMR and its gradients are "
                          "computed: fused (default: per chunk of rows one torch.compile'd kernel that reads W "
                          "once; matrices under 2^20 entries, or where compile is unavailable, use chunked), triton "
                          "(the same with a hand-written Triton kernel; CUDA only, elsewhere fused), "
                          "chunked (the eager reference) or dense (the authors' way: M, B A and M * (B A) "
                          "materialised; for comparison).  Results agree to ~1e-7 relative",
                          "choices": ["fused", "triton", "chunked", "dense"]})


@dataclass
class _Layer:
    name: str  # module name inside the PEFT model
    module: torch.nn.Module  # PEFT LoRA layer
    kind: str  # "lm" or "connector"

    @property
    def lora_A(self) -> torch.nn.Parameter:
        return self.module.lora_A[ADAPTER_NAME].weight

    @property
    def lora_B(self) -> torch.nn.Parameter:
        return self.module.lora_B[ADAPTER_NAME].weight

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.module.get_base_layer().weight


def _uses_deepspeed(trainer) -> bool:
    return trainer is not None and getattr(trainer, "is_deepspeed_enabled", False)


def _weight_rows_fn(weight):
    """(start, end) -> dequantised rows of a bitsandbytes 4-bit weight, or None for a plain tensor."""
    if type(weight).__name__ != "Params4bit":
        return None
    import bitsandbytes.functional as bnbf

    state = weight.quant_state
    out_features, in_features = state.shape
    absmax = state.absmax
    if state.nested:  # double quantisation: the block scales are themselves quantised
        absmax = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    block = state.blocksize
    if in_features % block:
        full = bnbf.dequantize_4bit(weight.data, state)
        return lambda start, end: full[start:end]
    packed = weight.data.reshape(-1)

    def rows(start: int, end: int) -> torch.Tensor:
        # nf4/fp4 pack two values per byte, row-major, with one scale per `block` values: rows
        # [start, end) are bytes [start*in/2, end*in/2) and scales [start*in/block, end*in/block).
        lo, hi = start * in_features, end * in_features
        part = packed[lo // 2:hi // 2].reshape(-1, 1)
        chunk_state = bnbf.QuantState(absmax=absmax[lo // block:hi // block].float(), shape=torch.Size((end - start, in_features)),
                                      code=state.code, blocksize=block, quant_type=state.quant_type, dtype=state.dtype)
        return bnbf.dequantize_4bit(part, chunk_state)
    return rows


class SculptMethod(FineTuningMethod):
    name = "sculpt"
    flags_class = SculptArguments

    def __init__(self, flags: SculptArguments | None = None):
        super().__init__(flags or SculptArguments())
        f = self.flags
        self.ratio_a = f.sculpt_ratio if f.sculpt_ratio_a is None else f.sculpt_ratio_a
        self.ratio_b = f.sculpt_ratio if f.sculpt_ratio_b is None else f.sculpt_ratio_b
        for flag, value in (("--sculpt_ratio_a", self.ratio_a), ("--sculpt_ratio_b", self.ratio_b)):
            if not 0 < value <= 1:
                raise UserError(f"{flag} (or --sculpt_ratio) must be in (0, 1]: the fraction of entries kept; got {value}")
        if f.cmr_reduction not in ("mean", "sum"):
            raise UserError(f"--cmr_reduction must be mean or sum, got {f.cmr_reduction!r}")
        if f.cmr_impl not in CMR_IMPLS:
            raise UserError(f"--cmr_impl must be one of {', '.join(CMR_IMPLS)}, got {f.cmr_impl!r}")
        if f.sculpt_step < 0:
            raise UserError(f"--sculpt_step must be >= 0, got {f.sculpt_step}")
        self.cmr_targets = tuple(t.strip() for t in f.cmr_targets.split(",") if t.strip())
        self.trains_projector = not f.sculpt_connector  # the connector variant trains LoRA on it instead
        self.layers: list[_Layer] = []
        self.param_names: dict[int, str] = {}  # id(param) -> name, for the masks
        self.masks: dict[str, torch.Tensor] = {}  # param name -> bool keep-mask (empty before pruning)
        self.pruned_at_step: int | None = None
        self._weight_sq_norms: dict[str, float] = {}
        self._pending: dict[int, torch.Tensor] = {}  # id(param) -> CMR gradient of this optimizer step
        self._pending_step: int | None = None
        self._pending_value: float = 0.0
        self._multiplier = 0.0  # d(loss as backpropagated)/d(penalty), from the carrier's hook
        self._run: RunContext | None = None
        self._warned_order = False
        self._params: dict[int, torch.nn.Parameter] = {}  # id(param) -> LoRA parameter
        self._zero_opt = None  # DeepSpeed's ZeRO optimizer, when training under DeepSpeed
        self._fp32_hook = None  # handle of the step pre-hook that adds the CMR to the fp32 master gradients
        # cmr_grad_ratio bookkeeping: without DeepSpeed the masked task gradient of the regularised tensors is
        # summed over the micro-batches of a step (LoRA-sized) and the CMR multiplier carried; under DeepSpeed
        # the squared norms are summed from the fp32 gradients.  [task^2, CMR^2]
        self._task_grads: dict[int, torch.Tensor] = {}
        self._carried: dict[int, float] = {}
        self._ratio_sq = [0.0, 0.0]
        self._ratios: list[float] = []  # one per optimizer step since the last log

    # ------------------------------------------------------------------------------------------- setup
    def inject(self, model, run: RunContext):
        from peft.tuners.lora import LoraLayer

        self._run = run
        model = inject_lora(model, run, include_projector=self.flags.sculpt_connector)
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer) or ADAPTER_NAME not in module.lora_A:
                continue
            kind = "connector" if "multi_modal_projector" in name else "lm"
            layer = _Layer(name, module, kind)
            self.layers.append(layer)
            for suffix, param in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
                self.param_names[id(param)] = f"{name}.{suffix}"
                self._params[id(param)] = param
                param.register_hook(self._make_grad_hook(param))
        if not any(self._is_cmr_target(l) for l in self.layers):
            raise UserError(f"--cmr_targets {self.flags.cmr_targets}: no adapted language-model layer has one of "
                            f"these names")
        return model

    def _is_cmr_target(self, layer: _Layer) -> bool:
        return layer.kind == "lm" and layer.name.rsplit(".", 1)[-1] in self.cmr_targets

    def _make_grad_hook(self, param):
        key = id(param)

        def hook(grad: torch.Tensor) -> torch.Tensor:
            mask = self.masks.get(self.param_names[key])
            if mask is not None:  # pruned entries get exactly zero gradient (Eq. 2 kept for all later steps)
                grad = grad * mask.to(device=grad.device, dtype=grad.dtype)
            extra = None if self._fp32_hook is not None else self._pending.get(key)
            if extra is not None:  # without DeepSpeed: trainable tensors are fp32, add the CMR gradient here
                if not self._multiplier and not self._warned_order:
                    self._warned_order = True
                    print("warning: LoRASculpt: a LoRA gradient arrived before the CMR carrier's; the CMR "
                          "gradient was skipped for it (please report this)")
                task = self._task_grads.get(key)
                self._task_grads[key] = grad.detach().float() if task is None else task + grad.detach().float()
                self._carried[key] = self._carried.get(key, 0.0) + self._multiplier
                grad = grad + (self._multiplier * extra).to(device=grad.device, dtype=grad.dtype)
            return grad
        return hook

    # ------------------------------------------------------------------------------- DeepSpeed: fp32 grads
    def _add_to_fp32_grads(self, flats: set[int]) -> None:
        """Under DeepSpeed, right before the wrapped optimizer updates the flat fp32 masters `flats`: add the
        (already masked) CMR gradient to this rank's share of their fp32 gradient.  The ZeRO optimizer has already
        clipped that gradient, so the CMR gradient is multiplied by the same clip factor: the update is the
        release's clip(task + CMR) up to the CMR's share of the clip norm (~(CMR/task)^2, e.g. 1e-10)."""
        zero_opt = self._zero_opt
        coef = clip_coefficient(zero_opt)
        for key, extra in self._pending.items():
            for flat, flat_start, start, numel in local_fp32_grad_slices(zero_opt, self._params[key]):
                if id(flat) not in flats:
                    continue
                part = extra.reshape(-1)[start:start + numel].to(device=flat.device, dtype=torch.float32)
                target = flat.grad.narrow(0, flat_start, numel)
                # for cmr_grad_ratio: the task gradient before clipping, over the regularised entries
                self._ratio_sq[0] += float(target.double().square().sum()) / coef ** 2
                self._ratio_sq[1] += float(part.double().square().sum())
                target.add_(coef * part)

    # ------------------------------------------------------------------------------------------- loss
    def _penalty(self, layer: _Layer, kind: str) -> tuple[float, torch.Tensor, torch.Tensor]:
        """(value, d value / dA, d value / dB) of the layer's CMR, computed chunk-wise and not kept."""
        A, B, W = layer.lora_A, layer.lora_B, layer.weight
        with gathered([A, B, W]):
            rows_fn = _weight_rows_fn(W)
            if layer.name not in self._weight_sq_norms:  # W is frozen: its norm is computed once
                self._weight_sq_norms[layer.name] = frobenius_sq_norm(rows_fn if rows_fn else W.detach(),
                                                                      B.shape[0])
            # value and gradients in one chunked pass (no graph, nothing kept): Eq. 8 / Eq. 10; --cmr_impl picks
            # the fused kernel (default), the eager chunked reference or the dense autograd one
            return cmr_value_and_grads_impl(self.flags.cmr_impl, None if rows_fn else W.detach(), A.detach().float(),
                                            B.detach().float(), omega=self.flags.cmr_omega,
                                            chunk_rows=self.flags.cmr_chunk_rows, kind=kind, weight_chunk_fn=rows_fn,
                                            weight_sq_norm=self._weight_sq_norms[layer.name])

    def _compute_pending(self) -> None:
        self._pending.clear()
        lm = [l for l in self.layers if self._is_cmr_target(l)]
        con = [l for l in self.layers if l.kind == "connector"]
        total = 0.0
        # lambda * mean over the q/k/v layers (the release) or * sum (Algorithm 1); beta * sum over the connector
        lm_weight = self.flags.cmr_lambda / (len(lm) if self.flags.cmr_reduction == "mean" else 1)
        for layers, kind, weight in ((lm, "fro", lm_weight), (con, "l1", self.flags.cmr_beta)):
            for layer in layers:
                value, grad_a, grad_b = self._penalty(layer, kind)
                total += weight * value
                for param, grad in ((layer.lora_A, grad_a), (layer.lora_B, grad_b)):
                    mask = self.masks.get(self.param_names[id(param)])
                    # pruned entries take no CMR gradient either (masks only change between optimizer steps)
                    grad = grad if mask is None else grad * mask.to(device=grad.device, dtype=grad.dtype)
                    self._pending[id(param)] = weight * grad
        self._pending_value = total

    def extra_loss(self, model) -> torch.Tensor | None:
        step = self._run.trainer.state.global_step if self._run and self._run.trainer else None
        if step is None or step != self._pending_step:  # A, B change only at optimizer steps
            self._compute_pending()
            self._pending_step = step
        if self._fp32_hook is not None:  # DeepSpeed: the gradient is added to the fp32 masters (_add_to_fp32_grads)
            return torch.tensor(self._pending_value, device=self.layers[0].lora_A.device)
        self._multiplier = 0.0
        # On the parameters' device, so that its gradient is computed on the same autograd queue as theirs:
        # being a leaf right at the loss, it is then processed before any LoRA gradient (AccumulateGrad
        # nodes run as soon as they are ready).
        carrier = torch.zeros((), device=self.layers[0].lora_A.device, requires_grad=True)

        def record(grad):
            self._multiplier = float(grad)
            return grad
        carrier.register_hook(record)
        # value of the penalty for the reported loss; gradient 0 * ... + 1 through the carrier
        return (carrier - carrier.detach()) + self._pending_value

    # ------------------------------------------------------------------------------------------- pruning
    def on_train_begin(self, model, run: RunContext) -> None:
        self._run = run
        self._zero_opt = zero_optimizer(run.trainer) if _uses_deepspeed(run.trainer) else None
        if _uses_deepspeed(run.trainer) and self._fp32_hook is None:
            if self._zero_opt is None:
                raise UserError("--method sculpt under DeepSpeed needs ZeRO stage 1, 2 or 3 (the CMR gradient is "
                                "added to ZeRO's fp32 master gradients); set zero_optimization.stage in the config")
            self._fp32_hook = register_fp32_grad_hook(self._zero_opt, self._add_to_fp32_grads)
        state = run.trainer.state
        if self.masks:
            print(f"LoRASculpt: resumed with the masks of step {self.pruned_at_step}")
        elif state.max_steps and state.max_steps < self.flags.sculpt_step:  # pruning runs after step sculpt_step
            print(f"warning: LoRASculpt prunes after --sculpt_step {self.flags.sculpt_step} optimizer steps, but this "
                  f"run has only {state.max_steps}: the adapters will stay dense")
        if not self.masks and self.flags.sculpt_step == 0 and state.global_step == 0:
            self.prune(run)

    def after_optimizer_step(self, model, step: int, run: RunContext) -> None:
        self._record_grad_ratio()
        if step == self.flags.sculpt_step and not self.masks:
            self.prune(run)

    def _record_grad_ratio(self) -> None:
        """cmr_grad_ratio of the step just taken: ||CMR gradient|| / ||task gradient|| over the regularised
        LoRA tensors (masked, before clipping; summed over ranks where ZeRO partitions the gradients)."""
        task_sq, cmr_sq = self._ratio_sq
        for key, task in self._task_grads.items():
            task_sq += float(task.double().square().sum())
            extra = self._pending.get(key)
            if extra is not None:
                cmr_sq += self._carried.get(key, 0.0) ** 2 * float(extra.double().square().sum())
        self._task_grads.clear()
        self._carried.clear()
        self._ratio_sq = [0.0, 0.0]
        if self._zero_opt is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            both = torch.tensor([task_sq, cmr_sq], dtype=torch.float64, device=self.layers[0].lora_A.device)
            torch.distributed.all_reduce(both)
            task_sq, cmr_sq = both.tolist()
        if task_sq > 0:
            self._ratios.append((cmr_sq / task_sq) ** 0.5)

    def logs(self) -> dict[str, float]:
        if not self._ratios:
            return {}
        ratio = sum(self._ratios) / len(self._ratios)
        self._ratios.clear()
        return {"cmr_grad_ratio": ratio}

    @torch.no_grad()
    def prune(self, run: RunContext) -> None:
        """Eq. 2-3, once: top-k masks of every LM LoRA matrix from its current (fp32 master) values; zero the
        pruned entries in the parameter and in the optimizer's moments."""
        trainer = run.trainer
        use_ds = _uses_deepspeed(trainer)
        if use_ds:
            from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,
                                         safe_set_full_fp32_param, safe_set_full_optimizer_state)
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer) if trainer is not None else None
        for layer in self.layers:
            if layer.kind != "lm":
                continue  # the connector is sparsified softly by its L1 CMR only (Eq. 10)
            for param, ratio in ((layer.lora_A, self.ratio_a), (layer.lora_B, self.ratio_b)):
                name = self.param_names[id(param)]
                if use_ds:
                    full = safe_get_full_fp32_param(param)
                else:
                    with gathered([param]):
                        full = param.detach().float().clone()
                mask = prune_to_topk(full, ratio).cpu()
                self.masks[name] = mask
                keep = mask.to(device=full.device, dtype=full.dtype)
                with gathered([param], modify=True):
                    param.data.mul_(keep.to(device=param.device, dtype=param.dtype))
                if use_ds:
                    safe_set_full_fp32_param(param, full * keep)
                    for key in ("exp_avg", "exp_avg_sq"):
                        moment = safe_get_full_optimizer_state(param, key)
                        if moment is not None:
                            safe_set_full_optimizer_state(param, moment * keep.to(moment.device), key)
                elif optimizer is not None:
                    for value in optimizer.state.get(param, {}).values():
                        if torch.is_tensor(value) and value.shape == param.shape:
                            value.mul_(keep.to(device=value.device, dtype=value.dtype))
        self.pruned_at_step = trainer.state.global_step if trainer is not None else 0
        kept = sum(int(m.sum()) for m in self.masks.values())
        total = sum(m.numel() for m in self.masks.values())
        print(f"LoRASculpt: pruned {len(self.masks)} LoRA matrices at step {self.pruned_at_step}, "
              f"keeping {kept}/{total} entries ({kept / max(total, 1):.4f})")

    # ------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        if not self.masks:
            return {}
        state = {f"mask/{name}": mask for name, mask in self.masks.items()}
        state["pruned_at_step"] = torch.tensor(self.pruned_at_step)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.masks = {k[len("mask/"):]: v.bool() for k, v in state.items() if k.startswith("mask/")}
        if self.masks:
            self.pruned_at_step = int(state["pruned_at_step"])
            unknown = set(self.masks) - set(self.param_names.values())
            if self.param_names and unknown:
                raise UserError(f"method_state.safetensors holds masks for parameters this model does not have "
                                f"(e.g. {sorted(unknown)[:2]}); resume with the same model and LoRA flags")

    # ------------------------------------------------------------------------------------------- reports
    def post_training(self, run_dir: str, model, run: RunContext) -> None:
        """sparsity.json (Theorem 3.1 / Fig. 5) and the sparse adapter, from the saved (gathered) adapter."""
        from safetensors.torch import load_file

        from llava_sculpt.methods.sparse_adapter import save_sparse_adapter

        adapter = load_file(os.path.join(run_dir, "adapter_model.safetensors"))
        pairs = {}
        for key in adapter:
            if ".lora_A." in key and "multi_modal_projector" not in key:
                module = key.split(".lora_A.")[0]
                pairs[module] = (adapter[key], adapter[key.replace(".lora_A.", ".lora_B.")])
        stats = sparsity_stats(pairs, self.ratio_a, self.ratio_b)
        meta = {"rank": run.training_args.lora_r, "pruned_at_step": self.pruned_at_step,
                "sculpt_step": self.flags.sculpt_step}
        write_sparsity_json(os.path.join(run_dir, "sparsity.json"), stats, {"s_A": self.ratio_a, "s_B": self.ratio_b, **meta})
        if self.masks:
            save_sparse_adapter(adapter, os.path.join(run_dir, "adapter_sparse.safetensors"))
