"""Pure metric functions of the evaluation harness (no file I/O; REFERENCE.md section 4).

* `vqa_accuracy`      OK-VQA, official GT-Vision-Lab VQA accuracy (or the LoRASculpt release's LAVIS port,
                      `paper`: full normalisation of the prediction always, punctuation-only on the ground truth).
* `textvqa_accuracy`  TextVQA, the m4c soft accuracy LLaVA reports (normalisation always on both sides).
* `gqa_match`, `gqa_accuracy`  GQA testdev-balanced: LLaVA's `text.rstrip('.').lower()` then GQA eval.py's
                      exact match, counted over `isBalanced` questions only.
* `exact_match`       IconQA / OCR-VQA exact match (`official` or the release's raw lower-case equality).
* `cider_scores`, `caption_scores`  COCO CIDEr-D (+ BLEU-4, METEOR, ROUGE-L) through pycocoevalcap on
  PTB-tokenised text.  These two start Java sub-processes (PTB tokenizer, METEOR) but read/write no files
  of ours.  SPICE is never used (it downloads Stanford CoreNLP).

Soft VQA accuracy (Antol et al. 2015, "VQA", Sec. 3; official vqaEval.py behaviour): with n human answers
g_1..g_n (n = 10),

    acc(p) = 1/n * sum_i min(1, #{j != i : g_j == p} / 3)

i.e. leave each human answer out in turn, score min(1, matches/3) against the other n-1, average.  With
k of 10 answers matching: k=1 -> 0.3, k=2 -> 0.6, k=3 -> 0.9, k>=4 -> 1.0.

All accuracies here are on a 0-1 scale; the score command reports x100.
"""
from __future__ import annotations

import contextlib
import io
import re
from typing import Iterable, Literal, Mapping, Sequence

Compat = Literal["official", "paper"]

# --------------------------------------------------------------------------------------------------
# VQA answer normalisation, written from the behaviour of the official evaluation (vqaEval.py):
#   1. punctuation: each mark below is deleted if it touches a space somewhere in the answer, or if the
#      answer contains a digit-comma-digit group anywhere ("1,000"); otherwise it is replaced by a space.
#      The apostrophe, colon and period are not in the list.
#   2. periods: a "." that is not followed by a digit is deleted (".5", "3.5" keep theirs).
#   3. lower-case, split on whitespace; number words none/zero..ten -> digits; articles a/an/the dropped;
#      each word looked up in the contraction table ("dont" -> "don't"); words re-joined by one space.
# --------------------------------------------------------------------------------------------------
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                   "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
VQA_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
VQA_ARTICLES = frozenset({"a", "an", "the"})

# The official contraction table, as `written -> canonical` pairs.  Its quirks are kept on purpose
# because they change scores: keys with capitals ("Im", "Ive", "Id've") can never match (words are
# lower-cased first), and "somebody'd" maps to "somebodyd".
_CONTRACTION_PAIRS = """
aint ain't | arent aren't | cant can't | couldve could've | couldnt couldn't | couldn'tve couldn't've
couldnt've couldn't've | didnt didn't | doesnt doesn't | dont don't | hadnt hadn't | hadnt've hadn't've
hadn'tve hadn't've | hasnt hasn't | havent haven't | hed he'd | hed've he'd've | he'dve he'd've | hes he's
howd how'd | howll how'll | hows how's | Id've I'd've | I'dve I'd've | Im I'm | Ive I've | isnt isn't
itd it'd | itd've it'd've | it'dve it'd've | itll it'll | let's let's | maam ma'am | mightnt mightn't
mightnt've mightn't've | mightn'tve mightn't've | mightve might've | mustnt mustn't | mustve must've
neednt needn't | notve not've | oclock o'clock | oughtnt oughtn't | ow's'at 'ow's'at | 'ows'at 'ow's'at
'ow'sat 'ow's'at | shant shan't | shed've she'd've | she'dve she'd've | she's she's | shouldve should've
shouldnt shouldn't | shouldnt've shouldn't've | shouldn'tve shouldn't've | somebody'd somebodyd
somebodyd've somebody'd've | somebody'dve somebody'd've | somebodyll somebody'll | somebodys somebody's
someoned someone'd | someoned've someone'd've | someone'dve someone'd've | someonell someone'll
someones someone's | somethingd something'd | somethingd've something'd've | something'dve something'd've
somethingll something'll | thats that's | thered there'd | thered've there'd've | there'dve there'd've
therere there're | theres there's | theyd they'd | theyd've they'd've | they'dve they'd've | theyll they'll
theyre they're | theyve they've | twas 'twas | wasnt wasn't | wed've we'd've | we'dve we'd've | weve we've
werent weren't | whatll what'll | whatre what're | whats what's | whatve what've | whens when's
whered where'd | wheres where's | whereve where've | whod who'd | whod've who'd've | who'dve who'd've
wholl who'll | whos who's | whove who've | whyll why'll | whyre why're | whys why's | wont won't
wouldve would've | wouldnt wouldn't | wouldnt've wouldn't've | wouldn'tve wouldn't've | yall y'all
yall'll y'all'll | y'allll y'all'll | yall'd've y'all'd've | y'alld've y'all'd've | y'all'dve y'all'd've
youd you'd | youd've you'd've | you'dve you'd've | youll you'll | youre you're | youve you've
"""
VQA_CONTRACTIONS: dict[str, str] = dict(
    pair.split() for pair in _CONTRACTION_PAIRS.replace("\n", " | ").split("|") if pair.strip())


