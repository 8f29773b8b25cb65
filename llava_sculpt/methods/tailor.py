"""Model Tailor baseline (Zhu et al., "Model Tailor: Mitigating Catastrophic Forgetting in Multi-modal Large
Language Models", ICML'24; paper Table 1 row (f)).

Training is plain LoRA (exactly `--method lora`).  After training, for every adapted linear layer
(W [out, in], W_ft = W0 + s B A, s = alpha / r):

1. Hessian of the layer's reconstruction loss from its inputs x [in] on N calibration samples drawn from the
   target training data (seeded), captured through the FINE-TUNED model (forward pre-hooks on the adapted
   layers, one decoder layer per pass, each sample alone so there is no padding):
       H = (2 / N) * sum_{samples} sum_{tokens} x x^T          N = min(--tailor_samples, len(dataset))
   damped: H_d = H + lambda I, lambda = --tailor_damp (0.01) * mean(diag H) (lambda = 1 if H is all zero).
   U = upper Cholesky factor of H_d^{-1}  (U^T U = H_d^{-1}).
2. salience_ij    = |W_ft - W0|_ij
   sensitivity_ij = [W_ft]_ij^2 / U_jj^2                      (OBS/SparseGPT saliency of weight ij)
3. Per block of --tailor_block (128) input columns and per output row ("block-row"):
       score = 0.8 z(salience) + 0.2 z(sensitivity),    z(v) = (v - mean(v)) / std(v) over the block-row,
   std with 1/n (population); z = 0 for a block-row whose std is 0 (all values equal: no preference).
   Keep exactly k = max(1, floor(cols * keep)) entries per block-row (cols = the block's width, the last
   block may be narrower; k <= cols), the k highest scores; ties broken by the lower column index.
4. Kept entries start at W_ft, every other entry is reset to W0.  The kept ones are then compensated
   OBS-style, column by column (SparseGPT's procedure with the fixed mask from step 3):
       for j = 0 .. in-1:   q_j = w_j if kept else W0_j;   err = (w_j - q_j) / U_jj;
                            w_{j+1:} -= err * U_{j, j+1:};  w_j = q_j
   (lazily batched per block, identical maths).  As in SparseGPT the update reaches every later column, so
   a later reset entry's err is measured from its updated value; once column j is done it is never touched
   again, and at the end every reset entry is set to W0 again, so it equals W0 bit-exactly; kept entries
   carry W_ft + compensation.  The mask is chosen once, from W_ft, before any compensation.
   Caveat: with a fixed mask this greedy column order is not the least-squares optimum for that mask
   (min over kept entries of (w - w_ft)^T H (w - w_ft)); on random problems it usually, not always, lowers
   the reconstruction error against plain keep/reset.
5. The projector is reset to its pretrained weights.

Sign of the compensation.  The target is the fine-tuned layer's output on the target data: per output row,
minimise E(w) = (w - w_ft)^T H (w - w_ft).  Forcing column j to q_j is the change d_j = q_j - w_j; with the
earlier columns frozen, the optimal change of the later columns F is  d_F = -H_FF^{-1} H_Fj d_j
= d_j * U_jF / U_jj  (SparseGPT, Frantar & Alistarh 2023, Sec. 3; row j of the Cholesky factor of the
inverse Hessian holds exactly this ratio).  Hence w_F <- w_F + (q_j - w_j) U_jF / U_jj = w_F - err * U_jF
with err = (w_j - q_j) / U_jj: subtract.  The later weights move so as to cancel, through the correlation
of the inputs, the output change caused by pulling w_j back to W0; with the opposite sign they would add to
it (tests/test_dare_tailor.py checks the result against a direct least-squares reference and that the
reconstruction error drops).

Output: a merged Hugging Face checkpoint in RUN_DIR/merged (plain `LlavaForConditionalGeneration`, processor
included, written atomically).  EVALUATE RUN_DIR/merged: RUN_DIR itself still holds the untransformed LoRA
adapter.  For an existing LoRA run: `llava-sculpt transform tailor --model-path RUN_DIR --output-dir OUT`.
"""
from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass, field

import torch

from llava_sculpt.errors import UserError
from llava_sculpt.methods.base import RunContext
from llava_sculpt.methods.lora import LoRAMethod

SALIENCE_WEIGHT, SENSITIVITY_WEIGHT = 0.8, 0.2


