"""Model Tailor baseline (Zhu et al., "Model Tailor: Mitigating Catastrophic Forgetting in Multi-modal Large
Language Models", ICML'24; paper Table 1 row (f)).

Training is plain LoRA (exactly `--method lora`).  After training, for every adapted linear layer
(W [out, in], W_ft = W0 + s B A, s = alpha / r):

1. Hessian of the layer's reconstruction loss from its inputs x [in] on N calibration samples drawn from the
   target training data (seeded), captured with forward pre-hooks on the adapted layers, one decoder layer
   per (cut-short) pass, each sample alone so there is no padding:
       H = (2 / N) * sum_{samples} sum_{tokens} x x^T          N = min(--tailor_samples, len(dataset))   (T1)
   damped: H_d = H + lambda I, lambda = --tailor_damp (0.01) * mean(diag H) (lambda = 1 if H is all zero).
   U = upper Cholesky factor of H_d^{-1}  (U^T U = H_d^{-1}).                                          (T2)
2. salience_ij    = |W_ft - W0|_ij                                                                    (T3)
   sensitivity_ij = [W]_ij^2 / U_jj^2                      (OBS/SparseGPT saliency of weight ij)       (T4)
3. Per block of --tailor_block (128) input columns:
       score = 0.8 z(salience) + 0.2 z(sensitivity),    z(v) = (v - mean(v)) / std(v) along each row     (T5)
   and a kept set chosen from the scores (below).
4. Kept entries start at W_ft, every other entry is reset to W0.  Then, column by column (SparseGPT's
   procedure, lazily batched per block, identical maths):
       for j = 0 .. in-1:   q_j = w_j if kept else W0_j;   err = (w_j - q_j) / U_jj;
                            w_{j+1:} -= err * U_{j, j+1:};  w_j = q_j                                 (T6)
   A later reset entry's err is measured from its updated value; once column j is done it is never touched
   again, and reset entries end exactly at W0 (bit-exact); kept entries carry W_ft + compensation.
5. The projector is reset to its pretrained weights.

Two versions, `--tailor_compat`:

correct (default).  The choices below are the ones whose maths holds:
  * T6 subtracts.  The target is the fine-tuned layer's output on the target data: per output row, minimise
    E(w) = (w - w_ft)^T H (w - w_ft).  Forcing column j to q_j is the change d_j = q_j - w_j; with the earlier
    columns frozen, the optimal change of the later columns F is  d_F = -H_FF^{-1} H_Fj d_j = d_j * U_jF / U_jj
    (SparseGPT, Frantar & Alistarh 2023, Sec. 3; row j of the Cholesky factor of the inverse Hessian holds
    exactly this ratio).  Hence w_F <- w_F + (q_j - w_j) U_jF / U_jj = w_F - err * U_jF.  With the opposite
    sign the later weights add to the output change instead of cancelling it.
  * The kept set is chosen per block-row: keep exactly k = max(1, floor(cols * keep)) entries of every row of
    the block (cols = the block's width, the last block may be narrower), the k highest scores, ties broken by
    the lower column index.  E(w) separates over output rows and z (T5) is normalised per row, so scores of
    different rows have no common scale; a per-row budget keeps them apart.
  * The mask is chosen once, from W_ft (T4 with W = W_ft), before any compensation: the kept set is a property
    of the fine-tuned model, salience and sensitivity of the same weights.
  * std with 1/n (population); z = 0 for a block-row whose std is 0 (all values equal: no preference).
  * Hessians are taken through the unmodified fine-tuned model: layers are processed from the last decoder
    layer to the first, each written in place once done (a later layer never feeds an earlier one's inputs).
  Caveat: with a fixed mask this greedy column order is not the least-squares optimum for that mask; on
  random problems it usually, not always, lowers the reconstruction error against plain keep/reset.

official.  What the authors' release does (github didizhu-zju/Model-Tailor: main_model_tailor.py calls
llava/train/sparsegpt.py `SparseGPT.fasterprune(0.9, blocksize=128, percdamp=0.01)`; line numbers of
llava/train/sparsegpt.py at commit e69bf76).  It is the code behind the paper's numbers, so
scripts/reproduce_table1.sh uses it:
  O1 T6 ADDS: err = (w - q) / U_ii (l. 158), W1[:, i:] += err U_{i, i:} (l. 160) and the lazy update
     W[:, i2:] += Err U[i1:i2, i2:] (l. 169); the commented-out `W[:, i2:] -= ...` of l. 168 is SparseGPT's.
  O2 The reset set is chosen per block jointly over all rows: thresh = sort(score of all rows x cols of the
     block)[int(n * (1 - keep))] and reset = score <= thresh (l. 124-125), i.e. int(n (1 - keep)) + 1 entries
     of the block are reset (more on ties) and rows keep different numbers of entries.
  O3 The sensitivity of a block is taken from the weights as compensated by the blocks before it
     (W1 = W[:, i1:i2].clone(), l. 103, after the lazy updates of l. 169; T4 at l. 114), the salience from the
     uncompensated W_ft (l. 89).  The mask of a block is fixed at its start (no update inside the block).
  O4 std is torch's default, unbiased (1/(n-1), l. 116 and 118), with no guard: a row whose values are all
     equal gives NaN/inf z; NaN scores sort last and are never reset (torch.sort / `<=` semantics, kept here).
     Within a block every row has the same n, so 1/(n-1) vs 1/n scales every z of the block by the same
     sqrt(n/(n-1)): the mask is the same either way (only the score values differ).
  Also: input columns never seen (diag(H)_j = 0) get H_jj = 1 before damping (l. 73-74), then lambda =
  0.01 * mean(diag H) (l. 79), no fallback; main_model_tailor.py resets the projector's linear WEIGHTS (not
  biases) to the pretrained ones before calibrating, and tailors the decoder layers in order, each layer's
  Hessians taken through the already tailored earlier layers (SparseGPT's sequential scheme).
  Not reproduced: float32 arithmetic (float64 here, both modes); calibration batches of the shuffled training
  loader with padding (one sample per pass here); the release's Hessian passes call each decoder layer on its
  own, without attention mask / position ids (the full model's forward here).  The
  release tailors only decoder layers 20-31 of the 32 (hard-coded `layers[20]`, `range(20, len(layers))`):
  --tailor_first_layer 20 does that (layers below keep W0 + s B A); the default 0 tailors every layer.

Output: a merged Hugging Face checkpoint in RUN_DIR/merged (plain `LlavaForConditionalGeneration`, processor
included, written atomically).  EVALUATE RUN_DIR/merged: RUN_DIR itself still holds the untransformed LoRA
adapter.  For an existing LoRA run: `llava-sculpt transform tailor --model-path RUN_DIR --output-dir OUT`.
Memory: the run is reloaded from RUN_DIR after the training state is freed, in the run's compute dtype
(see `methods/posthoc.py`); new weights are written in place, so beyond the model there are only one
decoder layer's float64 Hessians and one layer's float64 working copies.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

import torch

from llava_sculpt.data.conversation import get_template
from llava_sculpt.data.dataset import LlavaSupervisedDataset
from llava_sculpt.errors import UserError
from llava_sculpt.methods.base import RunContext
from llava_sculpt.methods.posthoc import (LoadedRun, PostHocMethod, load_run, lora_delta, lora_layers, read_run_args,
                                          replace_adapted_weight, resolve_device, resolve_dtype, save_merged,
                                          set_projector, transform_info)
from llava_sculpt.model.load import find_projector

SALIENCE_WEIGHT, SENSITIVITY_WEIGHT = 0.8, 0.2  # T5; llava/train/sparsegpt.py l. 121 (llava/sparsegpt.py: 0.5/0.5)
COMPAT_MODES = ("correct", "official")


@dataclass
class TailorFlags:
    tailor_keep: float = field(default=0.1, metadata={"help": "Model Tailor: fraction of fine-tuned entries kept "
                               "(correct: k = max(1, floor(block_cols * keep)) per block-row; official: per "
                               "block, int(n * (1 - keep)) + 1 of its n entries reset)"})
    tailor_samples: int = field(default=128, metadata={"help": "Model Tailor: calibration samples drawn from the "
                                "training data for the Hessian (fewer if the data set is smaller)"})
    tailor_block: int = field(default=128, metadata={"help": "Model Tailor: width (input columns) of a block"})
    tailor_damp: float = field(default=0.01, metadata={"help": "Model Tailor: Hessian damping, fraction of "
                               "mean(diag H) added to the diagonal"})
    tailor_seed: int = field(default=0, metadata={"help": "Model Tailor: seed choosing the calibration samples"})
    tailor_compat: str = field(default="correct", metadata={
        "choices": list(COMPAT_MODES),
        "help": "Model Tailor: 'correct' (compensation subtracted as in SparseGPT, k kept per block-row, mask "
                "from W_ft, Hessians through the fine-tuned model) or 'official' (the authors' release: "
                "compensation added, reset set chosen jointly per block, sensitivity from the compensated "
                "weights, unbiased std, sequential Hessians, projector weights reset but not biases); "
                "see llava_sculpt/methods/tailor.py"})
    tailor_first_layer: int = field(default=0, metadata={"help": "Model Tailor: decoder layers below this index "
                                    "are not tailored and keep W0 + s B A (the official release hard-codes 20 "
                                    "for LLaVA-7B's 32 layers)"})

    def validate(self) -> None:
        if not 0 < self.tailor_keep <= 1:
            raise UserError(f"--tailor_keep {self.tailor_keep}: the kept fraction must be in (0, 1]")
        if self.tailor_samples < 1 or self.tailor_block < 1:
            raise UserError(f"--tailor_samples {self.tailor_samples} / --tailor_block {self.tailor_block}: "
                            "both must be positive integers")
        if self.tailor_damp < 0:
            raise UserError(f"--tailor_damp {self.tailor_damp}: the damping must be >= 0")
        if self.tailor_compat not in COMPAT_MODES:
            raise UserError(f"--tailor_compat {self.tailor_compat!r}: expected one of {', '.join(COMPAT_MODES)}")
        if self.tailor_first_layer < 0:
            raise UserError(f"--tailor_first_layer {self.tailor_first_layer}: must be >= 0")


# ---------------------------------------------------------------------------------------------- per layer: correct


def keep_count(cols: int, keep: float) -> int:
    """k = floor(cols * keep) (with 1e-9 slack against 0.29 * 100 = 28.999...), at least 1, at most cols."""
    return min(cols, max(1, math.floor(cols * keep + 1e-9)))


def zscore_rows(values: torch.Tensor) -> torch.Tensor:
    """T5's z along the last dim, std with 1/n; rows whose std is 0 get z = 0."""
    mean = values.mean(dim=-1, keepdim=True)
    std = values.std(dim=-1, unbiased=False, keepdim=True)
    centred = values - mean
    return torch.where(std > 0, centred / torch.where(std > 0, std, torch.ones_like(std)), torch.zeros_like(centred))


