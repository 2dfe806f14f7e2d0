"""The synthetic "shapes world": the data of the CPU end-to-end demo and of the tests.

Each image is a square canvas split into a 2x2 grid; each cell is empty or holds one large shape (circle,
square, triangle) in one colour (red, green, blue, yellow), 1-3 shapes per image. Captions follow a fixed
grammar, VQA answers are determined by the pixels, and a text-only number task checks that the decoder
still learns language. The vocabulary is closed and small, so a 4-layer, 128-wide decoder with a 64-wide ViT
learns it in minutes on a CPU.

:func:`generate_world` writes every format the readers consume (image folders, caption JSONL, LLaVA JSON,
webdataset shards, held-out evaluation files), a SentencePiece tokenizer trained on the world's text and
``world.json`` describing all of it. The same seed and sizes give byte-identical files.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import random
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from owl2.config import ConfigError
from owl2.data.templates import TEMPLATES

FORMAT_VERSION = 3

POSITIONS = ("top left", "top right", "bottom left", "bottom right")
"""Cell names in reading order: index ``row * 2 + column``."""
SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
COLOR_RGB = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
BACKGROUND_RGB = {"white": (255, 255, 255), "light grey": (225, 225, 225)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MAX_SHAPES = 3

QUESTION_TYPES = ("color", "shape", "count", "position", "yes_no")
ANSWERS: dict[str, tuple[str, ...]] = {
    "color": COLORS,
    "shape": SHAPES,
    "count": NUMBER_WORDS[1 : MAX_SHAPES + 1],
    "position": POSITIONS,
    "yes_no": ("yes", "no"),
    "text": NUMBER_WORDS,
}
"""Every possible answer of each question type (``text`` is the text-only task)."""

TOKENIZER_VOCAB_SIZE = 512
"""Within the ``tiny-cpu`` decoder's 1024; enough merges that every word of the world is one piece (punctuation
its own). SentencePiece refuses sizes beyond what its text supports (768 for this world)."""
SHARD_SIZE = 200
LLAVA_IMAGE_TOKEN = "<image>"
TEXT_HELDOUT_FRACTION = 0.2
# Relative shape size and the gap kept to the cell border, so shapes of neighbouring cells never touch.
SCALE_RANGE = (0.7, 0.9)
CELL_MARGIN = 0.05


@dataclass(frozen=True)
class Shape:
    """One shape in a cell; ``scale`` is its side over the cell's, ``dx``/``dy`` (0..1) place it in the free room."""

    shape: str
    color: str
    scale: float = 0.8
    dx: float = 0.5
    dy: float = 0.5

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A 2x2 grid, ``cells[i]`` at ``POSITIONS[i]``, each empty (``None``) or holding one :class:`Shape`."""

    cells: tuple[Shape | None, Shape | None, Shape | None, Shape | None]
    background: str = "white"

    def __post_init__(self) -> None:
        if len(self.cells) != len(POSITIONS):
            raise ValueError(f"a scene has {len(POSITIONS)} cells, got {len(self.cells)}")
        for cell in self.cells:
            if cell is not None and (cell.shape not in SHAPES or cell.color not in COLORS):
                raise ValueError(f"unknown shape or colour {cell.name!r}")
        if self.background not in BACKGROUND_RGB:
            raise ValueError(f"unknown background {self.background!r}")

    @property
    def objects(self) -> list[tuple[str, Shape]]:
        """(position, shape) of the occupied cells in reading order."""
        return [(position, cell) for position, cell in zip(POSITIONS, self.cells, strict=True) if cell is not None]

    @property
    def layout(self) -> tuple[str | None, ...]:
        """What the scene shows, ignoring size, placement and background: two scenes with equal layouts have
        the same caption and the same true answer to every question."""
        return tuple(cell.name if cell else None for cell in self.cells)


def random_scene(rng: random.Random) -> Scene:
    """A scene with 1-3 shapes in distinct cells; the count is uniform so count answers are balanced."""
    count = rng.randint(1, MAX_SHAPES)
    occupied = set(rng.sample(range(len(POSITIONS)), count))
    cells = tuple(
        Shape(rng.choice(SHAPES), rng.choice(COLORS), rng.uniform(*SCALE_RANGE), rng.random(), rng.random())
        if index in occupied
        else None
        for index in range(len(POSITIONS))
    )
    return Scene(cells, rng.choice(tuple(BACKGROUND_RGB)))


def render(scene: Scene, size: int = 112) -> Image.Image:
    """Draw ``scene`` on a ``size`` x ``size`` RGB canvas.

    PIL draws without anti-aliasing, so every pixel is exactly the background or one shape colour: the pixels
    alone determine the scene (the tests read it back).
    """
    _check_image_size(size)
    image = Image.new("RGB", (size, size), BACKGROUND_RGB[scene.background])
    draw = ImageDraw.Draw(image)
    cell = size // 2
    margin = max(1, round(CELL_MARGIN * cell))
    for index, item in enumerate(scene.cells):
        if item is None:
            continue
        side = max(4, min(cell - 2 * margin, round(item.scale * cell)))
        free = cell - 2 * margin - side
        x0 = (index % 2) * cell + margin + round(item.dx * free)
        y0 = (index // 2) * cell + margin + round(item.dy * free)
        x1, y1 = x0 + side - 1, y0 + side - 1
        fill = COLOR_RGB[item.color]
        if item.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif item.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


def describe(scene: Scene) -> str:
    """The caption: ``"at the top left a red circle and at the bottom right a blue square."``.

    Each cell's position comes before what it holds, so captioning already trains what the questions ask
    of a cell (the shape at a position): a tiny model from random weights learns the questions far sooner.
    """
    parts = [f"at the {position} a {item.name}" for position, item in scene.objects]
    if not parts:
        return "nothing."
    if len(parts) == 1:
        return f"{parts[0]}."
    return f"{', '.join(parts[:-1])} and {parts[-1]}."


QUESTION_TEXT = {
    "color": "What color is the shape at the {}?",
    "shape": "What shape is at the {}?",
    "position": "Where is the {}?",
    "yes_no": "Is there a {}?",
}
"""Each question type's wording; the blank is a cell (``color``, ``shape``) or a colour-shape pair."""


