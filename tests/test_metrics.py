"""Benchmark metrics against hand-computed values, the official formulas and fixed official outputs."""

import math
import random
from collections import Counter

import pytest

from owl2.eval.metrics import (
    cider,
    cider_per_image,
    exact_match,
    extract_choice,
    mme_scores,
    multiple_choice_accuracy,
    normalize_vqa_answer,
    perplexity,
    tokenize_caption,
    vqa_accuracy,
    vqa_score,
    yes_no,
)

# --------------------------------------------------------------------------------------------------
# VQA
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("yes.", "yes"),
        ("Yes", "yes"),
        ("  yes\n", "yes"),
        ("2.5", "2.5"),  # a period before a digit stays
        ("3.", "3"),
        ("1,000", "1000"),  # digit-comma-digit: every listed mark is deleted, not spaced
        ("two", "2"),
        ("None", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # the official table stops at ten
        ("a dog", "dog"),
        ("The Two Dogs!", "2 dogs"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("wont", "won't"),
        ("oclock", "o'clock"),
        ("im", "im"),  # the official table's "Im" key can never match after lower-casing
        ("red/blue", "red blue"),  # a mark not next to a space becomes a space
        ("red, blue", "red blue"),  # a mark next to a space is deleted
        ("one,two", "1 2"),
        ("black-and-white", "black and white"),
        ("x - y", "x y"),
        ("what's", "what's"),  # apostrophes are not in the official list
        ("$5 , 10%", "$5 10%"),
        ("3:30", "3:30"),  # neither are colons
        ("  many   spaces\there ", "many spaces here"),
        ("", ""),
    ],
)
def test_normalize_vqa_answer(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_with_ten_annotators(matches, expected):
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("cat", answers) == pytest.approx(expected)
    # The closed form: k matching annotators out of 10.
    k = matches
    assert vqa_accuracy("cat", answers) == pytest.approx((k * min((k - 1) / 3, 1) + (10 - k) * min(k / 3, 1)) / 10)


def test_vqa_accuracy_normalises_prediction_and_answers():
    answers = ["2", "two", "Two.", "3", "3", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("two", answers) == pytest.approx(0.9)
    assert vqa_accuracy("The answer: 2", answers) == 0.0  # the colon stays, "answer:" stays
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0


def test_vqa_accuracy_with_few_answers():
    assert vqa_accuracy("Yes.", ["yes"]) == 1.0  # one answer: exact match after normalisation
    assert vqa_accuracy("no", ["yes"]) == 0.0
    # Three answers, two match: leaving out a match leaves 1 (1/3), leaving out the other leaves 2 (2/3).
    assert vqa_accuracy("no", ["no", "no", "yes"]) == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3)
    with pytest.raises(ValueError):
        vqa_accuracy("no", [])


def test_vqa_score_is_the_mean_fraction():
    predictions = ["cat", "dog"]
    answers = [["cat"] * 10, ["cat"] * 9 + ["dog"]]
    assert vqa_score(predictions, answers) == pytest.approx((1.0 + 0.3) / 2)
    with pytest.raises(ValueError):
        vqa_score(["cat"], answers)
    with pytest.raises(ValueError):
        vqa_score([], [])


# --------------------------------------------------------------------------------------------------
# Caption tokenisation and CIDEr-D
# --------------------------------------------------------------------------------------------------

# The Java PTBTokenizer (stanford-corenlp 3.4.1, -preserveLines -lowerCase) followed by the COCO
# wrapper's punctuation removal, run once on these lines.
PTB_OUTPUTS = {
    "A man riding a wave on top of a surfboard.": "a man riding a wave on top of a surfboard",
    "A dog's toy, lying on the grass!": "a dog 's toy lying on the grass",
    "Two people don't like the black-and-white photo.": "two people do n't like the black-and-white photo",
    '"The cat" sat (quietly); it\'s 2.5 feet wide.': "the cat sat -lrb- quietly -rrb- it 's 2.5 feet wide",
    "There are 1,000 birds at 3:30 p.m. in the U.S. ...": "there are 1,000 birds at 3:30 p.m. in the u.s.",
    "A woman -- holding an umbrella -- walks by.": "a woman holding an umbrella walks by",
    "Kids can't wait: they're going to the zoo?": "kids ca n't wait they 're going to the zoo",
    "A $5 bill and 50% off sign & a t-shirt.": "a $ 5 bill and 50 % off sign & a t-shirt",
    "the dogs' bowls are full": "the dogs bowls are full",
    "a 2.5-inch screen and 1,000th visitor and 3.5mm jack": "a 2.5-inch screen and 1,000 th visitor and 3.5 mm jack",
    "dr. who and mr. bean on main st.": "dr. who and mr. bean on main st.",
    "a café near the naïve artist’s studio": "a café near the naïve artist 's studio",
    "cannot, red,blue and/or 1/2 cup": "can not red blue and/or 1/2 cup",
}


@pytest.mark.parametrize(("caption", "tokens"), list(PTB_OUTPUTS.items()))
def test_tokenize_caption_matches_the_java_ptb_tokenizer(caption, tokens):
    assert tokenize_caption(caption) == tokens.split()


# A small raw-caption corpus and its CIDEr-D from the official pipeline (pycocoevalcap 1.2: Java
# PTBTokenizer + Cider), computed once.
REFS = {
    "surf": [
        "A man riding a wave on top of a surfboard.",
        "A surfer rides a large wave in the ocean.",
        "A person on a surfboard riding a wave.",
        "Surfer in a black wetsuit catching a wave!",
        "a man surfing on a big wave",
    ],
    "kitchen": [
        "A kitchen with a stove, a sink and a refrigerator.",
        "The kitchen's counter is clean and white.",
        "An empty kitchen with white cabinets and a stove.",
        "A small kitchen that has a stove and a fridge.",
        "kitchen with wooden floors and a black stove",
    ],
    "dog": [
        "A dog is catching a frisbee in the park.",
        "A brown dog jumping to catch a Frisbee.",
        "The dog leaps into the air for a frisbee.",
        "A dog that's playing with a frisbee on the grass.",
        "dog jumping in the air with a frisbee in its mouth",
    ],
    "bus": [
        "A red double-decker bus driving down a street.",
        "A double decker bus is parked by the curb.",
        "Red bus on a city street near buildings.",
        "A bus (red) driving past some people.",
        "a large red bus going down the road",
    ],
    "pizza": [
        "A pizza with cheese and tomatoes on a plate.",
        "Someone hasn't eaten the pizza on the table yet.",
        "A large pizza sitting on top of a wooden table.",
        "A close up of a pizza with toppings.",
        "a pizza, cut into 8 slices, on a tray",
    ],
}
PREDICTIONS = {
    "surf": "A man riding a wave on a surfboard.",
    "kitchen": "A kitchen with a stove and a sink.",
    "dog": "A dog jumping to catch a frisbee.",
    "bus": "A red bus driving down a city street.",
    "pizza": "A cat sitting on a couch.",
}
OFFICIAL_CIDER = 2.200947000561581
OFFICIAL_PER_IMAGE = {
    "surf": 2.8945794043661888,
    "kitchen": 2.9086192394837025,
    "dog": 2.7251618429727307,
    "bus": 2.2573958500132405,
    "pizza": 0.21897866597204552,
}


def test_cider_matches_the_official_pipeline_on_raw_captions():
    assert cider(PREDICTIONS, REFS) == pytest.approx(OFFICIAL_CIDER, rel=1e-12)
    assert cider_per_image(PREDICTIONS, REFS) == pytest.approx(OFFICIAL_PER_IMAGE, rel=1e-12)


def reference_cider_d(candidates, references):
    """CIDEr-D written out from the paper's formula and the COCO evaluation's choices, loop by loop.

    Inputs are whitespace-tokenised strings. idf = log(#images) - log(max(1, df)) with df counted over
    each image's reference set; per order: clipped dot product over the product of unclipped norms;
    mean over orders 1..4; Gaussian length penalty, sigma 6; mean over references; times 10.
    """
    num_images = len(references)

    def grams(text, n):
        words = text.split()
        return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))

    df = Counter()
    for refs in references.values():
        df.update({g for ref in refs for n in range(1, 5) for g in grams(ref, n)})

    def weights(text, n):
        return {g: c * (math.log(num_images) - math.log(max(1, df[g]))) for g, c in grams(text, n).items()}

    scores = {}
    for image, candidate in candidates.items():
        total = 0.0
        for ref in references[image]:
            per_order = []
            for n in range(1, 5):
                c, r = weights(candidate, n), weights(ref, n)
                norm_c = math.sqrt(sum(v * v for v in c.values()))
                norm_r = math.sqrt(sum(v * v for v in r.values()))
                dot = sum(min(v, r.get(g, 0.0)) * r.get(g, 0.0) for g, v in c.items())
                per_order.append(dot / (norm_c * norm_r) if norm_c and norm_r else 0.0)
            delta = len(candidate.split()) - len(ref.split())
            total += sum(per_order) / 4 * math.exp(-(delta**2) / (2 * 6.0**2))
        scores[image] = 10 * total / len(references[image])
    return scores


