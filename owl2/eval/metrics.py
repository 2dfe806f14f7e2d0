"""Benchmark metrics: VQA accuracy, CIDEr-D, multiple choice, MME yes/no, exact match and perplexity.

Pure Python, no dependencies. Each scorer follows the official evaluation code of its benchmark (the
VQAv2 ``VQAEval``, the COCO caption ``CiderScorer`` and ``PTBTokenizer``, MME's ``calculation.py``);
where it departs from that code, the function's docstring says how. Accuracies are fractions in [0, 1]
except MME's, which are percentages as MME reports them.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

# --------------------------------------------------------------------------------------------------
# VQA accuracy (VQAv2, OK-VQA, TextVQA, VizWiz)
# --------------------------------------------------------------------------------------------------

# The official punctuation list: each mark is deleted or turned into a space (see _vqa_punctuation).
# Apostrophes, colons, periods and symbols such as '#', '$', '%', '&', '*' are not in it.
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)"; its first group is a lookahead that can never fail in
# front of a period, so the rule is: drop every period not followed by a digit.
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The official code passes re.UNICODE (= 32) in the position of ``count``: at most 32 periods go.
_VQA_MAX_PERIODS = 32
_VQA_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_VQA_ARTICLES = frozenset({"a", "an", "the"})
# The official contraction table. Its four capitalised keys (Im, Ive, Id've, I'dve) can never match
# because words are lower-cased first, and its identity rows (let's, she's) change nothing; both are
# left out. "somebody'd" -> "somebodyd" is the official row, odd as it looks.
_VQA_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}


def _vqa_punctuation(text: str) -> str:
    # Whether a mark is deleted or becomes a space is decided on the *input* string, once per mark:
    # deleted when that mark touches a space somewhere, or when the text has a digit-comma-digit
    # anywhere (then every mark is deleted, so "1,000" -> "1000").
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _VQA_PUNCT:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_VQA_MAX_PERIODS)


def normalize_vqa_answer(text: str) -> str:
    """The VQAv2 answer normalisation (``processPunctuation`` then ``processDigitArticle``).

    In order: newlines/tabs become spaces and the ends are stripped; punctuation from the official list
    is deleted or replaced by a space (deleted when that mark is next to a space, or everywhere when the
    text contains a digit-comma-digit such as "1,000"; a space otherwise, so "red/blue" -> "red blue");
    periods not followed by a digit are deleted ("yes." -> "yes", "2.5" stays); then the text is
    lower-cased and split on whitespace, number words zero..ten and "none" become digits, the articles
    a/an/the are dropped, the official contraction table restores apostrophes ("dont" -> "don't") and the
    words are joined by single spaces. Apostrophes, colons and most symbols are kept as they are.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    words = []
    for word in _vqa_punctuation(text).lower().split():
        word = _VQA_NUMBER_WORDS.get(word, word)
        if word not in _VQA_ARTICLES:
            words.append(_VQA_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the annotators' answers (ten in VQAv2), in [0, 1].

    Prediction and answers are all normalised with :func:`normalize_vqa_answer`. For each annotator in
    turn, the prediction scores ``min(#matches among the other answers / 3, 1)``; the result is the mean
    over annotators. With ten answers of which k match: 0, 0.3, 0.6, 0.9 and 1.0 for k = 0..4. Fewer
    answers use the same leave-one-out mean; a single answer is scored by exact match.

    The official scorers normalise less: mPLUG-Owl2's ``vqa_eval.py`` (Qwen-VL's copy) normalises the
    prediction fully but the answers only for punctuation, and only when the annotators disagree; the
    GT-Vision-Lab original normalises nothing at all when they agree (so "Yes" scores 0 against ten
    "yes" there). The VQAv2/OK-VQA/TextVQA annotations are stored normalised already, so normalising
    them again changes nothing there; for raw-text answers this function is the more forgiving one.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    predicted = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(answer) == predicted for answer in answers]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    # Leaving out annotator i leaves total - matches[i] matching answers among the others.
    return sum(min((total - left_out) / 3.0, 1.0) for left_out in matches) / len(matches)


