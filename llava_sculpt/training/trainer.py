"""The training loop is transformers' `Trainer`; `LlavaSculptTrainer` only overrides its hooks (sampler, optimizer
groups, loss, saving, loading), and `MethodCallback` calls the method at the start of training and after each
optimizer step."""
from __future__ import annotations

import os
import re

import torch
import transformers

from llava_sculpt.atomic import give_normal_modes
from llava_sculpt.data.dataset import ModalityGroupedSampler
from llava_sculpt.errors import UserError
from llava_sculpt.methods import RunContext
from llava_sculpt.model.load import (find_projector, load_partial_model, load_projector, save_partial_model,
                                     save_projector)
from llava_sculpt.training.run_dir import save_method_state, write_run_args


def _projector_keys(state_dict: dict) -> dict[str, torch.Tensor]:
    """Fully trained projector weights out of a (possibly gathered, PEFT-prefixed) state dict."""
    out = {}
    for key, value in state_dict.items():
        # the projector itself, or PEFT's trained copy of it (modules_to_save); never the frozen original
        m = re.search(r"multi_modal_projector\.(?:modules_to_save\.[^.]+\.)?(linear_\d\.(?:weight|bias))$", key)
        if m and "lora_" not in key:
            out[m.group(1)] = value
    return out


def _optimizer_part(name: str) -> str:
    """Which learning-rate group a trainable parameter belongs to.  LoRA factors on the projector are LoRA
    weights (B starts at 0): they take the LoRA rate, not the small rate of the fully trained projector."""
    if "multi_modal_projector" not in name:
        return "rest"
    return "projector_lora" if "lora_" in name else "projector"


class MethodCallback(transformers.TrainerCallback):
    def __init__(self, method, run: RunContext):
        self.method, self.run = method, run

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.method.on_train_begin(self.run.trainer.model, self.run)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.method.after_optimizer_step(self.run.trainer.model, state.global_step, self.run)