def test_cider_hand_computed_two_image_corpus():
    references = {1: ["cat sat"], 2: ["dog ran"]}
    # Identical: unigram and bigram cosines are 1, trigram and 4-gram vectors are empty -> (1 + 1) / 4 * 10.
    # "dog" against "dog ran": unigram cosine 1/sqrt(2), no bigram; lengths differ by one.
    expected_dog = 10 * (1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    scores = cider_per_image({1: "cat sat", 2: "dog"}, references, tokenize=False)
    assert scores == pytest.approx({1: 5.0, 2: expected_dog})
    assert cider({1: "cat sat", 2: "dog"}, references, tokenize=False) == pytest.approx((5.0 + expected_dog) / 2)


def test_cider_clips_repeated_candidate_ngrams():
    references = {1: ["cat sat"], 2: ["dog ran"]}
    # Unclipped, "cat cat cat" would have unigram cosine 1/sqrt(2); clipped to one "cat" it is 1/(3 sqrt(2)).
    scores = cider_per_image({1: "cat cat cat", 2: "dog ran"}, references, tokenize=False)
    assert scores[1] == pytest.approx(10 * (1 / (3 * math.sqrt(2))) / 4 * math.exp(-1 / 72))


def test_cider_identical_and_disjoint():
    references = {
        i: [f"a {c} {a} on the {p}"] * 3
        for i, (c, a, p) in enumerate(
            [("red", "car", "road"), ("blue", "boat", "lake"), ("green", "frog", "leaf"), ("white", "cat", "bed")]
        )
    }
    identical = {i: refs[0] for i, refs in references.items()}
    assert all(score > 5 for score in cider_per_image(identical, references).values())
    disjoint = {i: "zebra xylophone quietly" for i in references}
    assert cider(disjoint, references) == 0.0


def test_cider_length_penalty():
    references = {1: ["a man riding a horse on a beach"], 2: ["two dogs play in the snow"]}
    exact = cider_per_image({1: references[1][0], 2: "x"}, references)[1]
    padded = cider_per_image({1: references[1][0] + " near some tall trees and rocks", 2: "x"}, references)[1]
    assert padded < exact
    # "cat" against "cat sat sat sat sat sat sat": unigram cosine 1/sqrt(1 + 6^2), no shared longer
    # n-grams, 6 tokens shorter -> penalty exp(-36 / 72).
    scores = cider_per_image({1: "cat", 2: "dog ran"}, {1: ["cat" + " sat" * 6], 2: ["dog ran"]}, tokenize=False)
    assert scores[1] == pytest.approx(10 * (1 / math.sqrt(37)) / 4 * math.exp(-0.5))


def test_cider_matches_a_formula_rewrite_on_a_random_corpus():
    rng = random.Random(0)
    vocab = "a the man woman dog cat red blue sits runs on in park street table ball with near".split()

    def sentence():
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12)))

    references = {i: [sentence() for _ in range(rng.randint(1, 5))] for i in range(40)}
    candidates = {i: sentence() for i in references}
    expected = reference_cider_d(candidates, references)
    assert cider_per_image(candidates, references, tokenize=False) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert cider(candidates, references, tokenize=False) == pytest.approx(sum(expected.values()) / len(expected))