def _present_and_absent(names: Counter[str]) -> tuple[list[str], list[str]]:
    """The colour-shape pairs a scene shows (``names``: pair -> count) and those it does not."""
    absent = [f"{color} {shape}" for color in COLORS for shape in SHAPES if f"{color} {shape}" not in names]
    return sorted(names), absent


def questions(scene: Scene, rng: random.Random, yes: bool | None = None) -> list[tuple[str, str, str]]:
    """(type, question, answer) of every type in :data:`QUESTION_TYPES` order, each answered by the image.

    ``color`` and ``shape`` ask about a random occupied cell; ``position`` asks about a colour-shape pair
    that occurs exactly once (omitted when none does); ``yes_no`` asks about a present pair when ``yes`` is
    true, an absent one otherwise (``None``: a fair coin; callers pass a balanced sequence).
    """
    objects = scene.objects
    if not objects:
        raise ValueError("a scene without shapes has no questions")
    color_at, color_item = rng.choice(objects)
    shape_at, shape_item = rng.choice(objects)
    result = [
        ("color", QUESTION_TEXT["color"].format(color_at), color_item.color),
        ("shape", QUESTION_TEXT["shape"].format(shape_at), shape_item.shape),
        ("count", "How many shapes are there?", NUMBER_WORDS[len(objects)]),
    ]
    names = Counter(item.name for _, item in objects)
    unique = [(position, item) for position, item in objects if names[item.name] == 1]
    if unique:
        position, item = rng.choice(unique)
        result.append(("position", QUESTION_TEXT["position"].format(item.name), position))
    if yes is None:
        yes = rng.random() < 0.5
    present, absent = _present_and_absent(names)
    asked = rng.choice(present if yes else absent)
    result.append(("yes_no", QUESTION_TEXT["yes_no"].format(asked), "yes" if yes else "no"))
    return result


