"""Benchmark loaders: files in the formats the benchmarks ship -> :class:`EvalItem` lists with official prompts.

Each item carries its conversation (ending with the user's turn, ``<|image|>`` placeholders where the images
go), its images (paths, URIs or encoded bytes), the reference answers, and the :class:`Protocol` that says how
to prompt and decode it. The protocols reproduce mPLUG-Owl2's evaluation scripts (``mplug_owl2/evaluate/``):

=========  ==========================================================================================  ========
benchmark  prompt (template ``mplug_owl2``)                                                            decoding
=========  ==========================================================================================  ========
VQA        ``USER: <|image|>{q} Answer the question using a single word or phrase. ASSISTANT: ``        10 new
MMBench    ``USER: <|image|>{hint or N/A}\\n{q}\\nA. ..\\nB. ..\\nAnswer with the option’s letter ...``      10 new
MME        ``USER: <|image|>{q minus "Please answer yes or no."}\\nAnswer the question using ... ``       10 new
captions   ``USER: <|image|>Provide a one-sentence caption for the provided image. ASSISTANT: ``          8-60 new
=========  ==========================================================================================  ========

All greedy with at least one new token. The official VQA, MME and caption prompts end in ``"ASSISTANT: "``
with a space, which the released tokenizer turns into a lone ``"▁"`` token before the answer; the MMBench
prompt has none, and its apostrophe is U+2019. Both are kept (``Protocol.prompt_suffix``), since they change
what the released model answers.

The shapes world's held-out files are asked the way the world's models were trained: the checkpoint's own
chat template with the image first (``<|image|>\\n{q}``), and captions in the plain pre-training form
(the image alone, then the caption).
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from owl2.config import IMAGE_PLACEHOLDER

KINDS = ("vqa", "choice", "yes_no", "caption", "text", "chat")
"""What an item asks for, which decides its metric: VQA accuracy, option letter, MME yes/no, CIDEr, exact match."""

SHORT_ANSWER = "Answer the question using a single word or phrase."
CHOICE_INSTRUCTION = "Answer with the option\u2019s letter from the given choices directly."
CAPTION_INSTRUCTION = "Provide a one-sentence caption for the provided image."
MME_YES_NO = "Please answer yes or no."
OPTION_LETTERS = "ABCD"


@dataclass(frozen=True)
class Protocol:
    """How a benchmark is asked and decoded: the official script's prompt format and ``generate()`` arguments."""

    max_new_tokens: int = 10
    min_new_tokens: int = 1
    template: str | None = "mplug_owl2"
    """Chat template; ``None``: the model's own (its training template), ``plain``: the images alone."""
    image_token_at_front: bool = False
    """Render as in training (``<|image|>\\n{text}``) instead of leaving placeholders where the loader put them."""
    prompt_suffix: str = ""
    """Text after the final ``ASSISTANT:``."""
    stop_strings: tuple[str, ...] = ()


VQA_PROTOCOL = Protocol(max_new_tokens=10, prompt_suffix=" ")
CHOICE_PROTOCOL = Protocol(max_new_tokens=10)
MME_PROTOCOL = Protocol(max_new_tokens=10, prompt_suffix=" ")
CAPTION_PROTOCOL = Protocol(max_new_tokens=60, min_new_tokens=8, prompt_suffix=" ")
SHAPES_QA_PROTOCOL = Protocol(max_new_tokens=10, template=None, image_token_at_front=True)
SHAPES_CAPTION_PROTOCOL = Protocol(max_new_tokens=60, min_new_tokens=8, template="plain")