def inverse_hessian_cholesky(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """T2: U, upper triangular, with U^T U = (H + lambda I)^{-1}, lambda = damp * mean(diag H) (1 if that is 0)."""
    h = hessian.to(torch.float64, copy=True)  # `hessian` may be shared by several layers: never modified
    lam = damp * float(torch.diagonal(h).mean())
    if lam <= 0:
        lam = 1.0 if damp > 0 else 0.0
    torch.diagonal(h).add_(lam)
    return _upper_cholesky_of_inverse(h, damp)


def _upper_cholesky_of_inverse(h_damped: torch.Tensor, damp: float) -> torch.Tensor:
    """chol(H_d^{-1}, upper) via chol(H_d) and cholesky_inverse; at most two [in, in] float64 copies alive."""
    lower, info = torch.linalg.cholesky_ex(h_damped)
    size = h_damped.shape[0]
    del h_damped
    if int(info) != 0:
        raise UserError(f"Model Tailor: the damped Hessian ({size} inputs) is not positive definite "
                        f"(damping {damp}); raise --tailor_damp or use more --tailor_samples")
    inverse = torch.cholesky_inverse(lower)
    del lower
    return torch.linalg.cholesky(inverse, upper=True)


def tailor_keep_mask(w0: torch.Tensor, w_ft: torch.Tensor, u_diag: torch.Tensor, keep: float,
                     block: int) -> torch.Tensor:
    """Bool [out, in]: the k best-scoring entries of every block-row (T3-T5 on W_ft)."""
    mask = torch.zeros_like(w_ft, dtype=torch.bool)
    for b0 in range(0, w_ft.shape[1], block):
        b1 = min(b0 + block, w_ft.shape[1])
        salience = (w_ft[:, b0:b1] - w0[:, b0:b1]).abs()  # T3
        sensitivity = w_ft[:, b0:b1].pow(2) / u_diag[b0:b1].pow(2)[None, :]  # T4
        score = SALIENCE_WEIGHT * zscore_rows(salience) + SENSITIVITY_WEIGHT * zscore_rows(sensitivity)  # T5
        best = torch.argsort(score, dim=1, descending=True, stable=True)[:, :keep_count(b1 - b0, keep)]
        mask[:, b0:b1].scatter_(1, best, True)
    return mask


def obs_compensate(w_ft: torch.Tensor, w0: torch.Tensor, keep_mask: torch.Tensor, u: torch.Tensor,
                   block: int) -> torch.Tensor:
    """T6 with a fixed mask (SparseGPT's lazy-batch form): reset entries go to W0, the error of each column is
    pushed onto the later columns (w_{j+1:} -= err * U_{j, j+1:}); reset entries are re-imposed as exact W0 at
    the end.  All [out, in]; computed in float64."""
    w = w_ft.to(torch.float64, copy=True)
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


# ---------------------------------------------------------------------------------------------- per layer: official


def official_inverse_hessian_cholesky(hessian: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """T2 as in the release: H_jj = 1 for dead inputs (diag 0), then lambda = damp * mean(diag H), no fallback."""
    h = hessian.to(torch.float64, copy=True)
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0  # pairs (j, j) of the dead indices: their diagonal entries
    torch.diagonal(h).add_(damp * torch.diagonal(h).mean())
    return _upper_cholesky_of_inverse(h, damp)


def official_block_scores(salience: torch.Tensor, sensitivity: torch.Tensor) -> torch.Tensor:
    """T5 of one block, [rows, cols]: z along each row with the unbiased std and no guard (O4)."""
    def z(v):
        return (v - v.mean(dim=1, keepdim=True)) / v.std(dim=1, keepdim=True)  # torch's default: 1/(n-1)
    return SALIENCE_WEIGHT * z(salience) + SENSITIVITY_WEIGHT * z(sensitivity)


def official_reset_mask(score: torch.Tensor, keep: float) -> torch.Tensor:
    """O2: reset = score <= the int(n * (1 - keep))-th smallest score of the whole block (n = all its entries)."""
    thresh = torch.sort(score.flatten())[0][int(score.numel() * (1.0 - keep))]
    return score <= thresh


def tailor_layer_official(w0: torch.Tensor, w_ft: torch.Tensor, hessian: torch.Tensor, keep: float = 0.1,
                          block: int = 128, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_tailored in w0's dtype, keep mask) as the release computes them (O1-O4); float64 arithmetic."""
    u = official_inverse_hessian_cholesky(hessian.to(w_ft.device), damp)
    w, w0d = w_ft.to(torch.float64, copy=True), w0.double()
    salience = (w - w0d).abs()  # T3 from the uncompensated W_ft (O3)
    keep_mask = torch.zeros_like(w, dtype=torch.bool)
    cols = w.shape[1]
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        w_blk, u_blk = w[:, b0:b1].clone(), u[b0:b1, b0:b1]  # already compensated by the blocks before (O3)
        sensitivity = w_blk.pow(2) / torch.diagonal(u_blk).pow(2)[None, :]  # T4 on the compensated weights
        reset = official_reset_mask(official_block_scores(salience[:, b0:b1], sensitivity), keep)
        done, errors = torch.zeros_like(w_blk), torch.zeros_like(w_blk)
        for i in range(b1 - b0):
            current = w_blk[:, i].clone()
            target = torch.where(reset[:, i], w0d[:, b0 + i], current)
            err = (current - target) / u_blk[i, i]
            w_blk[:, i:] += err[:, None] * u_blk[i, i:][None, :]  # O1: added
            done[:, i], errors[:, i] = target, err
        w[:, b0:b1] = done
        w[:, b1:] += errors @ u[b0:b1, b1:]  # O1: added
        keep_mask[:, b0:b1] = ~reset
    return torch.where(keep_mask, w.to(w0.dtype), w0), keep_mask


def tailor_layer(w0: torch.Tensor, w_ft: torch.Tensor, hessian: torch.Tensor, keep: float = 0.1,
                 block: int = 128, damp: float = 0.01, compat: str = "correct") -> tuple[torch.Tensor, torch.Tensor]:
    """(W_tailored in w0's dtype, keep mask).  Reset entries are w0's own values (bit-exact)."""
    if compat == "official":
        return tailor_layer_official(w0, w_ft, hessian, keep, block, damp)
    u = inverse_hessian_cholesky(hessian.to(w_ft.device), damp)
    w0d, w_ftd = w0.double(), w_ft.double()
    mask = tailor_keep_mask(w0d, w_ftd, torch.diagonal(u), keep, block)
    compensated = obs_compensate(w_ftd, w0d, mask, u, block).to(w0.dtype)
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
    """T1: H = (2 / N) sum x x^T (float64, [in, in]) of the inputs of each layer in `layers` over the N samples,
    one sample per forward (no padding); the forward is cut short after `stop_after` when given.

    Layers called one after the other on the very same input tensor (Llama's q/k/v_proj, gate/up_proj) get
    one shared Hessian tensor: same values, a third of the memory and work for q/k/v."""
    some = next(iter(layers.values()))
    device, dtype = some.base_layer.weight.device, some.base_layer.weight.dtype
    hessians: dict[str, torch.Tensor] = {}
    shares: dict[str, str] = {}  # layer -> layer whose Hessian it shares, fixed by the first sample
    last: list = [None, None]  # (input tensor, owner name) of the previous hooked call in this forward
    first = [True]

    def accumulate(name):
        def hook(module, args):
            x_in = args[0]
            owner = last[1] if last[0] is x_in else name
            if first[0]:
                shares[name] = owner
            elif shares.get(name) != owner:
                raise RuntimeError(f"Model Tailor: {name} shared its input with {shares.get(name)} on the first "
                                   f"calibration sample but not on a later one")
            last[0], last[1] = x_in, owner
            if owner == name:
                x = x_in.reshape(-1, x_in.shape[-1]).double()  # [tokens, in]
                if name not in hessians:
                    hessians[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=device)
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
            last[0] = last[1] = None
            first[0] = False
    finally:
        for handle in handles:
            handle.remove()
    for h in hessians.values():
        h.mul_(2.0 / len(samples))
    missing = set(layers) - set(shares)
    if missing:
        raise UserError(f"Model Tailor: no calibration input reached {sorted(missing)[:2]}")
    return {name: hessians[shares[name]] for name in layers}


@dataclass
class LayerGroup:
    """The adapted layers of one decoder layer (`module`, number `index`), or of no decoder layer (both None)."""
    index: int | None
    module: torch.nn.Module | None
    items: list[tuple[str, torch.nn.Module]]


def decoder_layer_groups(model, layers: list[tuple[str, torch.nn.Module]]) -> list[LayerGroup]:
    """Adapted layers grouped by decoder layer, in module order: one (cut-short) forward pass per group."""
    modules = dict(model.named_modules())
    groups: dict[str | None, list] = {}
    for name, layer in layers:
        m = re.match(r"(.*\.layers\.\d+)\.", name)
        groups.setdefault(m.group(1) if m else None, []).append((name, layer))
    return [LayerGroup(int(key.rsplit(".", 1)[1]) if key else None, modules[key] if key else None, items)
            for key, items in groups.items()]


@torch.no_grad()
def tailor_merge_(loaded: LoadedRun, samples: list[dict], flags: TailorFlags) -> dict:
    """In place on `loaded.model` (a PeftModel): every adapted weight <- Model Tailor's, projector <- the
    pretrained one; returns the plain model (adapter removed) and the kept fraction.

    correct: Hessians through the unmodified fine-tuned model, decoder layers from the last to the first, each
    written in place when done (its inputs never depend on a later layer).  official: decoder layers from the
    first to the last, each layer's Hessians taken through the tailored layers before it, after the projector's
    linear weights were reset (main_model_tailor.py).  Layers outside any decoder layer (none for LLaVA) come
    first (correct, written at the end) or last (official) with a full forward pass."""
    official = flags.tailor_compat == "official"
    groups = decoder_layer_groups(loaded.model, lora_layers(loaded.model))
    skipped = [g for g in groups if g.index is not None and g.index < flags.tailor_first_layer]
    decoder = [g for g in groups if g.index is not None and g.index >= flags.tailor_first_layer]
    outside = [g for g in groups if g.index is None]
    counts = [0, 0]

    def tailor_group(group: LayerGroup) -> dict[str, torch.Tensor]:
        hessians = collect_hessians(loaded.model, dict(group.items), samples, group.module)
        new = {}
        for name, layer in group.items:
            w0 = layer.base_layer.weight
            w_ft = lora_delta(layer, dtype=torch.float64).add_(w0)  # W0 + s B A in float64
            new[name], mask = tailor_layer(w0, w_ft, hessians.pop(name), flags.tailor_keep, flags.tailor_block,
                                           flags.tailor_damp, flags.tailor_compat)
            counts[0], counts[1] = counts[0] + int(mask.sum()), counts[1] + mask.numel()
            del w_ft, mask
        return new

    def write(group: LayerGroup, weights: dict[str, torch.Tensor]) -> None:
        for name, layer in group.items:
            replace_adapted_weight(layer, weights.pop(name))

    def merge_plain(group: LayerGroup) -> None:  # not tailored: W0 + s B A
        for _, layer in group.items:
            w0 = layer.base_layer.weight
            replace_adapted_weight(layer, w0.to(torch.float32) + lora_delta(layer).to(w0.device))

    if official:
        # the projector's linear weights, not its biases, back to the pretrained ones (main_model_tailor.py)
        set_projector(loaded.model, {f"{prefix}.weight": loaded.base_projector[f"{prefix}.weight"]
                                     for prefix, module in find_projector(loaded.model).named_modules()
                                     if isinstance(module, torch.nn.Linear)})
        for group in skipped:
            merge_plain(group)
        for group in decoder + outside:
            write(group, tailor_group(group))
    else:
        pending = [(group, {k: v.cpu() for k, v in tailor_group(group).items()}) for group in outside]
        for group in reversed(decoder):
            write(group, tailor_group(group))
        for group in skipped:
            merge_plain(group)
        for group, weights in pending:
            write(group, weights)
        set_projector(loaded.model, loaded.base_projector)
    return {"model": loaded.model.unload(), "kept_fraction": counts[0] / max(counts[1], 1)}


def apply_tailor(model_path: str, output_dir: str, data: CalibrationData, model_base: str | None = None,
                 flags: TailorFlags | None = None, dtype: torch.dtype | str = "auto", device: str = "auto") -> str:
    """Load the LoRA run at `model_path` (in `dtype`; `auto`: the run's compute dtype), apply Model Tailor with
    calibration samples from `data`, write the merged checkpoint to `output_dir` atomically."""
    flags = flags or TailorFlags()
    flags.validate()
    dtype = resolve_dtype(dtype, model_path, model_base)
    loaded = load_run(model_path, model_base, dtype, resolve_device(device))
    samples = calibration_samples(data.dataset(loaded.processor, loaded.model.config), flags.tailor_samples,
                                  flags.tailor_seed)
    result = tailor_merge_(loaded, samples, flags)
    info = transform_info("tailor", flags, model_path, loaded, dtype, calibration=vars(data),
                          num_samples=len(samples), kept_fraction_lm=result["kept_fraction"])
    return save_merged(result["model"], loaded.processor, output_dir, info)


class TailorMethod(PostHocMethod):
    """`--method tailor`: trains plain LoRA, then writes RUN_DIR/merged with Model Tailor's weights (calibrated
    on the run's own training data).  Evaluate RUN_DIR/merged."""

    name = "tailor"
    transform_name = "tailor"
    flags_class = TailorFlags

    def __init__(self, flags: TailorFlags | None = None):
        super().__init__(flags or TailorFlags())
        self.flags.validate()  # fail before training, not after

    def apply(self, run_dir: str, output_dir: str, run: RunContext, dtype: torch.dtype) -> str:
        # Reloaded from what was just saved in run_dir, after the training state was freed, as
        # `llava-sculpt transform tailor` does (on the GPU when there is one, in the run's compute dtype).
        return apply_tailor(run_dir, output_dir, CalibrationData.from_run(run), run.model_args.model_name_or_path,
                            self.flags, dtype)
