"""Metric functions against hand-computed cases (REFERENCE.md section 4)."""
import shutil

import pytest

from llava_sculpt.eval import metrics as m

# ------------------------------------------------------------------ VQA normalisation, rule by rule
@pytest.mark.parametrize("raw, expected", [
    # punctuation touching a space is deleted, elsewhere replaced by a space
    ("hello, world", "hello world"),          # ", " -> deleted
    ("red/blue", "red blue"),                 # "/" between letters -> space
    ("x - ray", "x ray"),                     # " -" -> deleted, spaces collapsed
    ("x-ray", "x ray"),
    ("(big) cat", "big cat"),
    ("yes!", "yes"),                          # "!" not next to a space -> space, then stripped by split
    ("what?!", "what"),
    # digit-comma-digit anywhere: every mark is deleted, not spaced
    ("1,000", "1000"),
    ("1,000 red/blue", "1000 redblue"),
    ("a,b", "b"),                             # no digit,digit: "," -> space; "a" is an article
    # periods: removed unless followed by a digit
    (".5", ".5"),
    ("3.5 kg", "3.5 kg"),
    ("dog.", "dog"),
    ("e.g. cats", "eg cats"),
    # apostrophes and colons are not punctuation for VQA
    ("10:30", "10:30"),
    ("dog's", "dog's"),
    # number words, none -> 0
    ("two", "2"), ("none", "0"), ("zero", "0"), ("ten", "10"), ("eleven", "eleven"), ("Three Dogs", "3 dogs"),
    # articles dropped, only as whole words
    ("the dog", "dog"), ("a cat", "cat"), ("an apple", "apple"), ("theater", "theater"),
    # contraction table, including its typo and its never-matching capitalised keys
    ("dont", "don't"), ("Cant Stop", "can't stop"), ("oclock", "o'clock"), ("somebody'd", "somebodyd"),
    ("im", "im"),
    # whitespace, tabs and newlines
    ("  Yes\n", "yes"), ("ice\tcream", "ice cream"), ("ice\ncream", "ice cream"), ("a   b", "b"),
])
def test_normalize_vqa_answer(raw, expected):
    assert m.normalize_vqa_answer(raw) == expected


def test_punctuation_decision_uses_the_whole_answer():
    # "-" touches a space somewhere, so every "-" is deleted (not replaced by a space)
    assert m.process_punctuation("x-ray - scan") == "xray  scan"
    assert m.process_punctuation("x-ray") == "x ray"


# ------------------------------------------------------------------ leave-one-out soft accuracy
@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_soft_accuracy_values(k, expected):
    # by hand: k matches of 10; leaving out a matching answer leaves k-1, a non-matching one leaves k:
    #   acc = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10
    #   k=1: 9/3/10 = 0.3; k=2: (2/3 + 16/3)/10 = 0.6; k=3: (2 + 7)/10 = 0.9; k=4: (4 + 6)/10 = 1.0
    gts = ["cat"] * k + ["dog"] * (10 - k)
    assert m.soft_accuracy("cat", gts) == pytest.approx(expected, abs=1e-12)
    assert m.vqa_accuracy("cat", gts) == pytest.approx(expected, abs=1e-12)
    assert m.textvqa_accuracy("cat", gts) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_identical_ground_truth_is_not_normalised():
    # all ten answers identical -> no normalisation on either side (official vqaEval behaviour)
    assert m.vqa_accuracy("Dog", ["dog"] * 10) == 0.0
    assert m.vqa_accuracy("dog", ["dog"] * 10) == 1.0
    assert m.vqa_accuracy(" dog\n", ["dog"] * 10) == 1.0          # whitespace is always cleaned
    assert m.vqa_accuracy("two", ["2"] * 10) == 0.0
    # one differing answer switches normalisation on for both sides
    assert m.vqa_accuracy("Dog", ["dog"] * 9 + ["cat"]) == 1.0
    assert m.vqa_accuracy("two", ["2"] * 9 + ["3"]) == 1.0
    assert m.vqa_accuracy("Dont", ["don't"] * 3 + ["no"] * 7) == pytest.approx(0.9)