@dataclass
class EvalItem:
    """One question of a benchmark."""

    id: str
    kind: str
    """One of :data:`KINDS`."""
    messages: list[dict[str, str]]
    """``[{"role": "user"|"assistant", "content": ...}, ...]`` ending with the user's turn (the prompt)."""
    images: list[str | bytes] = field(default_factory=list)
    """One per placeholder, in order: a local path, a URI or the encoded file's bytes."""
    answers: list[str] = field(default_factory=list)
    """Reference answers (empty when the split has none, e.g. a test server split)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Anything the metric or a reader of the predictions needs (question type, options, subtask, image name)."""
    protocol: Protocol = field(default_factory=Protocol)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"item {self.id}: kind {self.kind!r} must be one of {KINDS}")
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in self.messages if m["role"] == "user")
        if placeholders != len(self.images):
            raise ValueError(
                f"item {self.id}: {placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(self.images)} images"
            )

    @property
    def question(self) -> str:
        """The last user turn without its placeholders."""
        return self.messages[-1]["content"].replace(IMAGE_PLACEHOLDER, "").strip()


def _ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _resolve(image: str, root: str | Path | None) -> str:
    """An image path from a data file, made absolute against ``root`` unless it is absolute or a URI."""
    if "://" in image or root is None or Path(image).is_absolute():
        return image
    root = str(root)
    return f"{root.rstrip('/')}/{image}" if "://" in root else str(Path(root) / image)