def contrast_questions(
    scene: Scene, asked: Sequence[tuple[str, str, str]], rng: random.Random
) -> list[tuple[str, str, str]]:
    """Training-only questions that contrast with ``asked`` (from :func:`questions`) on the same image.

    ``color`` and ``shape`` get a sibling for every other occupied cell, ``position`` one for every other
    colour-shape pair that occurs once, and ``yes_no`` its opposite (an absent pair after a present one, and
    the reverse). Answers that differ on one image can only come from looking at the right part of it:
    without them a tiny model from random weights settles on priors (``no`` to every yes/no question, the
    colour of whichever cell it attends to) and learns these types late or not at all.
    """
    names = Counter(item.name for _, item in scene.objects)
    result = []
    for kind, question, answer in asked:
        if kind in ("color", "shape"):
            for position, item in scene.objects:
                sibling = QUESTION_TEXT[kind].format(position)
                if sibling != question:
                    result.append((kind, sibling, item.color if kind == "color" else item.shape))
        elif kind == "position":
            for position, item in scene.objects:
                sibling = QUESTION_TEXT["position"].format(item.name)
                if names[item.name] == 1 and sibling != question:
                    result.append(("position", sibling, position))
        elif kind == "yes_no":
            present, absent = _present_and_absent(names)
            pair = rng.choice(absent if answer == "yes" else present)
            result.append(("yes_no", QUESTION_TEXT["yes_no"].format(pair), "no" if answer == "yes" else "yes"))
    return result


@dataclass(frozen=True)
class TextItem:
    """One question of the text-only number task."""

    id: str
    question: str
    answer: str


def text_task() -> tuple[list[TextItem], dict[str, list[str]]]:
    """All items of the number task over zero..ten, and for each item the ids of its *twins*.

    Templates: "What number comes after/before N?" and "What is A plus/minus B?" (results within zero..ten).
    A twin asks for the same answer in another form (``A plus B`` / ``B plus A``; ``after N`` / ``N plus
    one``; ``before N`` / ``N minus one``), so a held-out item whose twins are trained tests whether the
    model learned the relation rather than memorised the string.
    """
    n = len(NUMBER_WORDS) - 1
    word = NUMBER_WORDS
    items = [TextItem(f"after-{a}", f"What number comes after {word[a]}?", word[a + 1]) for a in range(n)]
    items += [TextItem(f"before-{a}", f"What number comes before {word[a]}?", word[a - 1]) for a in range(1, n + 1)]
    pairs = [(a, b) for a in range(n + 1) for b in range(n + 1)]
    items += [
        TextItem(f"plus-{a}-{b}", f"What is {word[a]} plus {word[b]}?", word[a + b]) for a, b in pairs if a + b <= n
    ]
    items += [
        TextItem(f"minus-{a}-{b}", f"What is {word[a]} minus {word[b]}?", word[a - b]) for a, b in pairs if b <= a
    ]
    twins: dict[str, list[str]] = {item.id: [] for item in items}

    def link(first: str, second: str) -> None:
        twins[first].append(second)
        twins[second].append(first)

    for a in range(n):
        link(f"after-{a}", f"plus-{a}-1")
        link(f"before-{a + 1}", f"minus-{a + 1}-1")
    for a, b in pairs:
        if a < b and a + b <= n:
            link(f"plus-{a}-{b}", f"plus-{b}-{a}")
    return items, twins


def split_text_task(rng: random.Random) -> tuple[list[TextItem], list[TextItem]]:
    """(train, heldout): about :data:`TEXT_HELDOUT_FRACTION` of the items, each with all its twins in train."""
    items, twins = text_task()
    target = round(TEXT_HELDOUT_FRACTION * len(items))
    candidates = [item.id for item in items if twins[item.id]]
    rng.shuffle(candidates)
    heldout: set[str] = set()
    for item_id in candidates:
        if len(heldout) == target:
            break
        if not heldout.intersection(twins[item_id]):
            heldout.add(item_id)
    return [item for item in items if item.id not in heldout], [item for item in items if item.id in heldout]


@dataclass(frozen=True)
class _Image:
    id: str
    index: int
    path: str
    scene: Scene
    caption: str
    questions: list[tuple[str, str, str]]