def test_vqa_accuracy_normalises_ground_truth_too():
    # GT "Two" x2 + "2" x1 normalise to three "2": 0.9
    assert m.vqa_accuracy("2", ["Two", "two", "2"] + ["3"] * 7) == pytest.approx(0.9)
    assert m.vqa_accuracy("1000", ["1,000"] + ["5"] * 9) == pytest.approx(0.3)


def test_paper_compat_okvqa_the_dog():
    identical = ["the dog"] * 10
    varied = ["the dog"] * 9 + ["dogs"]
    # non-identical GT: official normalises both sides ("the dog" -> "dog"): 9 matches -> 1.0;
    # the release's port never drops articles from the GT: 0
    assert m.vqa_accuracy("dog", varied, normalize_mode="official") == 1.0
    assert m.vqa_accuracy("dog", varied, normalize_mode="paper") == 0.0
    # identical GT: the official rule applies no normalisation at all, so "dog" != "the dog" there too
    assert m.vqa_accuracy("dog", identical, normalize_mode="official") == 0.0
    assert m.vqa_accuracy("dog", identical, normalize_mode="paper") == 0.0
    assert m.vqa_accuracy("the dog", identical, normalize_mode="official") == 1.0


def test_paper_compat_okvqa_rejects_unknown_mode():
    with pytest.raises(ValueError):
        m.vqa_accuracy("a", ["a"], normalize_mode="strict")