@dataclass
class TailorFlags:
    tailor_keep: float = field(default=0.1, metadata={"help": "Model Tailor: fraction of fine-tuned entries kept "
                               "per block-row (k = max(1, floor(block_cols * keep)))"})
    tailor_samples: int = field(default=128, metadata={"help": "Model Tailor: calibration samples drawn from the "
                                "training data for the Hessian (fewer if the data set is smaller)"})
    tailor_block: int = field(default=128, metadata={"help": "Model Tailor: width (input columns) of a block"})
    tailor_damp: float = field(default=0.01, metadata={"help": "Model Tailor: Hessian damping, fraction of "
                               "mean(diag H) added to the diagonal"})
    tailor_seed: int = field(default=0, metadata={"help": "Model Tailor: seed choosing the calibration samples"})

    def validate(self) -> None:
        if not 0 < self.tailor_keep <= 1:
            raise UserError(f"--tailor_keep {self.tailor_keep}: the kept fraction must be in (0, 1]")
        if self.tailor_samples < 1 or self.tailor_block < 1:
            raise UserError(f"--tailor_samples {self.tailor_samples} / --tailor_block {self.tailor_block}: "
                            "both must be positive integers")
        if self.tailor_damp < 0:
            raise UserError(f"--tailor_damp {self.tailor_damp}: the damping must be >= 0")


# ---------------------------------------------------------------------------------------------- per layer


def keep_count(cols: int, keep: float) -> int:
    """k = floor(cols * keep) (with 1e-9 slack against 0.29 * 100 = 28.999...), at least 1, at most cols."""
    return min(cols, max(1, math.floor(cols * keep + 1e-9)))


def zscore_rows(values: torch.Tensor) -> torch.Tensor:
    """(v - mean) / std along the last dim, std with 1/n; rows whose std is 0 get z = 0."""
    mean = values.mean(dim=-1, keepdim=True)
    std = values.std(dim=-1, unbiased=False, keepdim=True)
    centred = values - mean
    return torch.where(std > 0, centred / torch.where(std > 0, std, torch.ones_like(std)), torch.zeros_like(centred))


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """U, upper triangular, with U^T U = (H + lambda I)^{-1}, lambda = damp * mean(diag H) (1 if that is 0)."""
    h = hessian.double()
    lam = damp * float(torch.diagonal(h).mean())
    if lam <= 0:
        lam = 1.0 if damp > 0 else 0.0
    h = h + lam * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise UserError(f"Model Tailor: the damped Hessian ({h.shape[0]} inputs) is not positive definite "
                        f"(damping {damp}); raise --tailor_damp or use more --tailor_samples")
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def tailor_keep_mask(w0: torch.Tensor, w_ft: torch.Tensor, u_diag: torch.Tensor, keep: float,
                     block: int) -> torch.Tensor:
    """Bool [out, in]: the k best-scoring entries of every block-row (score = 0.8 z(salience) + 0.2 z(sens.))."""
    salience = (w_ft - w0).abs()
    sensitivity = w_ft.pow(2) / u_diag.pow(2)[None, :]
    mask = torch.zeros_like(w_ft, dtype=torch.bool)
    for b0 in range(0, w_ft.shape[1], block):
        b1 = min(b0 + block, w_ft.shape[1])
        score = (SALIENCE_WEIGHT * zscore_rows(salience[:, b0:b1])
                 + SENSITIVITY_WEIGHT * zscore_rows(sensitivity[:, b0:b1]))
        best = torch.argsort(score, dim=1, descending=True, stable=True)[:, :keep_count(b1 - b0, keep)]
        mask[:, b0:b1].scatter_(1, best, True)
    return mask