def generate_world(
    out_dir: str | Path, seed: int = 0, num_train: int = 2000, num_heldout: int = 200, image_size: int = 112
) -> dict[str, Any]:
    """Write the shapes world to ``out_dir`` and return the content of its ``world.json``.

    Layout (paths relative to ``out_dir``; split = ``train`` | ``heldout``)::

        images/{split}/{index:06d}.png      the images (index from 1)
        captions/{split}.jsonl              {"id", "image", "caption"} per image
        llava/{split}.json                  LLaVA-1.5 records: one per image (its questions and their
                                            contrasts), text-only records of 1-3 turns
        wds/{split}-{shard:06d}.tar         webdataset shards: {key}.png + {key}.txt (the caption)
        eval/vqa_heldout.jsonl              {"id", "image", "question", "answer", "answers", "question_type"}
        eval/captions_heldout.json          COCO captions of the held-out images
        eval/text_heldout.jsonl             {"id", "question", "answer"} of the held-out text items
        tokenizer/                          tokenizer.model (SentencePiece BPE) + transformers config files
        world.json                          seed, sizes, vocabulary, chance levels, counts

    Held-out images show layouts (which shape of which colour in which cell) that no training image shows.
    ``out_dir`` may be missing or hold an earlier world, whose files are replaced; other files make it refuse.
    """
    if num_train < 1 or num_heldout < 1:
        raise ConfigError(f"need at least one train and one held-out image, got {num_train} and {num_heldout}")
    _check_image_size(image_size)
    if num_heldout > _num_layouts() - min(num_train, _num_layouts()):
        raise ConfigError(f"{num_train} + {num_heldout} images exceed the {_num_layouts()} distinct layouts")
    out = Path(out_dir)
    _prepare(out)

    train = _make_images("train", random.Random(f"shapes-world/{seed}/train"), num_train)
    trained = {image.scene.layout for image in train}
    heldout = _make_images(
        "heldout", random.Random(f"shapes-world/{seed}/heldout"), num_heldout, avoid=trained, distinct=True
    )
    text_train, text_heldout = split_text_task(random.Random(f"shapes-world/{seed}/text"))

    counts: dict[str, Any] = {}
    for split, images, text_items in (("train", train, text_train), ("heldout", heldout, text_heldout)):
        rng = random.Random(f"shapes-world/{seed}/{split}/records")
        image_folder = out / "images" / split
        image_folder.mkdir(parents=True)
        encoded = []
        for image in images:
            data = _png_bytes(render(image.scene, image_size))
            (out / image.path).write_bytes(data)
            encoded.append(data)
        _write_jsonl(
            out / "captions" / f"{split}.jsonl",
            ({"id": image.id, "image": image.path, "caption": image.caption} for image in images),
        )
        shards = _write_shards(out / "wds", split, images, encoded)
        # Train text questions repeat over the records (about one text turn per two images) so the text
        # task keeps a steady share of the mixture; held-out text items appear once each.
        text_turns = max(len(text_items), len(images) // 2) if split == "train" else len(text_items)
        records = _llava_records(images, text_items, text_turns, rng, split)
        _write_json(out / "llava" / f"{split}.json", records)
        counts[split] = {
            "images": len(images),
            "captions": len(images),
            "wds_shards": shards,
            "llava_records": len(records),
            "llava_image_records": sum("image" in record for record in records),
            "llava_text_records": sum("image" not in record for record in records),
            "questions": dict(Counter(kind for image in images for kind, _, _ in image.questions)),
            "yes_no_answers": dict(
                Counter(answer for image in images for kind, _, answer in image.questions if kind == "yes_no")
            ),
            "text_items": len(text_items),
            "text_turns": text_turns,
        }

    _write_jsonl(
        out / "eval" / "vqa_heldout.jsonl",
        (
            {
                "id": f"{image.id}-{kind}",
                "image": image.path,
                "question": question,
                "answer": answer,
                "answers": [answer] * 10,
                "question_type": kind,
            }
            for image in heldout
            for kind, question, answer in image.questions
        ),
    )
    _write_json(
        out / "eval" / "captions_heldout.json",
        {
            "images": [{"id": image.index, "file_name": image.path} for image in heldout],
            "annotations": [
                {"image_id": image.index, "id": image.index, "caption": image.caption} for image in heldout
            ],
        },
    )
    _write_jsonl(out / "eval" / "text_heldout.jsonl", (vars(item) for item in text_heldout))

    corpus = _coverage_text()
    for image in train + heldout:
        corpus.append(image.caption)
        corpus.extend(f"{question} {answer}" for _, question, answer in image.questions)
    corpus.extend(f"{item.question} {item.answer}" for item in text_train + text_heldout)
    vocab_size = _write_tokenizer(out / "tokenizer", corpus)

    world = {
        "format_version": FORMAT_VERSION,
        "name": "shapes-world",
        "seed": seed,
        "sizes": {"train": num_train, "heldout": num_heldout},
        "image_size": image_size,
        "grid": {"rows": 2, "columns": 2, "cells": list(POSITIONS)},
        "vocabulary": {
            "colors": list(COLORS),
            "shapes": list(SHAPES),
            "positions": list(POSITIONS),
            "numbers": list(NUMBER_WORDS),
        },
        "colors_rgb": {name: list(rgb) for name, rgb in COLOR_RGB.items()},
        "backgrounds_rgb": {name: list(rgb) for name, rgb in BACKGROUND_RGB.items()},
        "question_types": list(QUESTION_TYPES),
        "answers": {kind: list(values) for kind, values in ANSWERS.items()},
        "chance": {kind: 1 / len(values) for kind, values in ANSWERS.items()},
        "counts": counts,
        "text_task": {
            "templates": [
                "What number comes after N?",
                "What number comes before N?",
                "What is A plus B?",
                "What is A minus B?",
            ],
            "train_items": len(text_train),
            "heldout_items": len(text_heldout),
        },
        "tokenizer": {"path": "tokenizer", "vocab_size": vocab_size, "type": "sentencepiece-bpe"},
    }
    _write_json(out / "world.json", world)
    return world


def _check_image_size(size: int) -> None:
    if size < 32 or size % 2:
        raise ConfigError(f"image size must be even and at least 32 pixels, got {size}")


def _num_layouts() -> int:
    kinds = len(SHAPES) * len(COLORS)
    return sum(math.comb(len(POSITIONS), k) * kinds**k for k in range(1, MAX_SHAPES + 1))


_OUTPUTS = ("images", "captions", "llava", "wds", "eval", "tokenizer", "world.json")


def _prepare(out: Path) -> None:
    """Clear an earlier world's files from ``out`` (it would leave extra shards and images behind); refuse to
    touch a folder that also holds anything else."""
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} is a file, not a folder")
        foreign = sorted(path.name for path in out.iterdir() if path.name not in _OUTPUTS)
        if foreign:
            raise FileExistsError(f"{out} holds files that are not part of a shapes world: {', '.join(foreign[:5])}")
        for name in _OUTPUTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _make_images(
    split: str,
    rng: random.Random,
    count: int,
    avoid: Iterable[tuple[str | None, ...]] = (),
    distinct: bool = False,
) -> list[_Image]:
    """``count`` images whose layouts are not in ``avoid`` (and, if ``distinct``, differ from each other)."""
    # An exactly balanced, shuffled yes/no sequence: a fair coin per image drifts on small splits.
    yes_answers = [index % 2 == 0 for index in range(count)]
    rng.shuffle(yes_answers)
    excluded = set(avoid)
    images = []
    for index in range(1, count + 1):
        scene = random_scene(rng)
        while scene.layout in excluded:
            scene = random_scene(rng)
        if distinct:
            excluded.add(scene.layout)
        images.append(
            _Image(
                id=f"{split}-{index:06d}",
                index=index,
                path=f"images/{split}/{index:06d}.png",
                scene=scene,
                caption=describe(scene),
                questions=questions(scene, rng, yes=yes_answers[index - 1]),
            )
        )
    return images