# The LoRASculpt release's LAVIS port (REFERENCE.md section 4), by hand:
#   prediction P' = full normalisation ALWAYS (newline/tab -> space, strip, punctuation, lower-case,
#                   number words -> digits, articles dropped, contractions);
#   each GT g'    = punctuation step only, and only if the 10 RAW answers are not all identical; else raw g.
#                   Never stripped, never lower-cased, no number/article mapping.
#   score         = leave-one-out soft accuracy of P' against the g': k matches -> 0.3 k (k <= 3), 1.0 (k >= 4).
# Official (vqaEval.py): strip both sides; full normalisation of BOTH only if the stripped GT differ.
@pytest.mark.parametrize("pred, gts, official, paper", [
    # "Dog" vs 10 x "dog". paper: P' = "dog"; GT identical -> raw "dog"; k = 10 -> 1.0.
    #   official: identical GT -> nothing normalised, "Dog" != "dog" -> 0.
    ("Dog", ["dog"] * 10, 0.0, 1.0),
    # tabs/newlines/period on the prediction: P' = "The Dog." -> "The Dog" -> "dog"; k = 10 -> 1.0.
    #   official: "The\tDog.\n" cleaned to "The Dog." != "dog" -> 0.
    ("The\tDog.\n", ["dog"] * 10, 0.0, 1.0),
    # "two" vs mixed "2"/"3": P' = "2"; GT mixed -> punctuation leaves "2" x9, "3"; k = 9 -> 1.0.
    #   official: both normalised, "2" x9 -> 1.0.  (The old lower-case-only reading kept "two" -> 0.)
    ("two", ["2"] * 9 + ["3"], 1.0, 1.0),
    # "two" vs 10 x "2": P' = "2" (prediction normalised whatever the GT is); raw "2" x10 -> 1.0.
    #   official: identical GT -> "two" != "2" -> 0.
    ("two", ["2"] * 10, 0.0, 1.0),
    # number words in the GT are not mapped: P' = "2"; GT mixed -> "two" x2 stay, "2" x1; k = 1 -> 0.3.
    #   official: "two" x2 + "2" -> "2" x3; k = 3 -> 0.9.
    ("2", ["two"] * 2 + ["2"] + ["3"] * 7, 0.9, 0.3),
    # "the dog" vs "the dog" x3 + "dog" + "cat" x6: P' = "dog"; GT keeps "the dog" x3, "dog" x1; k = 1 -> 0.3.
    #   official: "the dog" -> "dog", so "dog" x4; k = 4 -> 1.0.  (Lower-case-only reading: k = 3 -> 0.9.)
    ("the dog", ["the dog"] * 3 + ["dog"] + ["cat"] * 6, 1.0, 0.3),
    # GT capitals are never lower-cased: P' = "paris"; GT mixed -> "Paris" x8 stay; k = 0 -> 0.
    #   official: "Paris" -> "paris" x8 -> 1.0.
    ("Paris", ["Paris"] * 8 + ["france"] * 2, 1.0, 0.0),
    # identical capitalised GT: P' = "paris" vs raw "Paris" x10 -> 0.  official: "Paris" == "Paris" -> 1.0.
    ("Paris", ["Paris"] * 10, 1.0, 0.0),
    # only the lower-case GT answers can match: P' = "paris"; "paris" x2 of "Paris" x5, "paris" x2,
    #   "france" x3; k = 2 -> 0.6.  official: "paris" x7 -> 1.0.
    ("PARIS", ["Paris"] * 5 + ["paris"] * 2 + ["france"] * 3, 1.0, 0.6),
    # GT whitespace is never stripped: raw "dog" x2, " dog" x8 differ -> punctuation leaves " dog" as is;
    #   P' = "dog"; k = 2 -> 0.6.  official: stripping first makes all ten "dog" -> identical, k = 10 -> 1.0.
    ("dog", ["dog"] * 2 + [" dog"] * 8, 1.0, 0.6),
    # identical GT "dog\n" x10: raw kept, "dog" != "dog\n" -> 0.  official: cleaned to "dog" -> 1.0.
    ("dog", ["dog\n"] * 10, 1.0, 0.0),
    # the punctuation step does apply to a mixed GT: "ice-cream" -> "ice cream" x3, "icecream" x7;
    #   P' = "ice cream"; k = 3 -> 0.9.  official: the same strings after normalisation -> 0.9.
    ("Ice-Cream", ["ice-cream"] * 3 + ["icecream"] * 7, 0.9, 0.9),
    # identical GT gets no punctuation step: P' = "ice cream" vs raw "ice-cream" x10 -> 0; official: 0.
    ("ice cream", ["ice-cream"] * 10, 0.0, 0.0),
    # identical GT, prediction normalised: "Ice-Cream" -> "ice cream" == raw "ice cream" x10 -> 1.0.
    #   official: "Ice-Cream" != "ice cream" -> 0.
    ("Ice-Cream", ["ice cream"] * 10, 0.0, 1.0),
    # "yes" vs "Yes" x10: P' = "yes" != raw "Yes" -> 0.  official: identical, "yes" != "Yes" -> 0.
    ("yes", ["Yes"] * 10, 0.0, 0.0),
])
def test_okvqa_official_and_paper_readings(pred, gts, official, paper):
    assert m.vqa_accuracy(pred, gts, normalize_mode="official") == pytest.approx(official, abs=1e-12)
    assert m.vqa_accuracy(pred, gts, normalize_mode="paper") == pytest.approx(paper, abs=1e-12)


# ------------------------------------------------------------------ TextVQA (m4c)
def test_textvqa_always_normalises():
    # identical GT is still normalised here (unlike official VQA)
    assert m.textvqa_accuracy("Dog", ["dog"] * 10) == 1.0
    assert m.textvqa_accuracy("The Nike.", ["nike"] + ["adidas"] * 9) == pytest.approx(0.3)
    assert m.textvqa_accuracy("coca cola", ["Coca-Cola"] * 3 + ["coca cola"] * 2 + ["x"] * 5) == 1.0
    # commas are dropped before the punctuation step, "'s" is split off
    assert m.normalize_m4c_answer("1,000") == "1000"
    assert m.normalize_m4c_answer("a, b") == "b"
    assert m.normalize_m4c_answer("Joe's Diner") == "joe 's diner"
    assert m.textvqa_accuracy("1000", ["1,000", "1000"] + ["10"] * 8) == pytest.approx(0.6)