class LlavaSculptTrainer(transformers.Trainer):
    def __init__(self, *args, method, run: RunContext, **kwargs):
        super().__init__(*args, **kwargs)
        self.method, self.run = method, run
        self._extra_loss_sum, self._extra_loss_count = 0.0, 0

    def _get_train_sampler(self, train_dataset=None):
        if self.args.group_by_modality_length:
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            return ModalityGroupedSampler(dataset.modality_lengths, self.args.train_batch_size,
                                          self.args.world_size * self.args.gradient_accumulation_steps,
                                          seed=self.args.seed)
        return super()._get_train_sampler(train_dataset)

    def create_optimizer(self, model=None):
        """LLaVA's parameter groups: (decay, no decay) x (projector at --mm_projector_lr, LoRA on the projector
        at --mm_projector_lora_lr, the rest at --learning_rate)."""
        args = self.args
        if self.optimizer is None and (args.mm_projector_lr is not None or args.mm_projector_lora_lr is not None):
            opt_model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(opt_model))
            rates = {"rest": None, "projector": args.mm_projector_lr, "projector_lora": args.mm_projector_lora_lr}
            groups = []
            for part, lr in rates.items():
                for use_decay in (True, False):
                    params = [p for n, p in opt_model.named_parameters() if p.requires_grad
                              and _optimizer_part(n) == part and (n in decay) == use_decay]
                    if params:
                        group = {"params": params, "weight_decay": args.weight_decay if use_decay else 0.0}
                        if lr is not None:
                            group["lr"] = lr
                        groups.append(group)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
            return self.optimizer
        return super().create_optimizer(model)

    def _labelled_head(self, model, inputs, return_outputs):
        """The output embedding module when the training loss may be computed at the labelled positions only
        (model/labelled_loss.py), else None: the Trainer's own path, with full logits, when the model is not training
        (evaluation), the caller wants the outputs, a label smoother or compute_loss_func needs the logits,
        the batch has no labels or brings its own shift_labels, the model's forward takes no **kwargs (it could
        not pass shift_labels on to its loss), its loss is not ForCausalLMLoss, it has no output embeddings,
        under DeepSpeed sequence parallelism, or with --full_logits True."""
        if (getattr(self.args, "full_logits", False) or not model.training or return_outputs
                or self.label_smoother is not None or self.compute_loss_func is not None
                or "labels" not in inputs or "shift_labels" in inputs or not self.model_accepts_loss_kwargs):
            return None
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None and getattr(parallelism, "sp_enabled", False):
            return None
        from transformers.loss.loss_utils import ForCausalLMLoss

        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        if getattr(base, "loss_function", None) is not ForCausalLMLoss or not hasattr(base, "get_output_embeddings"):
            return None
        return base.get_output_embeddings()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Task loss normalised as --loss_normalization says, plus the method's penalty once per optimizer step.

        `num_items_in_batch` is the Trainer's count of label tokens in the step's accumulated micro-batches (summed
        over the processes with --average_tokens_across_devices).  global_tokens hands it to the model, which
        sums the cross-entropy and divides by it; the Trainer then does not divide by the accumulation steps and
        multiplies by the number of processes to undo DDP's gradient averaging.  llava withholds it: the model
        returns its mean over this micro-batch's own label tokens, which is divided by the accumulation steps,
        and DDP averages the processes' gradients (LLaVA-1.5 on transformers 4.31).

        In training the LM head is applied at the labelled positions only (model/labelled_loss.py: the same loss and
        gradients as full logits, N x V logits instead of B x T x V); the model is still called through the
        Trainer's compute_loss and its own forward, with `shift_labels`.  `_labelled_head` lists when the
        Trainer's full-logits path is taken instead."""
        mode = self.args.loss_normalization
        if mode not in ("llava", "global_tokens"):
            raise UserError(f"--loss_normalization must be llava or global_tokens, got {mode!r}")
        count = num_items_in_batch if mode == "global_tokens" else None
        head = self._labelled_head(model, inputs, return_outputs)
        if head is None:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=count)
        else:
            from llava_sculpt.model.labelled_loss import labelled_logits

            with labelled_logits(head, inputs["labels"]) as targets:
                result = super().compute_loss(model, {**inputs, "shift_labels": targets},
                                              return_outputs=return_outputs, num_items_in_batch=count)
        if not model.training:
            return result
        loss, outputs = result if return_outputs else (result, None)
        # training_step divides what we return by the accumulation steps unless it takes it as already scaled,
        # which it decides from the count it passed us (its rule, repeated here).
        trainer_divides = not (self.loss_is_scaled_for_ga if self.loss_is_scaled_for_ga is not None
                               else (self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                               or self.compute_loss_func is not None)
        if mode == "llava" and not trainer_divides:
            loss = loss / self.current_gradient_accumulation_steps
        extra = self.method.extra_loss(model)
        if extra is not None:
            self._extra_loss_sum += float(extra.detach())
            self._extra_loss_count += 1
            # The penalty belongs to the optimizer step, not to each micro-batch: it is added to every
            # micro-batch divided by the accumulation steps (by us when the Trainer will not), so it enters each
            # optimizer step exactly once, in both modes; it is added after the Trainer's multiplication by the
            # number of processes, so DDP's averaging of the (equal) penalty gradients keeps it once.
            if not trainer_divides:
                extra = extra / self.current_gradient_accumulation_steps
            loss = loss + extra
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        """The method's own terms are logged beside the loss.  The end-of-training `train_loss` of a resumed run
        is the whole run's mean, as in an uninterrupted run (Trainer's covers only the steps of this call: 0.158
        against 0.276 in one case); the steps before the resume come from the logged losses of the checkpoint's
        trainer_state.json (exact when --logging_steps divides --save_steps; LLaVA logs every step), and
        `train_loss_this_call` keeps Trainer's value."""
        if self._extra_loss_count and "loss" in logs:
            logs[f"{self.method.name}_penalty"] = self._extra_loss_sum / self._extra_loss_count
            self._extra_loss_sum, self._extra_loss_count = 0.0, 0
        if "loss" in logs:
            logs.update(self.method.logs())
        resumed_at = getattr(self, "_initial_global_step", 0)
        if "train_loss" in logs and resumed_at > 0:
            before_sum, before_steps = 0.0, 0
            for entry in self.state.log_history:
                if "loss" in entry and entry["step"] <= resumed_at:
                    before_sum += entry["loss"] * (entry["step"] - before_steps)
                    before_steps = entry["step"]
            this_call = self.state.global_step - resumed_at
            logs["train_loss_this_call"] = logs["train_loss"]
            logs["train_loss"] = (before_sum + logs["train_loss"] * this_call) / max(before_steps + this_call, 1)
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir=None, _internal_call=False):
        """A method without LoRA under DeepSpeed: gather only its trained tensors (the Trainer would gather the
        whole model under ZeRO-3, frozen weights included); every process takes part."""
        if self.method.uses_lora or not self.is_deepspeed_enabled:
            return super().save_model(output_dir, _internal_call)
        from llava_sculpt.methods.zero import gathered

        trained = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        with gathered(list(trained.values())):
            state_dict = {n: p.detach().cpu().clone() for n, p in trained.items()}
        self._save(output_dir if output_dir is not None else self.args.output_dir, state_dict=state_dict)

    def _keeps_frozen_out_of_deepspeed_checkpoints(self) -> bool:
        """A method without LoRA under DeepSpeed: its checkpoint-N/global_stepN holds the trained tensors only.
        The Trainer asks DeepSpeed to leave frozen weights out for PEFT models alone, so for SPIDER /
        MagnitudeMask each checkpoint would otherwise carry a whole 16-bit copy of the model (~14 GB at 7B)."""
        return not self.method.uses_lora and self.is_deepspeed_enabled

    def _save_optimizer_and_scheduler(self, output_dir):
        if not self._keeps_frozen_out_of_deepspeed_checkpoints():
            return super()._save_optimizer_and_scheduler(output_dir)
        self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)  # collective
        from accelerate.utils import DeepSpeedSchedulerWrapper

        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            # the Trainer's rule: DeepSpeed saves its own scheduler, a Trainer-made one goes to scheduler.pt
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, transformers.trainer.SCHEDULER_NAME))

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        """Resuming such a checkpoint: the Trainer loads DeepSpeed's module state strictly (all weights) unless
        the model is a PEFT model; here the frozen weights are absent by design, so it is loaded non-strictly
        and what is missing is checked to be exactly the frozen weights (they come from the base model)."""
        if resume_from_checkpoint is None or not self._keeps_frozen_out_of_deepspeed_checkpoints():
            return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)
        model, train_dataloader = super()._prepare_for_training(max_steps, train_dataloader, None)
        self._load_deepspeed_trained_only(resume_from_checkpoint)
        self._load_optimizer_and_scheduler(resume_from_checkpoint)
        self._load_scaler(resume_from_checkpoint)
        return model, train_dataloader

    def _load_deepspeed_trained_only(self, checkpoint: str) -> None:
        import glob

        if not glob.glob(os.path.join(checkpoint, "global_step*")):
            raise UserError(f"{checkpoint}: no DeepSpeed global_step* folder; resume a DeepSpeed run from a "
                            "checkpoint a DeepSpeed run wrote")
        trained = {n for n, p in self.model.named_parameters() if p.requires_grad}

        def load_module(src, dst):
            result = dst.load_state_dict(src, strict=False)
            missing_trained = sorted(set(result.missing_keys) & trained)
            if missing_trained or result.unexpected_keys:
                raise UserError(f"{checkpoint}: its DeepSpeed module state does not fit this run (trained tensors "
                                f"missing e.g. {missing_trained[:2]}, unexpected e.g. {result.unexpected_keys[:2]}); "
                                "resume with the same --method and layer flags")

        load_path, _ = self.model_wrapped.load_checkpoint(checkpoint, load_module_strict=False,
                                                          load_optimizer_states=True, load_lr_scheduler_states=True,
                                                          custom_load_fn=load_module)
        if load_path is None:
            raise UserError(f"{checkpoint}: DeepSpeed could not load this checkpoint")

    def _save(self, output_dir=None, state_dict=None):
        """Every save (checkpoint-N and the final one) is self-contained: adapter + projector + method state
        + processor + run arguments.  Under ZeRO-3 `state_dict` is the gathered one, so saved values are the
        trained ones.  A method without LoRA saves its trained tensors only (partial_model.safetensors)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        from llava_sculpt.methods import lora_init

        initial_adapter = self.run.extras.get(lora_init.INITIAL_ADAPTER_KEY)
        if self.method.uses_lora and initial_adapter:  # pissa / olora / corda: an adapter of the ORIGINAL base
            if self.args.should_save:
                os.makedirs(output_dir, exist_ok=True)
                lora_init.save_converted_adapter(self.model, output_dir, initial_adapter, state_dict)
                if self.processing_class is not None:
                    self.processing_class.save_pretrained(output_dir)
                torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))
        elif self.method.uses_lora:
            super()._save(output_dir, state_dict=state_dict)
        method_state = self.method.state_dict()  # on every process: a method may gather its state from the ranks
        if not self.args.should_save:
            return
        if not self.method.uses_lora:
            os.makedirs(output_dir, exist_ok=True)
            source = state_dict if state_dict else dict(self.model.named_parameters())
            trained = [n for n, p in self.model.named_parameters() if p.requires_grad]
            save_partial_model({n: source[n] for n in trained}, output_dir, self.run.model_args.model_name_or_path,
                               self.method.name)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))
        projector = None
        if self.method.trains_projector and not self.args.freeze_mm_mlp_adapter:
            source = state_dict if state_dict else find_projector(self.model).state_dict()
            projector = _projector_keys(source) if state_dict else dict(source)
            save_projector(projector, output_dir)
        self.method.after_save(output_dir, projector)
        save_method_state(self.method, output_dir, method_state)
        write_run_args(self.run, self.method, output_dir)
        give_normal_modes(output_dir, recursive=False)  # safetensors writes 0600 files

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self.method.uses_lora:
            load_partial_model(model if model is not None else self.model, resume_from_checkpoint)
            return
        from llava_sculpt.methods import lora_init

        if self.run.extras.get(lora_init.INITIAL_ADAPTER_KEY):  # the saved adapter is converted: the raw one
            if not lora_init.load_unconverted_adapter(model if model is not None else self.model,
                                                      resume_from_checkpoint):
                raise UserError(f"{resume_from_checkpoint}: no {lora_init.UNCONVERTED_ADAPTER_FILE}, which resuming "
                                f"--init_lora_weights {self.args.init_lora_weights} needs; start a new --output_dir")
            load_projector(model if model is not None else self.model, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_projector(model if model is not None else self.model, resume_from_checkpoint)
