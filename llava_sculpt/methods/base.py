"""The one interface every fine-tuning method implements.

A method is a plain class with a flags dataclass.  The trainer calls, in this order:

    inject(model, run)                      wrap the base model with adapters; return the model to train
    on_train_begin(model, run)              once, after the optimizer exists (resume state already loaded)
    extra_loss(model) -> Tensor | None      added to the task loss once per optimizer step (see train.py)
    after_optimizer_step(model, step, run)  after every optimizer step; `step` = completed optimizer steps
    logs() -> dict[str, float]              extra values for the next logged line (e.g. averages since the last)
    state_dict() / load_state_dict(d)       tensors saved in every checkpoint as `method_state.safetensors`
                                            (state_dict runs on every process, so it may gather across ranks)
    after_save(output_dir, projector_state) at every save (checkpoint-N and the run), on the saving process,
                                            after the weights: extra files (LLaVA's stage-1 mm_projector.bin);
                                            `projector_state` = the saved projector, None when it is not trained
    use_connector(connector)                once, at parsing: --connector (training/arguments.py), before inject
    post_training(run_dir, model, run)      after training, on the main process (e.g. reports)
    transform_saved_run(run_dir, run)       after the run is saved and marked complete and the training state
                                            is freed, on the main process (DARE, Model Tailor: RUN_DIR/merged)

`run` is a `RunContext`: the parsed flags and, during training, the trainer and optimizer.  Methods never
touch the training loop itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class RunContext:
    model_args: Any
    data_args: Any
    training_args: Any
    trainer: Any = None
    extras: dict = field(default_factory=dict)

    @property
    def optimizer(self):
        return None if self.trainer is None else self.trainer.optimizer

    @property
    def is_main_process(self) -> bool:
        return self.training_args.process_index == 0


class FineTuningMethod:
    name: ClassVar[str] = "base"
    flags_class: ClassVar[type | None] = None  # a dataclass of this method's command-line flags
    trains_projector: ClassVar[bool] = True  # projector fully trained at --mm_projector_lr (LLaVA-1.5)
    connector: str = "full"  # --connector: full, lora (LoRA on the projector), frozen or sculpt (LoRASculpt's)
    # False: no PEFT adapter; `inject` makes some of the model's own tensors trainable and a run saves only those
    # (partial_model.safetensors, see model/load.py)
    uses_lora: ClassVar[bool] = True

    def __init__(self, flags=None):
        self.flags = flags

    def use_connector(self, connector: str) -> None:
        """--connector, as resolved and checked against the method (training/arguments.py `resolve_connector`):
        the projector is fully trained (and saved as mm_projector.safetensors) only with `full`."""
        self.connector = connector
        if connector != "full":
            self.trains_projector = False

    def inject(self, model, run: RunContext):
        raise NotImplementedError

    def on_train_begin(self, model, run: RunContext) -> None:
        pass

    def extra_loss(self, model) -> torch.Tensor | None:
        return None

    def after_optimizer_step(self, model, step: int, run: RunContext) -> None:
        pass

    def logs(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def after_save(self, output_dir: str, projector_state: dict[str, torch.Tensor] | None) -> None:
        pass

    def post_training(self, run_dir: str, model, run: RunContext) -> None:
        pass

    def transform_saved_run(self, run_dir: str, run: RunContext) -> None:
        pass
