"""AsymLoRA (arXiv 2502.20035; REFERENCE.md section 10): an asymmetric LoRA mixture in the MLPs.

* q, k, v, o of every decoder layer: plain PEFT LoRA, W = W0 + (alpha / r) B A.
* gate, up, down of every decoder layer's MLP: ONE shared A [r, in] (kaiming-uniform, PEFT's `lora_A`) and
  E expert factors B_e [out, r] (zero; `lora_experts_B`, E = --asym_experts, default 3), mixed densely by the
  decoder layer's router:

      y = W0 x + (alpha / r) * sum_e p_e(h) * B_e A x,      p(h) = softmax(R h + b),  R: [E, d_model]

  h is the token's post-attention-norm hidden state, i.e. the MLP input that gate_proj and up_proj receive.
  The probabilities are computed once per decoder layer and token (by whichever of gate/up runs first; the
  other finds them cached for the same input tensor) and reused for down_proj, whose own input is the
  intermediate activation.  The router (a Linear with bias, PyTorch's default initialisation: the
  reference gives none, ours) is a parameter of the gate_proj layer (`gate_proj.lora_router`).
* Load balancing (weight --asym_balance, 0.05): for each sample b, over the L decoder layers and its T_b valid
  tokens (attention_mask == 1) pooled together,

      bal_b = sum_e  mean_{l,t}(p_{l,t,e}) * mean_{l,t}(onehot(argmax_e' p_{l,t,e'})_e)   (the one-hot is constant)

  and the loss adds  --asym_balance * mean_b bal_b.  No task ids: routing is learned per token.  Logged as
  `asymlora_penalty` (weight included).  (Pooled over layers and tokens as the reference states it; no
  factor E in front: with uniform routing bal_b = 1/E.)

How it plugs into PEFT: the MLP linears get `AsymLoraLinear`, a subclass of PEFT's `lora.Linear`, through
PEFT's custom-module hook (`LoraConfig._register_custom_module({nn.Linear: factory})`); the factory returns
None for every other linear (q/k/v/o), which then gets PEFT's plain LoRA layer.  `lora_experts_B` and
`lora_router` are adapter attributes of a PEFT tuner layer, so they are trainable, saved in
`adapter_model.safetensors` (keys `...mlp.gate_proj.lora_experts_B.0`, `...gate_proj.lora_router.weight`)
and restored by `PeftModel.from_pretrained` on a config with the same registration: `load_asymlora_adapter`,
which `model.load.load_for_inference` calls for a run whose adapter holds expert factors (this module registers
that run format with model/load.py when imported).  PEFT alone (without that registration) cannot rebuild the
mixture: it would load attention's LoRA and the projector, warn about the missing `mlp.*.lora_B` and silently
drop the MLP experts.  So the saved adapter_config.json is a LoRA config whose task_type is `PLAIN_PEFT_MARKER`
(`AsymLoraConfig.to_dict`) instead of CAUSAL_LM: PEFT refuses that value (`PeftConfig.from_pretrained` and
`PeftModel.from_pretrained` raise "Invalid task type: 'LLAVA_SCULPT_ASYMLORA ...'"), while our loader reads it
back as CAUSAL_LM.  Resuming is unaffected: the Trainer loads a checkpoint's weights into the adapter the run
already built, without reading its config.  Runs saved before the marker (task_type CAUSAL_LM) still load here.

Initialisation: --init_lora_weights default or gaussian only (methods/lora_init.py, METHOD_INITS): pissa /
olora / corda change the base and need a conversion of every save, eva a pass over the data; none of these
knows the expert layers.

Gradient accumulation: the trainer calls `extra_loss` after each micro-batch's forward and adds it divided by
the accumulation steps (train.py).  For this loss that is what we want: it is computed from the router
probabilities of that micro-batch's forward (captured by the layers, with the batch's attention_mask captured
by a forward pre-hook), so each optimizer step receives the mean over its micro-batches of the per-micro-batch
batch-mean balance loss -- the batch mean of the step for equal micro-batches, and what AsymLoRA / HydraLoRA
get on the HF Trainer (aux loss added to each forward's loss, then divided by the accumulation steps).  Under
DDP each rank's loss comes from its own samples and DDP averages the gradients: the mean over the global batch.
With --gradient_checkpointing the probabilities must carry gradients from the first forward (non-reentrant
checkpointing, transformers' default for use_reentrant=False); with reentrant checkpointing they do not and
training stops with an error rather than dropping the balance loss silently.

Not mergeable: the update depends on the input through p(h), so there is no single W to fold it into;
`llava-sculpt merge` refuses such runs and `merge()` of the layer raises.
"""
from __future__ import annotations