def _read_records(path: Path) -> list[dict[str, Any]]:
    """A JSON array or JSONL file (the Qwen-VL ``*.jsonl`` VQA files are JSON arrays despite their name)."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(stripped)
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not a JSON object: {error}") from error
    if not all(isinstance(record, dict) for record in records):
        raise ValueError(f"{path}: every record must be a JSON object")
    return records


def _answers(record: dict[str, Any]) -> list[str]:
    """``answers`` (strings, or VQAv2 annotation dicts ``{"answer": ...}``) or ``answer`` (a string or a list)."""
    value = record.get("answers", record.get("answer"))
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [str(value)]
    return [str(entry["answer"]) if isinstance(entry, dict) else str(entry) for entry in value]


def _limit(items: list[EvalItem], limit: int | None) -> list[EvalItem]:
    return items if limit is None else items[:limit]


# --------------------------------------------------------------------------------------------------
# VQA (VQAv2, OK-VQA, TextVQA, GQA ... in the Qwen-VL / mPLUG-Owl2 evaluation format)
# --------------------------------------------------------------------------------------------------


def load_vqa(path: str | Path, image_root: str | Path | None = None, limit: int | None = None) -> list[EvalItem]:
    """VQA records ``{"question_id" | "id", "image", "question", "answer" | "answers", ...}`` (JSON or JSONL).

    Relative image paths are under ``image_root`` (default: the file's folder). Extra fields (e.g.
    ``question_type``) go to ``meta``.
    """
    path = Path(path)
    root = image_root if image_root is not None else path.parent
    items = []
    for number, record in enumerate(_read_records(path)):
        missing = [key for key in ("image", "question") if key not in record]
        if missing:
            raise ValueError(f"{path}: record {number} lacks {missing}")
        question_id = record.get("question_id", record.get("id", number))
        meta = {k: v for k, v in record.items() if k not in ("image", "question", "answer", "answers")}
        items.append(
            EvalItem(
                id=str(question_id),
                kind="vqa",
                messages=_ask(f"{IMAGE_PLACEHOLDER}{record['question']} {SHORT_ANSWER}"),
                images=[_resolve(str(record["image"]), root)],
                answers=_answers(record),
                meta=meta,
                protocol=VQA_PROTOCOL,
            )
        )
    return _limit(items, limit)


# --------------------------------------------------------------------------------------------------
# MMBench (the official TSV: images inline as base64)
# --------------------------------------------------------------------------------------------------


def _blank(value: str | None) -> bool:
    # pandas writes NaN as an empty field; some exports spell it out.
    return value is None or value.strip() in ("", "nan", "NaN")


def mmbench_prompt(question: str, options: dict[str, str], hint: str | None) -> str:
    """The user turn of the official MMBench prompt (the hint is ``N/A`` when there is none)."""
    choices = "\n".join(f"{letter}. {text}" for letter, text in options.items())
    hint_text = "N/A" if _blank(hint) else hint
    return f"{IMAGE_PLACEHOLDER}{hint_text}\n{question}\n{choices}\n{CHOICE_INSTRUCTION}"


def load_mmbench(path: str | Path, limit: int | None = None) -> list[EvalItem]:
    """An MMBench / CCBench TSV: ``index, question, hint, A..D, answer, image (base64)`` plus category columns.

    Missing options are skipped (as the official converter does), a missing hint becomes ``N/A``; ``answer``
    may be absent (test splits). ``meta`` holds ``index``, ``options`` ({letter: text}) and the remaining
    columns (``category``, ``l2-category``, ``source``, ``split`` ...). Each row is scored on its own; MMBench's
    CircularEval, which groups the rows of rotated options, is left to its evaluation server.
    """
    path = Path(path)
    csv.field_size_limit(sys.maxsize)  # base64 images are far larger than csv's 128 KiB default field limit
    items = []
    with path.open(encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file, delimiter="\t")
        missing = [column for column in ("index", "question", "image") if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: MMBench TSV lacks column(s) {missing}; has {reader.fieldnames}")
        for number, row in enumerate(reader, start=2):
            options = {letter: row[letter] for letter in OPTION_LETTERS if not _blank(row.get(letter))}
            try:
                image = base64.b64decode(row["image"], validate=False)
            except (binascii.Error, ValueError) as error:
                raise ValueError(f"{path}:{number}: image is not base64: {error}") from error
            answer = row.get("answer")
            skipped = {"question", "hint", "image", "answer", *OPTION_LETTERS}
            meta = {k: v for k, v in row.items() if k not in skipped and k is not None}
            items.append(
                EvalItem(
                    id=str(row["index"]),
                    kind="choice",
                    messages=_ask(mmbench_prompt(row["question"], options, row.get("hint"))),
                    images=[image],
                    answers=[] if _blank(answer) else [answer.strip().upper()],
                    meta={**meta, "options": options},
                    protocol=CHOICE_PROTOCOL,
                )
            )
    return _limit(items, limit)


# --------------------------------------------------------------------------------------------------
# MME (the release folder: one folder per subtask)
# --------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def mme_prompt(question: str) -> str:
    """The official MME user turn: "Please answer yes or no." is dropped, the short-answer instruction added."""
    # The official script removes the phrase from the formatted prompt, leaving the space before it.
    return f"{IMAGE_PLACEHOLDER}{question}\n{SHORT_ANSWER}".replace(MME_YES_NO, "")


def _mme_pairs(folder: Path) -> Iterable[tuple[Path, Path]]:
    """(question file, image) of one subtask, in either of the release's two layouts."""
    if (folder / "questions_answers_YN").is_dir():
        # landmark, artwork, celebrity, posters, scene: images/ and questions_answers_YN/ side by side.
        images = {p.stem: p for p in (folder / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
        for text in sorted((folder / "questions_answers_YN").glob("*.txt")):
            if text.stem not in images:
                raise ValueError(f"{text}: no image {text.stem}.* in {folder / 'images'}")
            yield text, images[text.stem]
        return
    images = {p.stem: p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    for text in sorted(folder.glob("*.txt")):
        if text.stem not in images:
            raise ValueError(f"{text}: no image {text.stem}.* beside it")
        yield text, images[text.stem]


def load_mme(root: str | Path, limit: int | None = None) -> list[EvalItem]:
    """The MME release folder: ``{subtask}/`` holding images and same-named ``*.txt`` files of
    ``question \\t answer`` lines (two per image), or ``{subtask}/images/`` + ``{subtask}/questions_answers_YN/``.

    Subtasks are the sub-folders in name order; ``meta`` has ``category`` (the subtask) and ``image`` (the
    image's file name), which :func:`owl2.eval.metrics.mme_scores` pairs for acc+.
    """
    root = Path(root)
    subtasks = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "eval_tool")))
    if not subtasks:
        raise ValueError(f"{root}: no subtask folders (expected e.g. existence/, count/, OCR/ ...)")
    items = []
    for folder in subtasks:
        for text, image in _mme_pairs(folder):
            for number, line in enumerate(text.read_text(encoding="utf-8").splitlines(), start=1):
                if not line.strip():
                    continue
                parts = line.rstrip("\r").split("\t")
                if len(parts) != 2:
                    raise ValueError(f"{text}:{number}: expected 'question<TAB>answer', got {line!r}")
                question, answer = parts[0].strip(), parts[1].strip()
                items.append(
                    EvalItem(
                        id=f"{folder.name}/{image.name}/{number}",
                        kind="yes_no",
                        messages=_ask(mme_prompt(question)),
                        images=[str(image)],
                        answers=[answer],
                        meta={"category": folder.name, "image": image.name, "question": question},
                        protocol=MME_PROTOCOL,
                    )
                )
    return _limit(items, limit)