def clean_whitespace(text: str) -> str:
    """Newlines and tabs -> spaces, surrounding whitespace removed (applied to every answer first)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
    """Steps 1-2 of the VQA normalisation (see the module comment).  Case is untouched."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in VQA_PUNCTUATION:
        # the decision looks at the ORIGINAL text, as the official evaluator does
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def process_digit_article(text: str) -> str:
    """Step 3: lower-case, number words -> digits, drop articles, contraction table, single spaces."""
    words = [VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in VQA_ARTICLES]
    return " ".join(VQA_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """Full official VQA normalisation of one answer: whitespace, punctuation, digits/articles/contractions."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


def normalize_m4c_answer(text: str) -> str:
    """TextVQA (m4c / EvalAI answer processor): lower-case, drop "," and "?", split "'s" off the word,
    then the full VQA normalisation."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    return normalize_vqa_answer(text)


def soft_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Leave-one-out soft accuracy, 1/n sum_i min(1, #{j != i: g_j == p} / 3), on already-normalised
    strings.  n = len(gt_answers) (10 in VQA/OK-VQA/TextVQA)."""
    if not gt_answers:
        raise ValueError("soft_accuracy needs at least one ground-truth answer")
    matches = sum(1 for g in gt_answers if g == prediction)
    total = 0.0
    for g in gt_answers:
        others_matching = matches - (1 if g == prediction else 0)
        total += min(1.0, others_matching / 3.0)
    return total / len(gt_answers)


def vqa_accuracy(prediction: str, gt_answers: Sequence[str], normalize_mode: Compat = "official") -> float:
    """OK-VQA accuracy of one prediction, 0-1: `soft_accuracy` after the mode's normalisation.

    official (GT-Vision-Lab vqaEval.py): see `_official_vqa_sides`.
    paper (the LoRASculpt release's LAVIS port, its llava/eval/vqa_eval.py): see `_paper_vqa_sides`.
    REFERENCE.md section 4 states both rules.
    """
    if normalize_mode == "official":
        pred, gts = _official_vqa_sides(prediction, gt_answers)
    elif normalize_mode == "paper":
        pred, gts = _paper_vqa_sides(prediction, gt_answers)
    else:
        raise ValueError(f"normalize_mode must be 'official' or 'paper', not {normalize_mode!r}")
    return soft_accuracy(pred, gts)


def _official_vqa_sides(prediction: str, gt_answers: Sequence[str]) -> tuple[str, list[str]]:
    """Official rule: newline/tab/surrounding-whitespace clean-up on both sides; then the full normalisation
    (`normalize_vqa_answer`) of prediction AND ground truth only when the cleaned ground-truth answers are
    not all identical (so "Dog" vs 10 x "dog" scores 0: nothing is lower-cased then)."""
    pred = clean_whitespace(prediction)
    gts = [clean_whitespace(g) for g in gt_answers]
    if len(set(gts)) > 1:
        return normalize_vqa_answer(pred), [normalize_vqa_answer(g) for g in gts]
    return pred, gts


def _paper_vqa_sides(prediction: str, gt_answers: Sequence[str]) -> tuple[str, list[str]]:
    """The release's port treats the two sides differently (REFERENCE.md section 4):
    prediction: ALWAYS the full official normalisation (newline/tab -> space, strip, punctuation step,
      lower-case + number words + articles + contractions), whatever the ground truth looks like;
    ground truth: ONLY the punctuation step, and only when the raw answers are not all identical; never
      stripped, never lower-cased, no number/article/contraction mapping.
    So "Dog" vs 10 x "dog" scores 1, "the dog" never matches a ground-truth "the dog", "Paris" never matches
    a ground-truth "Paris", and a ground-truth " dog" never matches."""
    pred = normalize_vqa_answer(prediction)
    gts = list(gt_answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(g) for g in gts]
    return pred, gts


def textvqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """TextVQA soft accuracy (LLaVA's m4c evaluator), 0-1: `normalize_m4c_answer` always applied to the
    prediction and to every ground-truth answer, then the leave-one-out soft score."""
    return soft_accuracy(normalize_m4c_answer(prediction),
                         [normalize_m4c_answer(g) for g in gt_answers])


def gqa_prediction(text: str) -> str:
    """LLaVA's GQA conversion (scripts/convert_gqa_for_eval.py): `text.rstrip('.').lower()`.  Every trailing
    period goes, whitespace is NOT stripped (LLaVA's runner already stripped the generated text)."""
    return text.rstrip(".").lower()


def gqa_match(prediction: str, answer: str) -> bool:
    """GQA's official eval.py per-question rule, `prediction == answer`, on the converted prediction
    (`gqa_prediction`); the annotation's `answer` is used as it is."""
    return gqa_prediction(prediction) == answer


def gqa_accuracy(items: Iterable[tuple[str, str, bool]]) -> tuple[float, int, int]:
    """GQA accuracy, 0-1, over (prediction, answer, is_balanced) triples, as GQA's official eval.py computes
    its "accuracy": only questions whose `isBalanced` is true count; the others are ignored entirely (in
    neither numerator nor denominator).  Returns (accuracy, number counted, number skipped as unbalanced)."""
    correct = counted = skipped = 0
    for prediction, answer, balanced in items:
        if not balanced:
            skipped += 1
            continue
        counted += 1
        correct += gqa_match(prediction, answer)
    if counted == 0:
        raise ValueError(f"gqa_accuracy: no balanced question to score ({skipped} unbalanced skipped)")
    return correct / counted, counted, skipped


def _strip_answer(text: str) -> str:
    text = text.strip()
    if text.endswith("."):
        text = text[:-1]
    return text.strip().lower()


def exact_match(prediction: str, answer: str, compat: Compat = "official") -> bool:
    """IconQA / OCR-VQA exact match.

    official: case-insensitive, surrounding whitespace and one trailing period removed on both sides.
    paper: the LoRASculpt release's raw `prediction.lower() == answer.lower()` (a trailing "." is wrong).
    """
    if compat == "official":
        return _strip_answer(prediction) == _strip_answer(answer)
    if compat == "paper":
        return prediction.lower() == answer.lower()
    raise ValueError(f"compat must be 'official' or 'paper', not {compat!r}")


# --------------------------------------------------------------------------------------------------
# Captions (COCO): pycocoevalcap on PTB-tokenised text.
# --------------------------------------------------------------------------------------------------
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x85\u2028\u2029]")


def ptb_tokenize(captions: Mapping[object, Iterable[str]]) -> dict[object, list[str]]:
    """PTB-tokenise `{id: [caption, ...]}` with pycocoevalcap's PTBTokenizer (Stanford, needs `java`):
    lower-cased, punctuation tokens removed.  Line-break characters are turned into spaces first so one
    caption stays one line for the tokenizer."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    payload = {key: [{"caption": _LINE_BREAKS.sub(" ", c)} for c in caps] for key, caps in captions.items()}
    with contextlib.redirect_stdout(io.StringIO()):
        tokenized = PTBTokenizer().tokenize(payload)
    # PTBTokenizer drops ids whose caption list is empty; keep every id
    return {key: tokenized.get(key, []) for key in captions}


def cider_scores(gts: Mapping[object, Sequence[str]], res: Mapping[object, Sequence[str]],
                 tokenize: bool = True) -> tuple[float, list[float]]:
    """CIDEr-D (Vedantam et al. 2015, Eq. 4-5 with the Gaussian length penalty sigma=6 and clipping) from
    pycocoevalcap's `Cider`.  gts: {id: [reference, ...]}, res: {id: [candidate]} over the same ids.
    Returns (corpus score, per-id scores in `gts` key order), on the 0-~10 scale (x100 for reports)."""
    from pycocoevalcap.cider.cider import Cider

    gts_t, res_t = _prepare_captions(gts, res, tokenize)
    score, per_id = Cider().compute_score(gts_t, res_t)
    return float(score), [float(s) for s in per_id]


def caption_scores(gts: Mapping[object, Sequence[str]], res: Mapping[object, Sequence[str]],
                   tokenize: bool = True, extra: bool = True) -> dict[str, float]:
    """{"cider", "bleu4", "meteor", "rouge_l"} (0-1 scale) from pycocoevalcap on PTB-tokenised text.
    extra=False computes CIDEr-D only (METEOR starts a 2 GB Java process)."""
    from pycocoevalcap.cider.cider import Cider

    gts_t, res_t = _prepare_captions(gts, res, tokenize)
    out = {"cider": float(Cider().compute_score(gts_t, res_t)[0])}
    if extra:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge

        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its statistics
            bleu, _ = Bleu(4).compute_score(gts_t, res_t, verbose=0)
        out["bleu4"] = float(bleu[3])
        meteor = Meteor()
        try:
            out["meteor"] = float(meteor.compute_score(gts_t, res_t)[0])
        finally:
            del meteor  # its __del__ stops the Java process
        out["rouge_l"] = float(Rouge().compute_score(gts_t, res_t)[0])
    return out


def _prepare_captions(gts, res, tokenize: bool):
    if set(gts) != set(res):
        raise ValueError("gts and res must cover the same ids")
    for key, caps in res.items():
        if len(caps) != 1:
            raise ValueError(f"res[{key!r}] must hold exactly one caption, got {len(caps)}")
    for key, caps in gts.items():
        if len(caps) == 0:
            raise ValueError(f"gts[{key!r}] has no reference caption")
    if tokenize:
        return ptb_tokenize(gts), ptb_tokenize(res)
    return {k: list(v) for k, v in gts.items()}, {k: list(v) for k, v in res.items()}