def _llava_records(
    images: Sequence[_Image], text_items: Sequence[TextItem], text_turns: int, rng: random.Random, split: str
) -> list[dict[str, Any]]:
    records = []
    for image in images:
        # One multi-turn record asks all of an image's questions and their contrasts, in a random order: every
        # encoded image supervises six to twelve answers, which a tiny model from random weights needs to learn
        # them in minutes.
        turns = list(image.questions) + contrast_questions(image.scene, image.questions, rng)
        rng.shuffle(turns)
        conversations = []
        for turn, (_, question, answer) in enumerate(turns):
            prompt = f"{LLAVA_IMAGE_TOKEN}\n{question}" if turn == 0 else question
            conversations += [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]
        records.append({"id": f"{image.id}-1", "image": image.path, "conversations": conversations})
    # Cycling through shuffled rounds uses every text item before repeating any.
    order: list[TextItem] = []
    while len(order) < text_turns:
        round_ = list(text_items)
        rng.shuffle(round_)
        order.extend(round_)
    for number, group in enumerate(_groups(order[:text_turns], rng), start=1):
        conversations = []
        for item in group:
            conversations += [{"from": "human", "value": item.question}, {"from": "gpt", "value": item.answer}]
        records.append({"id": f"{split}-text-{number:06d}", "conversations": conversations})
    # Mixed order, so a reader that does not shuffle still sees image and text records side by side.
    rng.shuffle(records)
    return records