# --------------------------------------------------------------------------------------------------
# Captions (COCO format: COCO, Flickr30K Karpathy test, NoCaps)
# --------------------------------------------------------------------------------------------------


def load_captions(
    path: str | Path,
    image_root: str | Path | None = None,
    limit: int | None = None,
    protocol: Protocol = CAPTION_PROTOCOL,
) -> list[EvalItem]:
    """COCO-format references ``{"images": [{"id", "file_name" | "image"}], "annotations": [{"image_id",
    "caption"}]}``: one item per image (id = the image id), all its captions as answers.

    Relative image paths are under ``image_root`` (default: the file's folder).
    """
    path = Path(path)
    root = image_root if image_root is not None else path.parent
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{path}: not a COCO caption file (needs 'images' and 'annotations')")
    references: dict[Any, list[str]] = {}
    for annotation in data["annotations"]:
        references.setdefault(annotation["image_id"], []).append(str(annotation["caption"]))
    items = []
    for image in data["images"]:
        name = image.get("file_name", image.get("image"))
        if name is None:
            raise ValueError(f"{path}: image {image.get('id')} has neither 'file_name' nor 'image'")
        messages = _ask(IMAGE_PLACEHOLDER if protocol.template == "plain" else IMAGE_PLACEHOLDER + CAPTION_INSTRUCTION)
        items.append(
            EvalItem(
                id=str(image["id"]),
                kind="caption",
                messages=messages,
                images=[_resolve(str(name), root)],
                answers=references.get(image["id"], []),
                meta={"image_id": image["id"], "file_name": name},
                protocol=protocol,
            )
        )
    return _limit(items, limit)


# --------------------------------------------------------------------------------------------------
# The shapes world's held-out splits (owl2.data.synth)
# --------------------------------------------------------------------------------------------------


def load_world(root: str | Path) -> dict[str, Any]:
    """The shapes world's ``world.json`` (question types, chance levels, sizes)."""
    path = Path(root) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not a shapes world (no world.json); write one with `owl2 data synth`")
    return json.loads(path.read_text(encoding="utf-8"))


def load_shapes(root: str | Path, limit: int | None = None) -> dict[str, list[EvalItem]]:
    """The held-out splits of a shapes world: ``{"vqa": ..., "captions": ..., "text": ...}``.

    VQA items keep ``question_type`` in ``meta``; ``limit`` applies to each split.
    """
    root = Path(root)
    load_world(root)
    vqa = []
    for record in _read_records(root / "eval" / "vqa_heldout.jsonl"):
        vqa.append(
            EvalItem(
                id=str(record["id"]),
                kind="vqa",
                messages=_ask(IMAGE_PLACEHOLDER + record["question"]),
                images=[_resolve(record["image"], root)],
                answers=_answers(record),
                meta={"question_type": record["question_type"], "image": record["image"]},
                protocol=SHAPES_QA_PROTOCOL,
            )
        )
    text = [
        EvalItem(
            id=str(record["id"]),
            kind="text",
            messages=_ask(record["question"]),
            answers=[record["answer"]],
            meta={"task": str(record["id"]).split("-", 1)[0]},
            protocol=SHAPES_QA_PROTOCOL,
        )
        for record in _read_records(root / "eval" / "text_heldout.jsonl")
    ]
    captions = load_captions(root / "eval" / "captions_heldout.json", root, protocol=SHAPES_CAPTION_PROTOCOL)
    return {"vqa": _limit(vqa, limit), "captions": _limit(captions, limit), "text": _limit(text, limit)}