def vqa_score(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Mean :func:`vqa_accuracy` over questions, a fraction in [0, 1] (VQAv2 reports 100x this)."""
    _check_same_length(predictions, answers, "predictions", "answers")
    return sum(vqa_accuracy(p, a) for p, a in zip(predictions, answers, strict=True)) / len(predictions)


# --------------------------------------------------------------------------------------------------
# CIDEr-D (COCO / Flickr30K / NoCaps captions)
# --------------------------------------------------------------------------------------------------

# What the COCO evaluation's PTBTokenizer wrapper deletes after tokenising. Its bracket entries are
# upper case ("-LRB-"), but the tokenizer runs with -lowerCase, so brackets survive as "-lrb-" etc.
_PTB_DROPPED = frozenset({"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'})
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_PTB_ABBREVIATIONS = ("mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "mt", "etc", "inc", "co", "ltd")
_PTB_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "wanna": ["wan", "na"], "gotta": ["got", "ta"]}
_PTB_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_PTB_TOKEN = re.compile(
    r"""
    \.\.\.+                                   # ellipsis (dropped)
  | --+                                       # dash (dropped)
  | \d+(?:[.,:]\d+)+(?![-/]\w)                # 2.5, 1,000, 3:30 (letters glued after it split off)
  | [^\W\d_](?:\.[^\W\d_](?!\w))+\.?          # u.s., e.g., p.m.
  | (?:{abbreviations})\.(?!\w)               # mr., st., etc.
  | no\.(?=\s*\d)                             # no. 5
  | (?:[#@](?=[^\W\d]))?\w+(?:[-./'&]\w+)*   # words, with inner hyphens, periods, slashes, apostrophes
  | '(?:s|re|ve|ll|d|m)(?!\w)                 # a clitic already split off
  | \S                                        # any other single character
    """.format(abbreviations="|".join(_PTB_ABBREVIATIONS)),
    re.VERBOSE,
)
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def tokenize_caption(text: str) -> list[str]:
    """Caption tokens as the COCO evaluation's Java PTBTokenizer (+ punctuation removal) makes them.

    A regex approximation of Stanford PTBTokenizer 3.4.1 run with ``-preserveLines -lowerCase``,
    followed by the COCO wrapper's removal of punctuation tokens. Lower-cased; clitics split off
    ("dog's" -> "dog 's", "don't" -> "do n't", "cannot" -> "can not"); sentence punctuation
    (. , ; : ! ? quotes, dashes, ellipses) removed; numbers such as "2.5", "1,000", "3:30" kept whole;
    inner hyphens and slashes kept ("black-and-white", "and/or"); dotted abbreviations kept ("u.s.");
    "$", "%", "+", "=" split off and kept; brackets become "-lrb-"/"-rrb-"/... and are kept, as they are
    in the official pipeline; letters glued to a number are split off ("3.5mm" -> "3.5 mm"). Checked
    against the Java tool on ~9,000 generated and ~80 hand-written captions: identical except for rare
    forms it splits specially ("rock 'n' roll", "'t is", 5'10") and abbreviations outside the short
    list here (mr. mrs. dr. st. etc. and dotted ones such as "u.s.", "p.m." are covered).
    """
    tokens: list[str] = []
    for piece in _PTB_TOKEN.findall(text.replace("\n", " ").lower().translate(_QUOTES)):
        if piece in _PTB_DROPPED or piece.startswith(("...", "--")):
            continue
        if piece in _PTB_BRACKETS:
            tokens.append(_PTB_BRACKETS[piece])
        elif piece in _PTB_SPLIT_WORDS:
            tokens.extend(_PTB_SPLIT_WORDS[piece])
        elif "'" in piece and (clitic := _PTB_CLITIC.match(piece)):
            tokens.extend(clitic.groups())
        else:
            tokens.append(piece)
    return tokens


_CIDER_ORDERS = 4
_CIDER_SIGMA = 6.0


ImageId = TypeVar("ImageId", bound=Hashable)


def _ngrams(tokens: Sequence[str]) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for order in range(1, _CIDER_ORDERS + 1):
        for start in range(len(tokens) - order + 1):
            counts[tuple(tokens[start : start + order])] += 1
    return counts


class _TfIdf:
    """One caption's TF-IDF vector, split by n-gram order, with a norm per order and a length."""

    def __init__(self, counts: Counter[tuple[str, ...]], num_tokens: int, idf: dict[tuple[str, ...], float]):
        self.weights: list[dict[tuple[str, ...], float]] = [{} for _ in range(_CIDER_ORDERS)]
        for ngram, count in counts.items():
            self.weights[len(ngram) - 1][ngram] = count * idf[ngram]
        self.norms = [math.sqrt(sum(w * w for w in order.values())) for order in self.weights]
        self.num_tokens = num_tokens


def _cider_d_pair(candidate: _TfIdf, reference: _TfIdf) -> float:
    """Mean over n-gram orders of the clipped cosine similarity, times the Gaussian length penalty."""
    # The official code measures length in bigrams (tokens - 1); the difference of two lengths is the
    # same unless one caption is empty, and then the similarity is 0 anyway.
    delta = candidate.num_tokens - reference.num_tokens
    penalty = math.exp(-(delta * delta) / (2 * _CIDER_SIGMA**2))
    total = 0.0
    for order in range(_CIDER_ORDERS):
        cand, ref = candidate.weights[order], reference.weights[order]
        norm = candidate.norms[order] * reference.norms[order]
        if norm == 0:
            continue
        # CIDEr-D clipping: a candidate n-gram counts at most as often as the reference has it.
        dot = sum(min(weight, ref[ngram]) * ref[ngram] for ngram, weight in cand.items() if ngram in ref)
        total += dot / norm
    return total / _CIDER_ORDERS * penalty


def cider_per_image(
    predictions: Mapping[ImageId, str], references: Mapping[ImageId, Sequence[str]], *, tokenize: bool = True
) -> dict[ImageId, float]:
    """CIDEr-D of each image's predicted caption, as the COCO caption evaluation computes it.

    ``predictions`` maps an image id to one caption, ``references`` the same ids to their reference
    captions. Captions are tokenised with :func:`tokenize_caption` (``tokenize=False``: they are already
    tokenised, split on whitespace). Per n-gram order 1..4, captions become TF-IDF vectors with
    ``idf = log(#images) - log(max(1, df))``, df counting the images whose references contain the
    n-gram. The candidate's weights are clipped by each reference's, the cosine is taken per order and
    averaged over orders, multiplied by ``exp(-(len_c - len_r)^2 / (2 * 6^2))``, averaged over the
    references and multiplied by 10. Document frequencies come from the corpus given, so scores depend
    on it; a corpus of a single image scores 0 everywhere (every idf is log 1 - log 1 = 0).
    """
    if set(predictions) != set(references):
        missing = set(references) ^ set(predictions)
        raise ValueError(
            f"predictions and references must cover the same images; differing ids: {sorted(map(str, missing))[:5]}"
        )
    if not references:
        raise ValueError("cider needs at least one image")
    split = tokenize_caption if tokenize else str.split
    ref_tokens: dict[ImageId, list[list[str]]] = {}
    for image, captions in references.items():
        if isinstance(captions, str) or not captions:
            raise ValueError(f"references[{image!r}] must be a non-empty list of captions")
        ref_tokens[image] = [split(caption) for caption in captions]
    ref_counts = {image: [_ngrams(tokens) for tokens in caps] for image, caps in ref_tokens.items()}

    document_frequency: Counter[tuple[str, ...]] = Counter()
    for counts in ref_counts.values():
        document_frequency.update(set().union(*counts))
    log_images = math.log(len(references))
    idf: defaultdict[tuple[str, ...], float] = defaultdict(lambda: log_images)  # unseen n-gram: df 0 -> 1
    idf.update({ngram: log_images - math.log(df) for ngram, df in document_frequency.items()})

    scores = {}
    for image, caption in predictions.items():
        cand_tokens = split(caption)
        candidate = _TfIdf(_ngrams(cand_tokens), len(cand_tokens), idf)
        refs = [_TfIdf(c, len(t), idf) for c, t in zip(ref_counts[image], ref_tokens[image], strict=True)]
        scores[image] = 10.0 * sum(_cider_d_pair(candidate, ref) for ref in refs) / len(refs)
    return scores


def cider(
    predictions: Mapping[ImageId, str], references: Mapping[ImageId, Sequence[str]], *, tokenize: bool = True
) -> float:
    """Corpus CIDEr-D: the mean of :func:`cider_per_image` over images (COCO reports 100x this)."""
    scores = cider_per_image(predictions, references, tokenize=tokenize)
    return sum(scores.values()) / len(scores)


# --------------------------------------------------------------------------------------------------
# Multiple choice (MMBench, SEED-Bench, ScienceQA, MMMU)
# --------------------------------------------------------------------------------------------------

_BARE_LETTER = re.compile(r"""[\s(\[{<"'*]*([A-Za-z])[\s)\]}>.:,;!"'*]*""")
_LEADING_LETTER = re.compile(r"\s*[(\[]?([A-Z])(?:[)\]]|[.:]|\s+-)(?:\s|$)")
_NAMED_LETTER = re.compile(r"(?i:\b(?:answer|option|choice))(?:\s+is)?\s*:?\s*[(\[]?([A-Z])\b(?!')")
_STANDALONE_LETTER = re.compile(r"(?<![\w'])([A-Z])(?![\w'])")
_SENTENCE_START = re.compile(r"(?:^\s*|[.!?]\s+)$")


def _words(text: str) -> str:
    return " ".join(re.findall(r"[^\W_]+", text.lower()))


def _squash(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .,;:!?\"'")


def _option_table(options: str | Sequence[str] | Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """(letters, letter -> option text) from a letter string, a list of option texts or a mapping."""
    if isinstance(options, str):
        return [letter.upper() for letter in options], {}
    if isinstance(options, Mapping):
        # MMBench rows hold NaN for the options a question lacks: those letters are not options.
        texts = {str(k).upper(): v for k, v in options.items() if isinstance(v, str) and v.strip()}
        return list(texts), texts
    if len(options) > 26:
        raise ValueError("at most 26 options (A-Z)")
    letters = [chr(ord("A") + i) for i in range(len(options))]
    return letters, dict(zip(letters, options, strict=True))


def extract_choice(text: str, options: str | Sequence[str] | Mapping[str, str] = "ABCD") -> str | None:
    """The option letter a model's reply picks, or None when it names none or several.

    ``options``: the letters ("ABCD"), the option texts in order (letters A, B, ... are assigned), or a
    mapping letter -> text (MMBench rows: a letter whose text is NaN/None/empty is no option). Tried in
    order:

    1. the reply is a letter alone, maybe bracketed or punctuated: "B", "b", "B.", "(B)", "[B]";
    2. the reply is one option's text (case and end punctuation ignored): "a red cup";
    3. the reply starts with a letter and a delimiter: "B. a red cup", "(B) a red cup", "B) ...", "B: ...",
       "B - ..." (not a comma: "A, B and C" lists several);
    4. the letter follows "answer"/"option"/"choice" (+ "is", ":"): "The answer is B", "Answer: (C)";
    5. exactly one option letter stands alone as a capital (a sentence-initial "A" before a lower-case
       word is read as the article, "I" before a lower-case word as the pronoun);
    6. exactly one option text occurs in the reply as whole words (a text inside a longer matching
       text does not count separately).

    Letters are upper case except in rule 1, so the article "a" is never read as option A.
    """
    letters, texts = _option_table(options)
    valid = set(letters)
    if bare := _BARE_LETTER.fullmatch(text):
        letter = bare.group(1).upper()
        return letter if letter in valid else None
    squashed = _squash(text)
    if not squashed:
        return None
    exact = [letter for letter, option in texts.items() if _squash(option) == squashed]
    if len(exact) == 1:
        return exact[0]
    if (leading := _LEADING_LETTER.match(text)) and leading.group(1) in valid:
        return leading.group(1)
    named = {m.group(1) for m in _NAMED_LETTER.finditer(text)} & valid
    if len(named) == 1:
        return named.pop()
    standalone = set()
    for match in _STANDALONE_LETTER.finditer(text):
        letter, after = match.group(1), text[match.end() : match.end() + 2]
        before_lower_word = len(after) == 2 and after[0] == " " and after[1].islower()
        if before_lower_word and (letter == "I" or (letter == "A" and _SENTENCE_START.search(text[: match.start()]))):
            continue
        standalone.add(letter)
    standalone &= valid
    if len(standalone) == 1:
        return standalone.pop()
    if standalone:
        return None
    lowered = f" {_words(text)} "
    contained = {}
    for letter, option in texts.items():
        words = _words(option)
        if words and f" {words} " in lowered:
            contained[letter] = words
    found = [
        letter
        for letter, words in contained.items()
        if not any(words != other and f" {words} " in f" {other} " for other in contained.values())
    ]
    return found[0] if len(found) == 1 else None


def multiple_choice_accuracy(
    predictions: Sequence[str],
    answers: Sequence[str],
    options: str | Sequence[str] | Mapping[str, str] | Sequence[Sequence[str] | Mapping[str, str]] = "ABCD",
) -> float:
    """Fraction of replies whose :func:`extract_choice` letter equals the answer letter, in [0, 1].

    ``options`` is one option spec for all questions (see :func:`extract_choice`), or one spec per
    question: a list, as long as ``predictions``, of lists or mappings. A reply naming no option, or
    several, counts as wrong.
    """
    _check_same_length(predictions, answers, "predictions", "answers")
    per_question = (
        not isinstance(options, str | Mapping)
        and len(options) == len(predictions)
        and all(
            isinstance(spec, Mapping) or (isinstance(spec, Sequence) and not isinstance(spec, str)) for spec in options
        )
    )
    specs = options if per_question else [options] * len(predictions)
    correct = sum(
        extract_choice(reply, spec) == answer.strip().upper()
        for reply, answer, spec in zip(predictions, answers, specs, strict=True)
    )
    return correct / len(predictions)


# --------------------------------------------------------------------------------------------------
# Yes/no (MME, POPE)
# --------------------------------------------------------------------------------------------------

MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def yes_no(text: str) -> str | None:
    """The label a yes/no reply gives: its first word when that is "yes" or "no", else whichever of the
    two occurs as a whole word when only one does; None otherwise.

    MME's own parser looks for "yes", then "no", as substrings of the first four characters, so it also
    reads "not sure" or "none" as "no"; here those give None, scored as wrong all the same.
    """
    words = re.findall(r"[a-z]+", text.lower())
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    has_yes, has_no = "yes" in words, "no" in words
    if has_yes != has_no:
        return "yes" if has_yes else "no"
    return None


def _image_key(record: Mapping[str, Any]) -> Hashable:
    for key in ("image", "image_name", "question_id"):
        if key in record:
            return record[key]
    raise KeyError("an MME record needs 'image' (or 'image_name' / 'question_id') to pair its two questions")


def mme_scores(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """MME accuracies, in percent as MME reports them.

    Each record has ``prediction`` (the model's reply), ``answer`` ("yes"/"no"), ``category`` (the MME
    subtask; "all" when absent) and ``image`` (or ``image_name``, or ``question_id`` when that names the
    image as in LLaVA's MME files). Per subtask: ``acc`` = % of questions answered right (replies are
    read with :func:`yes_no`; None is wrong), ``acc_plus`` = % of images all of whose questions (two
    per image in MME) are right, ``score`` = acc + acc_plus (at most 200). Returned: ``acc`` and
    ``acc_plus`` over all records, ``subtasks`` {name: {acc, acc_plus, score, questions, images}},
    ``perception`` and ``cognition`` (the sums of subtask scores over MME's 10 and 4 subtasks; at most
    2000 and 800) and ``total`` (the sum over all subtasks present).
    """
    by_task: dict[str, dict[Hashable, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        answer = str(record["answer"]).strip().lower()
        if answer not in ("yes", "no"):
            raise ValueError(f"MME answers are yes/no, got {record['answer']!r}")
        task = str(record.get("category", "all"))
        by_task[task][_image_key(record)].append(yes_no(str(record["prediction"])) == answer)
    if not by_task:
        raise ValueError("mme_scores needs at least one record")

    def summary(images: Iterable[list[bool]]) -> dict[str, float]:
        images = list(images)
        questions = [right for image in images for right in image]
        acc = 100.0 * sum(questions) / len(questions)
        acc_plus = 100.0 * sum(all(image) for image in images) / len(images)
        return {
            "acc": acc,
            "acc_plus": acc_plus,
            "score": acc + acc_plus,
            "questions": len(questions),
            "images": len(images),
        }

    subtasks = {task: summary(images.values()) for task, images in sorted(by_task.items())}
    overall = summary(image for images in by_task.values() for image in images.values())
    return {
        "acc": overall["acc"],
        "acc_plus": overall["acc_plus"],
        "subtasks": subtasks,
        "perception": sum(s["score"] for t, s in subtasks.items() if t in MME_PERCEPTION),
        "cognition": sum(s["score"] for t, s in subtasks.items() if t in MME_COGNITION),
        "total": sum(s["score"] for s in subtasks.values()),
    }


# --------------------------------------------------------------------------------------------------
# Text-only
# --------------------------------------------------------------------------------------------------


def _normalize_text(text: str) -> str:
    return " ".join(text.split()).lower().rstrip(".,;:!?").rstrip()


def exact_match(prediction: str, answer: str | Sequence[str], normalize: bool = True) -> float:
    """1.0 when the prediction equals the answer (or any of several answers), else 0.0.

    With ``normalize``, both sides are stripped, lower-cased, lose trailing . , ; : ! ? and have runs of
    whitespace collapsed to one space ("Paris." == "paris").
    """
    answers = [answer] if isinstance(answer, str) else list(answer)
    if normalize:
        prediction = _normalize_text(prediction)
        answers = [_normalize_text(a) for a in answers]
    return float(prediction in answers)


def perplexity(total_nll: float, num_tokens: int) -> float:
    """exp(total negative log-likelihood in nats / number of predicted tokens); inf on overflow."""
    if num_tokens <= 0:
        raise ValueError(f"perplexity needs a positive token count, got {num_tokens}")
    try:
        return math.exp(total_nll / num_tokens)
    except OverflowError:
        return math.inf


def _check_same_length(first: Sequence[Any], second: Sequence[Any], first_name: str, second_name: str) -> None:
    if len(first) != len(second):
        raise ValueError(f"{first_name} and {second_name} differ in length: {len(first)} vs {len(second)}")
    if not first:
        raise ValueError(f"{first_name} is empty")