def _groups(items: Sequence[Any], rng: random.Random) -> Iterator[Sequence[Any]]:
    """Consecutive groups of 1-3 items: single-turn and multi-turn records."""
    start = 0
    while start < len(items):
        size = rng.randint(1, 3)
        yield items[start : start + size]
        start += size


def _coverage_text() -> list[str]:
    """Every word of the world in every form a prompt shows it, whatever the seed and sizes: even a 2-image
    world's tokenizer knows every word, and :data:`TOKENIZER_VOCAB_SIZE` always fits (SentencePiece's ceiling
    depends only on the distinct words)."""
    lines = []
    for template in TEMPLATES.values():  # the prompt text the training code wraps every conversation in
        system = f"{template.system} " if template.system else ""
        lines.append(f"{system}{template.user}: {template.assistant}:")
    for color, shape, position in itertools.product(COLORS, SHAPES, POSITIONS):
        lines.append(f"a {color} {shape} at the {position}, a {color} {shape} at the {position} and")
        asked = [QUESTION_TEXT[kind].format(position) for kind in ("color", "shape")]
        asked += [QUESTION_TEXT[kind].format(f"{color} {shape}") for kind in ("position", "yes_no")]
        # Training renders an image turn as "<|image|>\n{question}": after the image the text starts with a
        # newline, so there the question's first word comes without SentencePiece's "▁".
        lines += [f"\n{question}" for question in [*asked, "How many shapes are there?"]]
    lines += [" ".join(values) for values in ANSWERS.values()]
    return lines


def _write_tokenizer(folder: Path, corpus: Iterable[str]) -> int:
    import sentencepiece as spm

    folder.mkdir(parents=True)
    model = io.BytesIO()
    # LLaMA's trainer settings; one thread and no sampling or shuffling keep the model byte-identical.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus)),
        model_writer=model,
        model_type="bpe",
        vocab_size=TOKENIZER_VOCAB_SIZE,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    vocab_size = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    _write_json(
        folder / "tokenizer_config.json",
        {
            **special,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "legacy": True,
            "model_max_length": 512,
            "pad_token": None,
            "padding_side": "right",
            "sp_model_kwargs": {},
            "tokenizer_class": "LlamaTokenizer",
        },
    )
    _write_json(folder / "special_tokens_map.json", special)
    return vocab_size


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_shards(folder: Path, split: str, images: Sequence[_Image], encoded: Sequence[bytes]) -> int:
    folder.mkdir(exist_ok=True)
    shards = 0
    for shards, start in enumerate(range(0, len(images), SHARD_SIZE), start=1):
        with tarfile.open(folder / f"{split}-{shards - 1:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for image, data in zip(
                images[start : start + SHARD_SIZE], encoded[start : start + SHARD_SIZE], strict=True
            ):
                _add_member(tar, f"{image.id}.png", data)
                _add_member(tar, f"{image.id}.txt", image.caption.encode("utf-8"))
    return shards


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata: the default would stamp the current time and user into every header.
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    tar.addfile(info, io.BytesIO(data))


def _write_json(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows]
    path.write_text("".join(lines), encoding="utf-8")
