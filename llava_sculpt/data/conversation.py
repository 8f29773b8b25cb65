"""Conversation templates and tokenisation with LLaVA-1.5's label masking.

`vicuna_v1` (LLaVA-1.5's fine-tuning template):

    "<system> USER: <q1> ASSISTANT: <a1></s>USER: <q2> ASSISTANT: <a2></s>"

The system line and the user turns are separated by a space; each assistant turn ends with `</s>` and the
next `USER:` follows it directly.  Only the assistant answers, including their `</s>`, carry labels; every
other token (BOS, system line, `USER: ...`, `ASSISTANT:` and the image tokens) is IGNORE_INDEX.

`</s>` is Vicuna's (Llama's) eos token.  When tokenising for a tokenizer, the end of an assistant turn is
written as *that tokenizer's* eos token (`end_of_turn`), so the labels teach the model to emit the token that
generation stops at: identical for LLaVA-1.5 (eos `</s>`), and e.g. `<|im_end|>` for a LLaVA built on a
SmolLM2 language model, which would otherwise learn to spell out the characters "</s>" and never stop.

The tokenizer sees the whole prompt as one string (exactly what it sees at inference), and the labelled
tokens are found from character offsets: a token is labelled when its span overlaps an answer's span.
The `<image>` placeholder is one special token, expanded afterwards to `num_image_tokens` copies, the
number of visual features the model inserts (what HF's LlavaProcessor does at inference).

`plain` (LLaVA's pretraining template, `--version plain`, used with `--tune_mm_mlp_adapter True`): a sample is
one image and one caption; the human turn is replaced by the image alone and the text is

    "<image>" + caption + "\n"

tokenised as LLaVA's `preprocess_plain` does: BOS (when the tokenizer adds one), the image token, then the
caption and its "\n" tokenised on their own (no special tokens), so that the caption's first word is tokenised
as at the start of a text.  Only the caption and its "\n" carry labels; BOS and the image tokens are
IGNORE_INDEX.  No eos token is added (LLaVA's stage 1 has none).
"""
from __future__ import annotations

from dataclasses import dataclass

from llava_sculpt.errors import UserError

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class ConversationTemplate:
    name: str
    system: str
    roles: tuple[str, str]  # (user, assistant)
    sep: str  # after the system line and after each user turn
    sep2: str  # after each assistant turn; replaced by the tokenizer's eos token (see `end_of_turn`)
    style: str = "two"  # "two": vicuna_v1's turns; "plain": LLaVA's pretraining template (`tokenize_plain`)


VICUNA_V1 = ConversationTemplate(
    name="vicuna_v1",
    system=("A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."),
    roles=("USER", "ASSISTANT"),
    sep=" ",
    sep2="</s>",
)
# LLaVA's conv_llava_plain: no system line, no roles, "\n" after the caption
PLAIN = ConversationTemplate(name="plain", system="", roles=("", ""), sep="\n", sep2="\n", style="plain")
# LLaVA's `--version v1` selects the same template.
TEMPLATES = {"vicuna_v1": VICUNA_V1, "v1": VICUNA_V1, "llava_v1": VICUNA_V1, "plain": PLAIN}


