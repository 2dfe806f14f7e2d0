"""The shapes world on disk: :func:`generate_world` writes every format the readers consume.

Layout (paths relative to the world's folder; split = ``train`` | ``heldout``)::

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

The scenes, captions and questions come from :mod:`owl2.data.synth`. The same seed and sizes give
byte-identical files.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from owl2.config import ConfigError
from owl2.data.synth import (
    ANSWERS,
    BACKGROUND_RGB,
    COLOR_RGB,
    COLORS,
    NUMBER_WORDS,
    POSITIONS,
    QUESTION_TEXT,
    QUESTION_TYPES,
    SHAPES,
    Scene,
    TextItem,
    check_image_size,
    contrast_questions,
    describe,
    num_layouts,
    questions,
    random_scene,
    render,
    split_text_task,
)
from owl2.data.templates import TEMPLATES

FORMAT_VERSION = 3
TOKENIZER_VOCAB_SIZE = 512
"""Within the ``tiny-cpu`` decoder's 1024; enough merges that every word of the world is one piece (punctuation
its own). SentencePiece refuses sizes beyond what its text supports (768 for this world)."""
SHARD_SIZE = 200
LLAVA_IMAGE_TOKEN = "<image>"
TEXT_TEMPLATES = (
    "What number comes after N?",
    "What number comes before N?",
    "What is A plus B?",
    "What is A minus B?",
)
"""The number task's question forms (:func:`owl2.data.synth.text_task`), as ``world.json`` lists them."""
_OUTPUTS = ("images", "captions", "llava", "wds", "eval", "tokenizer", "world.json")


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
    """Write the shapes world (the layout above) to ``out_dir`` and return the content of its ``world.json``.

    Held-out images show layouts (which shape of which colour in which cell) that no training image shows.
    ``out_dir`` may be missing or hold an earlier world, whose files are replaced; other files make it refuse.
    """
    _check_sizes(num_train, num_heldout, image_size)
    out = Path(out_dir)
    _prepare(out)

    train = _make_images("train", random.Random(f"shapes-world/{seed}/train"), num_train)
    trained = {image.scene.layout for image in train}
    heldout = _make_images(
        "heldout", random.Random(f"shapes-world/{seed}/heldout"), num_heldout, avoid=trained, distinct=True
    )
    text_train, text_heldout = split_text_task(random.Random(f"shapes-world/{seed}/text"))
    counts = {
        split: _write_split(
            out, split, images, text_items, random.Random(f"shapes-world/{seed}/{split}/records"), image_size
        )
        for split, images, text_items in (("train", train, text_train), ("heldout", heldout, text_heldout))
    }
    _write_eval_files(out / "eval", heldout, text_heldout)
    vocab_size = _write_tokenizer(out / "tokenizer", _tokenizer_corpus(train + heldout, text_train + text_heldout))

    world = {
        "format_version": FORMAT_VERSION,
        "name": "shapes-world",
        "seed": seed,
        "sizes": {"train": num_train, "heldout": num_heldout},
        "image_size": image_size,
        **_vocabulary(),
        "counts": counts,
        "text_task": {
            "templates": list(TEXT_TEMPLATES),
            "train_items": len(text_train),
            "heldout_items": len(text_heldout),
        },
        "tokenizer": {"path": "tokenizer", "vocab_size": vocab_size, "type": "sentencepiece-bpe"},
    }
    _write_json(out / "world.json", world)
    return world


def _check_sizes(num_train: int, num_heldout: int, image_size: int) -> None:
    if num_train < 1 or num_heldout < 1:
        raise ConfigError(f"need at least one train and one held-out image, got {num_train} and {num_heldout}")
    check_image_size(image_size)
    if num_heldout > num_layouts() - min(num_train, num_layouts()):
        raise ConfigError(f"{num_train} + {num_heldout} images exceed the {num_layouts()} distinct layouts")


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


def _write_split(
    out: Path, split: str, images: Sequence[_Image], text_items: Sequence[TextItem], rng: random.Random, image_size: int
) -> dict[str, Any]:
    """Write one split's images, captions, webdataset shards and LLaVA records; return its ``world.json`` counts."""
    (out / "images" / split).mkdir(parents=True)
    encoded = [_png_bytes(render(image.scene, image_size)) for image in images]
    for image, data in zip(images, encoded, strict=True):
        (out / image.path).write_bytes(data)
    _write_jsonl(
        out / "captions" / f"{split}.jsonl",
        ({"id": image.id, "image": image.path, "caption": image.caption} for image in images),
    )
    shards = _write_shards(out / "wds", split, images, encoded)
    # Train text questions repeat over the records (about one text turn per two images) so the text task keeps
    # a steady share of the mixture; held-out text items appear once each.
    text_turns = max(len(text_items), len(images) // 2) if split == "train" else len(text_items)
    records = _llava_records(images, text_items, text_turns, rng, split)
    _write_json(out / "llava" / f"{split}.json", records)
    return {
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


def _write_eval_files(folder: Path, heldout: Sequence[_Image], text_heldout: Sequence[TextItem]) -> None:
    """The held-out evaluation files: VQA, COCO captions and the text task."""
    _write_jsonl(
        folder / "vqa_heldout.jsonl",
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
        folder / "captions_heldout.json",
        {
            "images": [{"id": image.index, "file_name": image.path} for image in heldout],
            "annotations": [
                {"image_id": image.index, "id": image.index, "caption": image.caption} for image in heldout
            ],
        },
    )
    _write_jsonl(folder / "text_heldout.jsonl", (vars(item) for item in text_heldout))


def _vocabulary() -> dict[str, Any]:
    """The ``world.json`` entries that describe the scene model, the same for every seed and size."""
    return {
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
    }


def _tokenizer_corpus(images: Sequence[_Image], text_items: Sequence[TextItem]) -> list[str]:
    """The tokenizer's training text: every word in every form, then the world's captions, questions and answers."""
    corpus = _coverage_text()
    for image in images:
        corpus.append(image.caption)
        corpus.extend(f"{question} {answer}" for _, question, answer in image.questions)
    corpus.extend(f"{item.question} {item.answer}" for item in text_items)
    return corpus


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
    """Train the SentencePiece BPE model on ``corpus`` into ``folder`` with transformers' config files; return
    its vocabulary size."""
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
