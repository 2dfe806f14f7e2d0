"""The synthetic "shapes world": the data of the CPU end-to-end demo and of the tests.

Each image is a square canvas split into a 2x2 grid; each cell is empty or holds one large shape (circle,
square, triangle) in one colour (red, green, blue, yellow), 1-3 shapes per image. Captions follow a fixed
grammar, VQA answers are determined by the pixels, and a text-only number task checks that the decoder
still learns language. The vocabulary is closed and small, so a 4-layer, 128-wide decoder with a 64-wide ViT
learns it in minutes on a CPU.

This module is the scene and question model; :func:`owl2.data.world.generate_world` writes a world of it to
disk in every format the readers consume.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from owl2.config import ConfigError

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
    check_image_size(size)
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


def check_image_size(size: int) -> None:
    """Refuse an image side that :func:`render` cannot split into two equal cells or that is too small to read."""
    if size < 32 or size % 2:
        raise ConfigError(f"image size must be even and at least 32 pixels, got {size}")


def num_layouts() -> int:
    """How many distinct layouts (:attr:`Scene.layout`) :func:`random_scene` can draw."""
    kinds = len(SHAPES) * len(COLORS)
    return sum(math.comb(len(POSITIONS), k) * kinds**k for k in range(1, MAX_SHAPES + 1))
