"""What SPIDER (`spider.py`) and its MagnitudeMask baseline (`magnitude_mask.py`) share: full fine-tuning of the
last N decoder layers of the language model plus the projector, no LoRA (REFERENCE.md section 9: the SPIDER
release's `tune_decoder_layer N` + `tune_mm_mlp_adapter`), and a rule applied to the optimizer's own copy of
the weights around every optimizer step.

Where the rule acts.  Both methods need the gradient of the whole optimizer step and the weights the optimizer
just wrote, before anything else reads them.  They hook the torch optimizer that updates the weights:

* without DeepSpeed: the Trainer's (accelerate-wrapped) torch optimizer; the trained tensors are fp32
  parameters (`train.build_model`), their `.grad` holds the step's gradient summed over the accumulated
  micro-batches and already clipped by the Trainer (it clips before `optimizer.step()`);
* under DeepSpeed ZeRO-1/2/3: the torch optimizer wrapped by the ZeRO optimizer, which steps this rank's flat
  fp32 partitions (one parameter group, or ZeRO-3 sub-group, per call); their `.grad` is the unscaled, clipped
  fp32 gradient, and the 16-bit model weights are copied from the fp32 partitions only after the call, so a
  change made in the post-hook reaches the model at once.

A step pre-hook reads the gradient (`_before_step`), a step post-hook changes the weights (`_after_step`).
Each rank holds the method state only for its own share of every trained tensor (all of it without ZeRO);
statistics over a whole tensor are summed over the ranks (`_reduce`: all-reduces of one or two numbers per
tensor).  A step skipped by the fp16 loss scaler never reaches the torch optimizer, so no hook runs for it.

The saved run holds only the trained tensors (`partial_model.safetensors` + `partial_model.json`, see
`model/load.py`); `method_state.safetensors` holds the method's full-size state, gathered from the ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from llava_sculpt.errors import UserError
from llava_sculpt.methods.base import FineTuningMethod, RunContext
from llava_sculpt.methods.zero import full_shape, local_fp32_grad_slices, unwrap, zero_optimizer


def decoder_layers(model) -> torch.nn.ModuleList:
    """The language model's decoder layers (`model.language_model.layers` of a HF LLaVA)."""
    for name, module in unwrap(model).named_modules():
        if name.endswith("language_model.layers") and isinstance(module, torch.nn.ModuleList):
            return module
    raise UserError("the model has no language_model.layers: is this a Hugging Face LLaVA checkpoint?")


def _flat_of(zero_opt, param) -> torch.Tensor:
    """The flat fp32 partition (on this rank) of the ZeRO parameter group / sub-group `param` belongs to; the
    same group on every rank, whether or not this rank owns any of `param`."""
    if hasattr(param, "ds_id"):  # ZeRO-3
        group = zero_opt.grad_position[zero_opt.get_param_id(param)][0]
        return zero_opt.fp32_partitioned_groups_flat[group]
    for group, params in enumerate(zero_opt.bit16_groups):
        if any(p is param for p in params):
            return zero_opt.single_partition_of_fp32_groups[group]
    raise UserError("DeepSpeed's optimizer does not hold a trained parameter (frozen by mistake?)")


@dataclass
class Tracked:
    """One trained tensor and this rank's share [start, start + count) of its flattened entries."""
    name: str
    param: torch.nn.Parameter
    shape: torch.Size
    numel: int
    key: int  # id of the tensor the optimizer steps: the parameter itself, or its ZeRO flat fp32 partition
    start: int
    count: int
    flat: torch.Tensor | None = None  # ZeRO: the flat fp32 partition
    flat_start: int = 0

    def master(self) -> torch.Tensor:
        """This rank's share of the weights the optimizer updates (a 1-D view; writes go to the optimizer)."""
        if self.flat is None:
            return self.param.data.view(-1)
        return self.flat.data.narrow(0, self.flat_start, self.count)

    def grad(self) -> torch.Tensor | None:
        """This rank's share of the step's gradient (a 1-D view), None when there is none."""
        if self.flat is None:
            return None if self.param.grad is None else self.param.grad.view(-1)
        if self.flat.grad is None:
            return None
        return self.flat.grad.narrow(0, self.flat_start, self.count)