import json
import os
import re
import weakref
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear

from llava_sculpt.errors import UserError
from llava_sculpt.methods import lora_init
from llava_sculpt.methods.base import FineTuningMethod, RunContext
from llava_sculpt.methods.lora import PROJECTOR_MODULE, make_lora_config
from llava_sculpt.model.load import ADAPTER_CONFIG, RUN_MARKER_PREFIX, RunFormat, register_run_format

EXPERTS_KEY = "lora_experts_B"
ROUTER_KEY = "lora_router"
ROUTER_OWNER = "gate_proj"
_MLP_RE = re.compile(r"^(?P<mlp>(?:.*\.)?language_model\..*\.mlp)\.(?P<proj>gate_proj|up_proj|down_proj)$")
NOT_MERGEABLE = ("an AsymLoRA adapter cannot be merged into the weights: its MLP update sum_e p_e(h) B_e A x "
                 "depends on each token's router probabilities p(h), so no single W = W0 + delta reproduces it; "
                 "use the run directory itself (--model-path RUN_DIR with generate / eval), which loads base + adapter")

# adapter_config.json's task_type: not one of PEFT's task types, so plain PEFT refuses the config (the message
# PEFT prints quotes it); `read_asymlora_config` maps it back to the CAUSAL_LM the adapter was trained with
PLAIN_PEFT_MARKER = (f"{RUN_MARKER_PREFIX}ASYMLORA -- not a plain PEFT adapter: PEFT alone would drop its routed "
                     "MLP experts; load it with llava_sculpt.model.load.load_for_inference (llava-sculpt generate / "
                     "eval, which import llava_sculpt.methods)")
TASK_TYPE = "CAUSAL_LM"


class AsymLoraConfig(LoraConfig):
    """The LoraConfig of an AsymLoRA adapter; saved with task_type PLAIN_PEFT_MARKER (see the module docstring).
    In memory the task type stays CAUSAL_LM."""

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["task_type"] = PLAIN_PEFT_MARKER
        return out


def read_asymlora_config(run_dir: str) -> AsymLoraConfig:
    """run_dir's adapter_config.json as an AsymLoraConfig (the marker, or an older run's CAUSAL_LM, as CAUSAL_LM;
    keys this PEFT version does not know are left out, as PEFT does for configs of newer versions)."""
    path = os.path.join(run_dir, ADAPTER_CONFIG)
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot read the adapter config ({err})") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path}: expected a JSON object")
    if saved.get("task_type") not in (PLAIN_PEFT_MARKER, TASK_TYPE):
        raise UserError(f"{path}: task_type {saved.get('task_type')!r} is not an AsymLoRA adapter's")
    known = {f.name for f in fields(AsymLoraConfig) if f.init}
    return AsymLoraConfig(**{k: v for k, v in saved.items() if k in known and k != "task_type"}, task_type=TASK_TYPE)


@dataclass
class AsymLoRAFlags:
    asym_experts: int = field(default=3, metadata={"help": "--method asymlora: number E of B factors (experts) "
                              "sharing one A in every MLP projection (AsymLoRA: 3)"})
    asym_balance: float = field(default=0.05, metadata={"help": "--method asymlora: weight of the router's "
                                "load-balancing loss (AsymLoRA: 0.05)"})