# ------------------------------------------------------------------ exact-match tasks
@pytest.mark.parametrize("pred, answer, correct", [
    # LLaVA's conversion text.rstrip('.').lower(), then GQA eval.py's `prediction == answer`
    ("Yes.", "yes", True),        # trailing "." removed, lower-cased
    ("yes..", "yes", True),       # rstrip('.') removes every trailing period
    ("Table..", "table", True),
    ("left", "left", True),
    (" yes", "yes", False),       # no whitespace strip: LLaVA's runner had already stripped the text
    ("yes\n", "yes", False),
    ("yes. ", "yes", False),      # the space ends the text, so the period is not trailing
    ("Yes", "Yes", False),        # only the prediction is lower-cased; the answer is used as it is
    ("The table", "table", False),
    ("no", "yes", False),
])
def test_gqa_match(pred, answer, correct):
    assert m.gqa_match(pred, answer) is correct


def test_gqa_accuracy_counts_balanced_questions_only():
    # by hand: balanced -> "Yes." right, " no" wrong (no strip): 1/2 = 0.5; the two unbalanced questions
    # ("left", "red." -> "red", both right) are ignored.  Counting them would give 3/4 = 0.75 instead.
    items = [("Yes.", "yes", True), (" no", "no", True), ("left", "left", False), ("red.", "red", False)]
    assert m.gqa_accuracy(items) == (0.5, 2, 2)
    assert m.gqa_accuracy(items[:2]) == (0.5, 2, 0)
    with pytest.raises(ValueError):
        m.gqa_accuracy(items[2:])


@pytest.mark.parametrize("pred, answer, official, paper", [
    ("B", "B", True, True),
    ("b", "B", True, True),
    ("c.", "C", True, False),
    (" A", "A", True, False),
    ("A\n", "A", True, False),
    ("A..", "A", False, False),       # only one trailing period is forgiven
    ("D", "B", False, False),
    ("harry potter.", "Harry Potter", True, False),
])
def test_exact_match(pred, answer, official, paper):
    assert m.exact_match(pred, answer, "official") is official
    assert m.exact_match(pred, answer, "paper") is paper


# ------------------------------------------------------------------ CIDEr-D
CAPTIONS_GT = {
    "11": ["A dog runs across the green grass.", "A brown dog running on a lawn.", "The dog is playing outside."],
    "12": ["Two cats sleeping on a red sofa.", "A pair of cats asleep on the couch."],
    "13": ["A man riding a bicycle down a city street.", "Person on a bike in traffic."],
}
CAPTIONS_RES = {"11": ["A dog running on the grass."], "12": ["Two cats on a couch."],
                "13": ["A man rides a bike\non the street."]}


@pytest.mark.skipif(shutil.which("java") is None, reason="java is not on PATH: the PTB tokenizer needs it")
def test_cider_matches_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in CAPTIONS_GT.items()})
    res = tok.tokenize({k: [{"caption": c.replace("\n", " ")} for c in v] for k, v in CAPTIONS_RES.items()})
    assert res["13"] == ["a man rides a bike on the street"]
    ref_score, ref_per_image = Cider().compute_score(gts, res)

    score, per_image = m.cider_scores(CAPTIONS_GT, CAPTIONS_RES)
    assert score == pytest.approx(float(ref_score), abs=1e-12)
    assert per_image == pytest.approx([float(s) for s in ref_per_image], abs=1e-12)
    assert 0.1 < score < 5.0
    # the pre-tokenised path gives the same numbers
    assert m.cider_scores(gts, res, tokenize=False)[0] == pytest.approx(float(ref_score), abs=1e-12)


def test_cider_rejects_mismatched_ids():
    with pytest.raises(ValueError):
        m.cider_scores({"1": ["a"]}, {"2": ["a"]}, tokenize=False)
    with pytest.raises(ValueError):
        m.cider_scores({"1": ["a"]}, {"1": ["a", "b"]}, tokenize=False)