class LastLayersMethod(FineTuningMethod):
    """Base class: trains the last `n_layers` decoder layers and the projector in full; subclasses implement
    `_bind_state`, `_before_step`, `_after_step`, `state_dict`, `load_state_dict`."""
    uses_lora = False
    trains_projector = True
    layers_flag = "--spider_layers"

    def __init__(self, flags, n_layers: int):
        super().__init__(flags)
        if n_layers < 1:
            raise UserError(f"{self.layers_flag} must be >= 1 (the number of last decoder layers trained), got {n_layers}")
        self.n_layers = n_layers
        self.tracked: list[Tracked] = []
        self._zero_opt = None
        self._group = None  # the data-parallel process group ZeRO partitions over (partitioned state only)
        self._handles: list = []
        self._active: set[int] = set()
        self._is_main = True

    # ------------------------------------------------------------------------------------------- setup
    def inject(self, model, run: RunContext):
        layers = decoder_layers(model)
        if self.n_layers > len(layers):
            raise UserError(f"{self.layers_flag} {self.n_layers}: the language model has only {len(layers)} decoder layers")
        for layer in list(layers)[-self.n_layers:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        return model

    def on_train_begin(self, model, run: RunContext) -> None:
        trainer = run.trainer
        self._is_main = getattr(run.training_args, "process_index", 0) == 0
        use_ds = trainer is not None and getattr(trainer, "is_deepspeed_enabled", False)
        self._zero_opt = zero_optimizer(trainer) if use_ds else None
        if use_ds and self._zero_opt is None:
            raise UserError(f"--method {self.name} under DeepSpeed needs ZeRO stage 1, 2 or 3 (it works on ZeRO's fp32 "
                            "master weights and gradients); set zero_optimization.stage in the config")
        self._group = None
        if self._zero_opt is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            group = getattr(self._zero_opt, "dp_process_group", None)
            if torch.distributed.get_world_size(group) > 1:
                self._group = group if group is not None else torch.distributed.group.WORLD
        self.tracked = self._track(model)
        if not self.tracked:
            raise UserError(f"--method {self.name}: no trainable tensor")
        with torch.no_grad():
            self._bind_state()
        for handle in self._handles:
            handle.remove()
        if self._zero_opt is not None:
            inner = self._zero_opt.optimizer
        else:
            optimizer = trainer.optimizer
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        self._handles = [inner.register_step_pre_hook(self._pre_hook), inner.register_step_post_hook(self._post_hook)]

    def _track(self, model) -> list[Tracked]:
        tracked = []
        for name, param in unwrap(model).named_parameters():
            if not param.requires_grad:
                continue
            shape = full_shape(param)
            numel = shape.numel()
            if self._zero_opt is None:
                tracked.append(Tracked(name, param, shape, numel, id(param), 0, numel))
                continue
            flat = _flat_of(self._zero_opt, param)
            slices = local_fp32_grad_slices(self._zero_opt, param)
            if len(slices) > 1:
                raise UserError(f"{name}: more than one fp32 fragment on this rank (unsupported DeepSpeed layout)")
            if slices:
                part_flat, flat_start, start, count = slices[0]
                if part_flat is not flat:
                    raise UserError(f"{name}: DeepSpeed's fp32 fragment is not in the parameter's group")
            else:
                flat_start, start, count = 0, 0, 0
            tracked.append(Tracked(name, param, shape, numel, id(flat), start, count, flat, flat_start))
        if self._group is None and any(t.count != t.numel for t in tracked):
            raise UserError("DeepSpeed partitions the weights but no process group is initialised")
        return tracked

    # ------------------------------------------------------------------------------------------- hooks
    def _pre_hook(self, optimizer, args, kwargs) -> None:
        self._active = {id(p) for group in optimizer.param_groups for p in group["params"]}
        with torch.no_grad():
            self._before_step([t for t in self.tracked if t.key in self._active])

    def _post_hook(self, optimizer, args, kwargs) -> None:
        with torch.no_grad():
            self._after_step([t for t in self.tracked if t.key in self._active])

    def _bind_state(self) -> None:
        raise NotImplementedError

    def _before_step(self, tracked: list[Tracked]) -> None:
        pass

    def _after_step(self, tracked: list[Tracked]) -> None:
        pass

    # ------------------------------------------------------------------------------------ partitioned state
    def _reduce(self, values: torch.Tensor) -> torch.Tensor:
        """`values` summed over the ranks that share the partitioned tensors (identity without partitioning)."""
        if self._group is not None:
            torch.distributed.all_reduce(values, group=self._group)
        return values

    def _reducer(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return self._reduce if self._group is not None else None

    def _gather(self, t: Tracked, local: torch.Tensor) -> torch.Tensor:
        """The full tensor (CPU, shape of the parameter) from every rank's share `local`.  Collective under
        partitioned ZeRO: every rank calls it for the same tensors in the same order."""
        if self._group is None:
            return local.detach().reshape(t.shape).cpu().clone()
        dtype = torch.uint8 if local.dtype == torch.bool else local.dtype
        device = t.flat.device if t.flat is not None else local.device
        full = torch.zeros(t.numel, dtype=dtype, device=device)
        full[t.start:t.start + t.count] = local.to(device=device, dtype=dtype)
        self._reduce(full)
        return full.to(local.dtype).reshape(t.shape).cpu()

    def _saves_state(self) -> bool:
        """Whether `state_dict` must produce the state here: on the main process, and on every rank when the
        state is partitioned (the gather is collective)."""
        return self._is_main or self._group is not None

    def _local(self, t: Tracked, full: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """This rank's share of a full-size tensor, on the device of the weights it goes with."""
        device = t.master().device
        return full.reshape(-1)[t.start:t.start + t.count].to(device=device, dtype=dtype or full.dtype).clone()

    def _check_loaded(self, loaded: set[str], what: str) -> None:
        names = {t.name for t in self.tracked}
        if loaded != names:
            missing, extra = sorted(names - loaded)[:2], sorted(loaded - names)[:2]
            raise UserError(f"--method {self.name}: the {what} in method_state.safetensors of the checkpoint being "
                            f"resumed do not match the trained tensors (missing e.g. {missing}, unexpected e.g. "
                            f"{extra}); resume with the same {self.layers_flag} and projector flags")