def test_cider_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="same images"):
        cider({1: "a"}, {1: ["a"], 2: ["b"]})
    with pytest.raises(ValueError, match="non-empty list"):
        cider({1: "a", 2: "b"}, {1: ["a"], 2: []})
    with pytest.raises(ValueError, match="non-empty list"):
        cider({1: "a", 2: "b"}, {1: ["a"], 2: "b"})
    # One image: every idf is 0, as in the official scorer.
    assert cider({1: "a cat"}, {1: ["a cat"]}) == 0.0


# --------------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------------

TEXTS = ["a blue cup", "a red cup", "a cup", "a green cup"]


@pytest.mark.parametrize(
    ("reply", "letters_only", "with_texts"),
    [
        ("B", "B", "B"),
        ("b", "B", "B"),
        ("B.", "B", "B"),
        ("(B)", "B", "B"),
        ("[C]", "C", "C"),
        (" D\n", "D", "D"),
        ("The answer is B", "B", "B"),
        ("The correct answer is (C).", "C", "C"),
        ("Answer: D", "D", "D"),
        ("option C", "C", "C"),
        ("B. a red cup", "B", "B"),
        ("(B) a red cup", "B", "B"),
        ("B) a red cup", "B", "B"),
        ("I choose C because it is red", "C", "C"),
        ("B, because it is red", "B", "B"),
        ("A, B and C", None, None),
        (" A red cup", None, "B"),
        ("A red cup", None, "B"),  # a sentence-initial "A" before a word is the article
        ("a red cup", None, "B"),  # the option text itself
        ("It is a blue cup.", None, "A"),
        ("a cup", None, "C"),  # "a cup" is an option's whole text
        ("I think A is wrong, B is right", None, None),  # two letters
        ("Both A and C", None, None),
        ("E", None, None),  # not an option
        ("answer is Blue", None, None),  # a capital starting a word is not a letter
        ("I don't know", None, None),
        ("", None, None),
    ],
)
def test_extract_choice(reply, letters_only, with_texts):
    assert extract_choice(reply) == letters_only
    assert extract_choice(reply, TEXTS) == with_texts


