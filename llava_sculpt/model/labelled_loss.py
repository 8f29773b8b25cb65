"""The causal-LM loss with the LM head applied only where the next token is labelled.

`model(**batch).loss` (transformers' ForCausalLMLoss) projects every position of every sample onto the
vocabulary, B x T x V logits, and then keeps the positions whose shifted label is not -100: the answers, often
a few tokens of a hundred.  Here the LM head sees only those positions:

    keep[b, t] = labels[b, t + 1] != -100         (t < T - 1; keep[b, T - 1] = False)
    targets    = labels[b, t + 1] at keep, row-major order            (N = keep.sum())
    logits     = lm_head(hidden[keep])            N x V instead of B x T x V
    loss       = sum_i CE(float(logits_i), targets_i) / D     D = num_items_in_batch when given, else N

which is the same loss and the same gradients (the positions dropped carry no loss).  At Vicuna-7B shapes the
fp32 logits alone are 2,048 x 32,000 x 4 B = 262 MB per 2,048-token sample, and the same again for their
gradient; the head's GEMMs shrink by T / (answer tokens).

How: `labelled_logits` puts a forward pre-hook on the model's output embedding module (`get_output_embeddings()`,
lm_head, or the PEFT module that wraps it) that replaces its input hidden [B, T, H] by hidden[keep] [N, H] for
one call.  The model is still called through its own forward, with its `labels` and `shift_labels=targets`, so
its own loss function (ForCausalLMLoss: fp32 upcast, ignore_index -100, mean, or sum / num_items_in_batch)
computes the loss from the N x V logits, and every wrapper stays in the loop: PEFT, DDP, DeepSpeed's engine
(ZeRO-3 gathers lm_head's weight by its own hooks on the same module), gradient checkpointing (lm_head is
outside the checkpointed layers), 4-bit bases (lm_head is never quantised).  `outputs.logits` is then N x V.
"""
from __future__ import annotations

import contextlib

import torch

from llava_sculpt.data.conversation import IGNORE_INDEX
from llava_sculpt.errors import UserError


def next_token_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [B, T] bool: positions whose next token is labelled, targets [N]: those next tokens)."""
    following = labels[:, 1:]
    labelled = following != ignore_index
    keep = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    keep[:, :-1] = labelled
    return keep, following[labelled]


@contextlib.contextmanager
def labelled_logits(head: torch.nn.Module, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """Inside the block, the next call of `head` on hidden states [B, T, H] computes the rows at `keep` only
    (N x V logits); yields the N targets, for the model's `shift_labels`.  The head must be called exactly once
    inside the block (one forward of the model)."""
    keep, targets = next_token_targets(labels, ignore_index)
    calls = []

    def select(module, args):
        calls.append(1)
        hidden = args[0] if args else None
        if len(calls) > 1 or not isinstance(hidden, torch.Tensor) or tuple(hidden.shape[:-1]) != tuple(keep.shape):
            raise RuntimeError(f"labelled_logits: call {len(calls)} of the output embedding module, on "
                               f"{getattr(hidden, 'shape', type(hidden))}; expected one call on hidden states "
                               f"{tuple(keep.shape)} x H")
        return (hidden[keep.to(hidden.device)], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield targets
    finally:
        handle.remove()
    if not calls:
        raise UserError(f"this model does not compute its logits through get_output_embeddings() "
                        f"({type(head).__name__}); train it with --full_logits True")


def labelled_loss(model, labels: torch.Tensor, **inputs) -> torch.Tensor:
    """`model(**inputs, labels=labels).loss` (mean over the labelled next tokens; `num_items_in_batch=D` in
    `inputs`: sum / D), with the LM head applied at the labelled positions only.  `model`: a Hugging Face
    causal LM (or a PEFT model around one) whose loss function is ForCausalLMLoss."""
    with labelled_logits(model.get_output_embeddings(), labels) as targets:
        return model(**inputs, labels=labels, shift_labels=targets).loss