class RouterState:
    """What the three MLP layers of one decoder layer share: the router's owner (the gate_proj layer) and
    the probabilities of the latest MLP input, per adapter.  A plain object (not a module), so the router is
    registered, and saved, once."""

    def __init__(self):
        self.owner: AsymLoraLinear | None = None
        self._input: weakref.ref | None = None
        self.probs: dict[str, torch.Tensor] = {}

    def route(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """softmax(R x + b) for the MLP input x, computed once per input tensor and adapter."""
        if self._input is None or self._input() is not x:
            self._input, self.probs = weakref.ref(x), {}
        if adapter not in self.probs:
            if self.owner is None or adapter not in self.owner.lora_router:
                raise RuntimeError("AsymLoRA: this decoder layer's MLP has no router (gate_proj not adapted?)")
            router = self.owner.lora_router[adapter]
            logits = router(x.to(router.weight.dtype))
            self.probs[adapter] = torch.softmax(logits, dim=-1,
                                                dtype=torch.promote_types(logits.dtype, torch.float32))
        return self.probs[adapter]

    def latest(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        """The probabilities of the MLP input this layer's gate/up just saw (for down_proj)."""
        probs = self.probs.get(adapter)
        if probs is None or probs.shape[:-1] != x.shape[:-1]:
            raise RuntimeError("AsymLoRA: down_proj ran without the router probabilities of its MLP input "
                               "(gate_proj/up_proj must run first, as in the Llama MLP)")
        return probs

    def clear(self) -> None:
        self._input, self.probs = None, {}


class ExpertFactors(nn.Module):
    """The E factors B_e [out, r] of one layer (parameters "0" .. "E-1", zero-initialised) and their routed
    mixture.  Called as a module, so DeepSpeed ZeRO-3 gathers its parameters for the forward."""

    def __init__(self, num_experts: int, out_features: int, r: int, dtype=None, device=None):
        super().__init__()
        for e in range(num_experts):
            self.register_parameter(str(e), nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device)))

    def __len__(self) -> int:
        return len(self._parameters)

    def __getitem__(self, e: int) -> nn.Parameter:
        return self._parameters[str(e)]

    def __iter__(self):
        return iter(self._parameters[str(e)] for e in range(len(self)))

    def forward(self, h: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """sum_e probs[..., e] * (h @ B_e^T)"""
        mixed = None
        for e, b in enumerate(self):
            term = probs[..., e:e + 1] * F.linear(h, b)
            mixed = term if mixed is None else mixed + term
        return mixed


class AsymLoraLinear(LoraLinear):
    """PEFT LoRA layer of one MLP projection: shared `lora_A`, E zero-initialised `lora_experts_B`, and, on
    gate_proj, the decoder layer's `lora_router`.  PEFT's own `lora_B` is not created."""

    adapter_layer_names = LoraLinear.adapter_layer_names + (EXPERTS_KEY, ROUTER_KEY)

    def __init__(self, base_layer, adapter_name: str, config, *, proj: str, num_experts: int,
                 router_state: RouterState, **kwargs):
        object.__setattr__(self, "proj", proj)
        object.__setattr__(self, "num_experts", int(num_experts))
        object.__setattr__(self, "router_state", router_state)  # plain object, never a submodule
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        if not hasattr(self, EXPERTS_KEY):
            self.lora_experts_B = nn.ModuleDict({})
            self.lora_router = nn.ModuleDict({})
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        if adapter_name in self.lora_variant:
            raise UserError("--method asymlora: LoRA variants (DoRA, ...) are not supported in the MLP mixture")
        del self.lora_B[adapter_name]  # replaced by the E expert factors
        weight = self.lora_A[adapter_name].weight
        self.lora_experts_B[adapter_name] = ExpertFactors(self.num_experts, self.out_features, r,
                                                          dtype=weight.dtype, device=weight.device)
        if self.proj == ROUTER_OWNER:
            self.lora_router[adapter_name] = nn.Linear(self.in_features, self.num_experts, bias=True,
                                                       dtype=weight.dtype, device=weight.device)
            self.router_state.owner = self
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError(NOT_MERGEABLE)

    def get_delta_weight(self, adapter) -> torch.Tensor:
        raise ValueError(NOT_MERGEABLE)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("AsymLoRA layers do not support mixed-adapter batches (adapter_names)")
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        result_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            probs = (self.router_state.latest(x, adapter) if self.proj == "down_proj"
                     else self.router_state.route(x, adapter))
            lora_a = self.lora_A[adapter]
            h = lora_a(self.lora_dropout[adapter](self._cast_input_dtype(x, lora_a.weight.dtype)))
            result = result + self.lora_experts_B[adapter](h, probs.to(h.dtype)) * self.scaling[adapter]
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "asymlora." + super().__repr__()


def _layer_factory(num_experts: int):
    """PEFT custom-module entry for nn.Linear: an AsymLoraLinear for the language model's MLP projections,
    None (PEFT's plain LoRA layer) for every other targeted linear."""
    states: dict[str, RouterState] = {}

    def factory(target, adapter_name, config, target_name: str = "", **kwargs):
        match = _MLP_RE.match(target_name or "")
        if match is None:
            return None
        state = states.setdefault(match["mlp"], RouterState())
        return AsymLoraLinear(target, adapter_name, config, proj=match["proj"], num_experts=num_experts,
                              router_state=state, target_name=target_name, **kwargs)

    return factory


def register_asymlora(config, num_experts: int):
    """Register the AsymLoRA MLP layers on a PEFT LoraConfig (in place; returned for chaining)."""
    if num_experts < 1:
        raise UserError(f"--asym_experts must be >= 1, got {num_experts}")
    config._register_custom_module({nn.Linear: _layer_factory(num_experts)})
    return config


def asym_layers(model) -> list[AsymLoraLinear]:
    return [m for m in model.modules() if isinstance(m, AsymLoraLinear)]


def router_states(model) -> list[RouterState]:
    """One per decoder layer, in layer order."""
    return [m.router_state for m in asym_layers(model) if m.proj == ROUTER_OWNER]


def _check_injected(model) -> None:
    layers = asym_layers(model)
    owners = [m for m in layers if m.proj == ROUTER_OWNER]
    if not owners or len(layers) != 3 * len(owners) or any(m.router_state.owner is None for m in layers):
        raise UserError("--method asymlora needs Llama-style MLPs (gate_proj, up_proj, down_proj) in every decoder "
                        f"layer of the language model; found {len(layers)} MLP projections, {len(owners)} gate_proj")


def saved_experts(run_dir: str) -> int | None:
    """E when `run_dir` holds an AsymLoRA adapter (expert factors in adapter_model.safetensors), else None."""
    path = os.path.join(run_dir, "adapter_model.safetensors")
    if not os.path.isfile(path):
        return None
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        experts = {int(k.rsplit(".", 1)[1]) for k in f.keys() if f".{EXPERTS_KEY}." in k}
    return max(experts) + 1 if experts else None


def load_asymlora_adapter(model, run_dir: str, is_trainable: bool = False):
    """PeftModel.from_pretrained with the AsymLoRA layers registered: base + adapter + router restored."""
    from peft import PeftModel

    num_experts = saved_experts(run_dir)
    if num_experts is None:
        raise UserError(f"{run_dir}: no AsymLoRA expert factors in adapter_model.safetensors")
    try:
        with open(os.path.join(run_dir, "run_args.json")) as f:
            recorded = json.load(f).get("method_flags", {}).get("asym_experts")
    except (OSError, json.JSONDecodeError, AttributeError):
        recorded = None
    if recorded is not None and int(recorded) != num_experts:
        raise UserError(f"{run_dir}: run_args.json records --asym_experts {recorded} but the adapter holds "
                        f"{num_experts} expert factors per layer")
    config = register_asymlora(read_asymlora_config(run_dir), num_experts)
    peft_model = PeftModel.from_pretrained(model, run_dir, config=config, is_trainable=is_trainable)
    _check_injected(peft_model)
    return peft_model


def is_asymlora_run(run_dir: str) -> bool:
    """The adapter in run_dir is AsymLoRA's: marked so in adapter_config.json, or (runs saved before the marker)
    holding expert factors."""
    try:
        with open(os.path.join(run_dir, ADAPTER_CONFIG)) as f:
            if json.load(f).get("task_type") == PLAIN_PEFT_MARKER:
                return True
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
    return saved_experts(run_dir) is not None


RUN_FORMAT = register_run_format(RunFormat("asymlora", detect=is_asymlora_run, load=load_asymlora_adapter,
                                           not_mergeable=NOT_MERGEABLE))


def balance_loss(probs: list[torch.Tensor], attention_mask: torch.Tensor | None) -> torch.Tensor:
    """mean_b sum_e mean_{l,t}(p) * mean_{l,t}(onehot(argmax p)) over layers l and valid tokens t of sample b.

    probs: one [B, T, E] tensor per decoder layer; attention_mask: [B, T] (1 = valid) or None (all valid)."""
    p = torch.stack(probs, dim=1)  # [B, L, T, E]
    batch, n_layers, tokens, n_experts = p.shape
    valid = (torch.ones(batch, tokens, device=p.device) if attention_mask is None
             else attention_mask.to(p.device)).to(p.dtype)
    if valid.shape != (batch, tokens):
        raise RuntimeError(f"AsymLoRA: attention_mask {tuple(valid.shape)} does not match the router "
                           f"probabilities {tuple(p.shape)}")
    weight = valid[:, None, :, None]
    count = (valid.sum(-1) * n_layers).clamp(min=1)[:, None]  # [B, 1]
    mean_p = (p * weight).sum((1, 2)) / count
    chosen = F.one_hot(p.detach().argmax(-1), n_experts).to(p.dtype)
    mean_chosen = (chosen * weight).sum((1, 2)) / count
    return (mean_p * mean_chosen).sum(-1).mean()


class AsymLoRAMethod(FineTuningMethod):
    name = "asymlora"
    flags_class = AsymLoRAFlags

    def __init__(self, flags=None):
        super().__init__(flags if flags is not None else AsymLoRAFlags())
        self._mask: torch.Tensor | None = None
        self._states: list[RouterState] = []
        self._balance_sum, self._balance_count = 0.0, 0

    def inject(self, model, run: RunContext):
        from peft import get_peft_model

        lora_init.check_method_init(run.training_args, self.name)  # default / gaussian only (train.py checks first)
        overrides = {}
        if not getattr(run.training_args, "freeze_mm_mlp_adapter", False):
            overrides["modules_to_save"] = [PROJECTOR_MODULE]
        config = register_asymlora(make_lora_config(run.training_args, model, config_class=AsymLoraConfig,
                                                    **overrides), self.flags.asym_experts)
        peft_model = get_peft_model(model, config)
        _check_injected(peft_model)
        self._states = router_states(peft_model)
        # the batch's attention_mask, for the balance loss over valid tokens (the layers only see hidden states)
        peft_model.get_base_model().register_forward_pre_hook(self._capture_mask, with_kwargs=True)
        return peft_model

    def _capture_mask(self, module, args, kwargs):
        self._mask = kwargs.get("attention_mask")

    def extra_loss(self, model) -> torch.Tensor | None:
        probs = [s.probs.get("default") for s in self._states]
        if not probs or any(p is None for p in probs):
            return None
        if not any(p.requires_grad for p in probs):
            raise UserError("--method asymlora: the router probabilities carry no gradient (reentrant gradient "
                            "checkpointing?); pass --gradient_checkpointing_kwargs '{\"use_reentrant\": false}'")
        mask = self._mask if isinstance(self._mask, torch.Tensor) and self._mask.dim() == 2 else None
        value = balance_loss(probs, mask)
        for state in self._states:
            state.clear()
        self._balance_sum += float(value.detach())
        self._balance_count += 1
        return self.flags.asym_balance * value

    def logs(self) -> dict[str, float]:
        if not self._balance_count:
            return {}
        out = {"asymlora_balance": self._balance_sum / self._balance_count}
        self._balance_sum, self._balance_count = 0.0, 0
        return out