def obs_compensate(w_ft: torch.Tensor, w0: torch.Tensor, keep_mask: torch.Tensor, u: torch.Tensor,
                   block: int) -> torch.Tensor:
    """Column-by-column OBS with a fixed mask (SparseGPT's lazy-batch form): reset entries go to W0, the error
    of each column is pushed onto the later columns (w_{j+1:} -= err * U_{j, j+1:}); reset entries are
    re-imposed as exact W0 at the end.  All [out, in]; computed in float64."""
    w = w_ft.double().clone()
    w0d, u = w0.double(), u.double()
    cols = w.shape[1]
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        w_blk, u_blk = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
        errors = torch.zeros_like(w_blk)
        for i in range(b1 - b0):
            current = w_blk[:, i]
            target = torch.where(keep_mask[:, b0 + i], current, w0d[:, b0 + i])
            err = (current - target) / u_blk[i, i]  # 0 for kept entries
            w_blk[:, i:] -= err[:, None] * u_blk[i, i:][None, :]
            errors[:, i] = err
        w[:, b0:b1] = w_blk
        w[:, b1:] -= errors @ u[b0:b1, b1:]
    return torch.where(keep_mask, w, w0d)


def tailor_layer(w0: torch.Tensor, w_ft: torch.Tensor, hessian: torch.Tensor, keep: float = 0.1,
                 block: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_tailored in w0's dtype, keep mask).  Reset entries are w0's own values (bit-exact)."""
    u = inverse_hessian_cholesky(hessian.to(w_ft.device), damp)
    mask = tailor_keep_mask(w0.double(), w_ft.double(), torch.diagonal(u), keep, block)
    compensated = obs_compensate(w_ft, w0, mask, u, block).to(w0.dtype)
    return torch.where(mask, compensated, w0), mask


# ---------------------------------------------------------------------------------------------- calibration


@dataclass
class CalibrationData:
    data_path: str
    image_folder: str | None = None
    version: str = "v1"
    model_max_length: int = 2048
    image_aspect_ratio: str = "pad"

    @classmethod
    def from_run(cls, run: RunContext) -> "CalibrationData":
        return cls(run.data_args.data_path, run.data_args.image_folder, run.model_args.version,
                   run.training_args.model_max_length, run.data_args.image_aspect_ratio)

    @classmethod
    def from_run_dir(cls, run_dir: str, **overrides) -> "CalibrationData":
        """The run's own training data (RUN_DIR/run_args.json), any non-None override winning."""
        from llava_sculpt.transform import read_run_args

        recorded = read_run_args(run_dir)
        data, model, train = (recorded.get(k, {}) for k in ("data_args", "model_args", "training_args"))
        values = {"data_path": data.get("data_path"), "image_folder": data.get("image_folder"),
                  "version": model.get("version", "v1"), "model_max_length": train.get("model_max_length", 2048),
                  "image_aspect_ratio": data.get("image_aspect_ratio", "pad")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if not values["data_path"]:
            raise UserError(f"Model Tailor needs calibration samples from the target training data: pass "
                            f"--data-path (and --image-folder); {run_dir} has no run_args.json recording them")
        return cls(**values)

    def dataset(self, processor, config):
        from llava_sculpt.data.conversation import get_template
        from llava_sculpt.data.dataset import LlavaSupervisedDataset

        return LlavaSupervisedDataset(self.data_path, self.image_folder, processor.tokenizer,
                                      processor.image_processor, config, get_template(self.version),
                                      self.model_max_length, self.image_aspect_ratio)


def calibration_samples(dataset, n: int, seed: int = 0) -> list[dict]:
    """min(n, len(dataset)) distinct samples, chosen with random.Random(seed)."""
    indices = random.Random(seed).sample(range(len(dataset)), min(n, len(dataset)))
    return [dataset[i] for i in indices]


class _StopForward(Exception):
    pass


def model_inputs(item: dict, device, dtype: torch.dtype) -> dict:
    inputs = {"input_ids": item["input_ids"][None].to(device),
              "attention_mask": torch.ones_like(item["input_ids"])[None].to(device)}
    if "pixel_values" in item:
        inputs["pixel_values"] = item["pixel_values"][None].to(device, dtype)
    return inputs


@torch.no_grad()
def collect_hessians(model, layers: dict[str, torch.nn.Module], samples: list[dict],
                     stop_after: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """H = (2 / N) sum x x^T (float64, [in, in]) of the inputs of each layer in `layers` over the N samples,
    one sample per forward (no padding); the forward is cut short after `stop_after` when given."""
    some = next(iter(layers.values()))
    device, dtype = some.base_layer.weight.device, some.base_layer.weight.dtype
    hessians = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device)
                for name, m in layers.items()}

    def accumulate(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()  # [tokens, in]
            hessians[name].addmm_(x.T, x)
        return hook

    def stop(module, args, output):
        raise _StopForward

    handles = [m.register_forward_pre_hook(accumulate(name)) for name, m in layers.items()]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    try:
        for item in samples:
            try:
                model(**model_inputs(item, device, dtype), use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: h * (2.0 / len(samples)) for name, h in hessians.items()}


def decoder_layer_groups(model, layers: list[tuple[str, torch.nn.Module]]):
    """[(decoder layer module or None, [(name, layer), ...])] in module order: one forward pass per group."""
    modules = dict(model.named_modules())
    groups: dict[str | None, list] = {}
    for name, layer in layers:
        m = re.match(r"(.*\.layers\.\d+)\.", name)
        groups.setdefault(m.group(1) if m else None, []).append((name, layer))
    return [(modules[key] if key else None, items) for key, items in groups.items()]


@torch.no_grad()
def tailor_merge_(loaded, samples: list[dict], flags: "TailorFlags") -> dict:
    """In place on `loaded.model` (a PeftModel): every adapted weight <- Model Tailor's, projector <- the
    pretrained one; returns the plain model (adapter removed) and the kept fraction.  Every Hessian is taken
    through the unmodified fine-tuned model: new weights wait on the CPU until all layers are done."""
    from llava_sculpt.transform import lora_delta, lora_layers, set_projector

    layers = lora_layers(loaded.model)
    pending, kept, total = {}, 0, 0
    for stop_after, items in decoder_layer_groups(loaded.model, layers):
        hessians = collect_hessians(loaded.model, dict(items), samples, stop_after)
        for name, layer in items:
            w0 = layer.base_layer.weight
            w_ft = w0.double() + lora_delta(layer, dtype=torch.float64)
            new_weight, mask = tailor_layer(w0, w_ft, hessians.pop(name), flags.tailor_keep, flags.tailor_block,
                                            flags.tailor_damp)
            pending[name] = new_weight.cpu()
            kept, total = kept + int(mask.sum()), total + mask.numel()
    for name, layer in layers:
        layer.base_layer.weight.copy_(pending.pop(name))
    set_projector(loaded.model, loaded.base_projector)
    return {"model": loaded.model.unload(), "kept_fraction": kept / max(total, 1)}


def apply_tailor(model_path: str, output_dir: str, data: CalibrationData, model_base: str | None = None,
                 flags: TailorFlags | None = None, dtype: torch.dtype = torch.float32, device: str = "auto") -> str:
    """Load the LoRA run at `model_path`, apply Model Tailor with calibration samples from `data`, write the
    merged checkpoint to `output_dir`."""
    from llava_sculpt.transform import load_run, resolve_device, save_merged

    flags = flags or TailorFlags()
    flags.validate()
    loaded = load_run(model_path, model_base, dtype, resolve_device(device))
    samples = calibration_samples(data.dataset(loaded.processor, loaded.model.config), flags.tailor_samples,
                                  flags.tailor_seed)
    result = tailor_merge_(loaded, samples, flags)
    info = {"transform": "tailor", "flags": vars(flags), "calibration": vars(data), "num_samples": len(samples),
            "source_run": os.path.abspath(model_path), "model_base": loaded.model_base,
            "dtype": str(dtype).replace("torch.", ""), "kept_fraction_lm": result["kept_fraction"]}
    return save_merged(result["model"], loaded.processor, output_dir, info)


class TailorMethod(LoRAMethod):
    """`--method tailor`: trains plain LoRA, then writes RUN_DIR/merged with Model Tailor's weights (calibrated
    on the run's own training data).  Evaluate RUN_DIR/merged."""

    name = "tailor"
    flags_class = TailorFlags

    def __init__(self, flags: TailorFlags | None = None):
        super().__init__(flags or TailorFlags())
        self.flags.validate()  # fail before training, not after

    def post_training(self, run_dir: str, model, run: RunContext) -> None:
        # Reloaded from what was just saved in run_dir, as `llava-sculpt transform tailor` would do (in float32,
        # on the GPU when there is one: the trained model is still in memory next to it).
        from llava_sculpt.transform import MERGED_SUBDIR

        out = apply_tailor(run_dir, os.path.join(run_dir, MERGED_SUBDIR), CalibrationData.from_run(run),
                           run.model_args.model_name_or_path, self.flags)
        print(f"tailor: merged checkpoint (evaluate this one) written to {out}")