def get_template(name: str) -> ConversationTemplate:
    if name not in TEMPLATES:
        raise UserError(f"unknown conversation template --version/--conv-mode {name!r}; "
                        f"expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def end_of_turn(template: ConversationTemplate, tokenizer) -> str:
    """The text that ends an assistant turn for `tokenizer`: its eos token (`template.sep2` when it has none).

    Raises a UserError when the eos token written in text does not tokenise to the eos token id (it is not
    registered as a special/added token), since the model would then be trained on its characters."""
    if template.style == "plain":  # the caption ends with "\n", never with eos
        return template.sep2
    eos, eos_id = getattr(tokenizer, "eos_token", None), getattr(tokenizer, "eos_token_id", None)
    if not eos or eos_id is None:
        return template.sep2
    ids = tokenizer(eos, add_special_tokens=False)["input_ids"]
    if eos_id not in ids:
        raise UserError(f"the tokenizer's eos token {eos!r} (id {eos_id}) is not recognised as one token when "
                        f"written in text (it tokenises to {ids}); add it to the tokenizer as a special token "
                        "so that each assistant turn can end with it")
    return eos


def render(template: ConversationTemplate, turns: list[tuple[str, str | None]],
           eos: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render (user, assistant) turns into the prompt string.

    Each assistant answer ends with `eos` (default `template.sep2`, i.e. `</s>`; pass the tokenizer's eos
    token, see `end_of_turn`).  Returns (text, answer_spans): the character spans [start, end) of every
    assistant answer together with its end-of-turn, i.e. what is labelled.  An assistant text of None ends
    the prompt with "ASSISTANT:" (generation prompt)."""
    user_role, asst_role = template.roles
    sep2 = template.sep2 if eos is None else eos
    text = template.system + template.sep
    spans: list[tuple[int, int]] = []
    for user, answer in turns:
        text += f"{user_role}: {user}{template.sep}{asst_role}:"
        if answer is None:
            break
        text += " "
        start = len(text)
        text += answer + sep2
        spans.append((start, len(text)))
    return text, spans


def conversations_to_turns(conversations, where: str) -> list[tuple[str, str]]:
    """LLaVA JSON `conversations` -> [(user, assistant), ...], validating alternation."""
    if not isinstance(conversations, list) or not conversations:
        raise UserError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    turns, expected = [], ("human", "gpt")
    if conversations[0].get("from") not in ("human", "user"):
        conversations = conversations[1:]  # LLaVA drops a leading non-human turn (e.g. a system message)
    if len(conversations) % 2:
        raise UserError(f"{where}: conversations must alternate human/gpt and end with a gpt turn; "
                        f"got {len(conversations)} turns")
    for i in range(0, len(conversations), 2):
        pair = conversations[i:i + 2]
        for j, (turn, role) in enumerate(zip(pair, expected)):
            got = turn.get("from") if isinstance(turn, dict) else None
            if got not in (role, {"human": "user", "gpt": "assistant"}[role]) or not isinstance(turn.get("value"), str):
                raise UserError(f"{where}: turn {i + j} should be a {{'from': '{role}', 'value': str}} "
                                f"(conversations must alternate human/gpt), got {turn!r:.120}")
        turns.append((pair[0]["value"], pair[1]["value"]))
    return turns


def tokenize_conversation(tokenizer, template: ConversationTemplate, turns: list[tuple[str, str]],
                          num_image_tokens: int, image_token_id: int, max_length: int,
                          where: str = "sample") -> dict:
    """Tokenise a conversation and build LLaVA-1.5 labels; each assistant turn ends with the tokenizer's eos
    token (`end_of_turn`), which is labelled.

    Returns {"input_ids": list[int], "labels": list[int]} with the single `<image>` token expanded to
    `num_image_tokens` copies and both truncated to `max_length` tokens."""
    text, spans = render(template, turns, end_of_turn(template, tokenizer))
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    input_ids, labels = [], []
    for tok_id, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        if tok_id == image_token_id:
            input_ids += [image_token_id] * num_image_tokens
            labels += [IGNORE_INDEX] * num_image_tokens
            continue
        in_answer = end > start and any(start < s_end and end > s_start for s_start, s_end in spans)
        input_ids.append(tok_id)
        labels.append(tok_id if in_answer else IGNORE_INDEX)
    return _truncate(input_ids, labels, max_length, image_token_id, num_image_tokens, where)


def _truncate(input_ids: list[int], labels: list[int], max_length: int, image_token_id: int,
              num_image_tokens: int, where: str) -> dict:
    if len(input_ids) > max_length:
        # Cutting through the block of image tokens would leave the model with more image features than
        # placeholders; LLaVA cuts embeddings after expansion, which HF's model cannot do.
        if image_token_id in input_ids[max_length - 1:max_length + 1] and image_token_id in input_ids[:max_length]:
            raise UserError(f"{where}: --model_max_length {max_length} cuts through the {num_image_tokens} "
                            "image tokens; raise --model_max_length")
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def tokenize_plain(tokenizer, caption: str, num_image_tokens: int, image_token_id: int, max_length: int,
                   where: str = "sample") -> dict:
    """LLaVA's `preprocess_plain` for one (image, caption) sample: [BOS] + image tokens + tokens of
    caption + "\n"; labels IGNORE_INDEX on BOS and the image tokens, the token ids on the rest.

    As LLaVA's `tokenizer_image_token`: the text after `<image>` is tokenised on its own with the tokenizer's
    special tokens, and the BOS it starts with is dropped (kept once, at the start, when the tokenizer adds
    one).  Returns {"input_ids", "labels"}, truncated to `max_length` like `tokenize_conversation`."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    empty = tokenizer("", add_special_tokens=True)["input_ids"]
    bos = [bos_id] if bos_id is not None and empty[:1] == [bos_id] else []
    text_ids = list(tokenizer(caption + PLAIN.sep, add_special_tokens=True)["input_ids"])[len(bos):]
    if image_token_id in text_ids:
        raise UserError(f"{where}: the caption contains the image token {IMAGE_PLACEHOLDER!r}")
    input_ids = bos + [image_token_id] * num_image_tokens + text_ids
    labels = [IGNORE_INDEX] * (len(bos) + num_image_tokens) + text_ids
    return _truncate(input_ids, labels, max_length, image_token_id, num_image_tokens, where)


def generation_prompt(template: ConversationTemplate, question: str) -> str:
    """Single-turn prompt ending in 'ASSISTANT:' for generation (LLaVA's eval prompt); with `plain`, LLaVA's
    plain prompt: the question followed by "\n"."""
    if template.style == "plain":
        return question + template.sep
    return render(template, [(question, None)])[0]