def test_extract_choice_with_mapping_and_more_letters():
    options = {"A": "cat", "B": "dog", "C": float("nan"), "D": None}  # MMBench rows: missing options are NaN
    assert extract_choice("It is a dog.", options) == "B"
    assert extract_choice("B", options) == "B"
    assert extract_choice("C", options) is None  # C has no text: not an option of this question
    assert extract_choice("E", "ABCDE") == "E"
    assert extract_choice("E", "ABCD") is None


def test_multiple_choice_accuracy():
    assert multiple_choice_accuracy(["B", "(A)", "The answer is C", "no idea"], ["B", "a", "D", "A"]) == 0.5
    per_question = [["cat", "dog"], {"A": "red", "B": "blue"}]
    assert multiple_choice_accuracy(["a dog", "red"], ["B", "A"], per_question) == 1.0
    assert multiple_choice_accuracy(["a dog", "cat"], ["B", "A"], ["cat", "dog"]) == 1.0  # shared texts
    with pytest.raises(ValueError):
        multiple_choice_accuracy(["A"], ["A", "B"])


# --------------------------------------------------------------------------------------------------
# Yes/no and MME
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "label"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("No, there is no dog.", "no"),
        ("Yes, there is no dog.", "yes"),  # the first word decides
        ("There is no dog in the image.", "no"),
        ("I think yes", "yes"),
        ("Not sure", None),
        ("yes or no", "yes"),
        ("Maybe", None),
        ("nobody knows", None),
        ("", None),
    ],
)
def test_yes_no(reply, label):
    assert yes_no(reply) == label


def test_mme_scores_hand_computed():
    records = [
        # existence: image 1 both right, image 2 one right -> acc 3/4, acc+ 1/2
        {"category": "existence", "image": "1.png", "prediction": "Yes", "answer": "Yes"},
        {"category": "existence", "image": "1.png", "prediction": "No.", "answer": "No"},
        {"category": "existence", "image": "2.png", "prediction": "no", "answer": "yes"},
        {"category": "existence", "image": "2.png", "prediction": "no", "answer": "no"},
        # code_reasoning: one right, one unreadable -> acc 1/2, acc+ 0
        {"category": "code_reasoning", "image": "1.png", "prediction": "yes, it is", "answer": "yes"},
        {"category": "code_reasoning", "image": "1.png", "prediction": "maybe", "answer": "no"},
    ]
    scores = mme_scores(records)
    existence, code = scores["subtasks"]["existence"], scores["subtasks"]["code_reasoning"]
    assert (existence["acc"], existence["acc_plus"], existence["score"]) == (75.0, 50.0, 125.0)
    assert (code["acc"], code["acc_plus"], code["score"]) == (50.0, 0.0, 50.0)
    assert (existence["questions"], existence["images"]) == (4, 2)
    assert (scores["perception"], scores["cognition"], scores["total"]) == (125.0, 50.0, 175.0)
    assert scores["acc"] == pytest.approx(100 * 4 / 6)
    assert scores["acc_plus"] == pytest.approx(100 / 3)


def test_mme_scores_pairs_by_question_id_and_validates():
    records = [
        {"question_id": "count/7.png", "prediction": "Yes", "answer": "yes"},
        {"question_id": "count/7.png", "prediction": "No", "answer": "no"},
    ]
    scores = mme_scores(records)
    assert scores["subtasks"]["all"]["acc_plus"] == 100.0
    assert scores["perception"] == 0.0  # "all" is not an MME subtask name
    with pytest.raises(ValueError, match="yes/no"):
        mme_scores([{"image": "1", "prediction": "yes", "answer": "maybe"}])
    with pytest.raises(KeyError):
        mme_scores([{"prediction": "yes", "answer": "yes"}])
    with pytest.raises(ValueError):
        mme_scores([])


# --------------------------------------------------------------------------------------------------
# Text-only
# --------------------------------------------------------------------------------------------------


def test_exact_match():
    assert exact_match("Paris.", "paris") == 1.0
    assert exact_match("  New   York! ", "new york") == 1.0
    assert exact_match("Paris.", "paris", normalize=False) == 0.0
    assert exact_match("Lyon", "Paris") == 0.0
    assert exact_match("42", ["41", "42"]) == 1.0
    assert exact_match("C++", "c++") == 1.0  # only . , ; : ! ? are stripped from the end


def test_perplexity():
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(10 * math.log(4), 10) == pytest.approx(4.0)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        perplexity(1.0, 0)
