"""The synthetic shapes world: determinism, answers read back from the pixels, every file format, tokenizer."""

import hashlib
import json
import random
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from owl2.cli import main
from owl2.data.synth import Scene, Shape, contrast_questions, describe, questions, render
from owl2.data.world import generate_world

# Written out here rather than imported, so a wrong vocabulary in the generator cannot pass unnoticed.
COLORS = {"red", "green", "blue", "yellow"}
SHAPES = {"circle", "square", "triangle"}
POSITIONS = ["top left", "top right", "bottom left", "bottom right"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@pytest.fixture(scope="module")
def sizes(shapes_world_args: dict[str, int]) -> tuple[int, int]:
    """(train, held-out) images of the shared world the format tests read."""
    return shapes_world_args["num_train"], shapes_world_args["num_heldout"]


@pytest.fixture(scope="module")
def worlds(
    tmp_path_factory: pytest.TempPathFactory, shapes_world: Path, shapes_world_args: dict[str, int]
) -> dict[str, Path]:
    """The shared world as ``a``, a world of the same arguments as ``b`` and one of another seed as ``c``."""
    root = tmp_path_factory.mktemp("worlds")
    seed, num_train, num_heldout = (shapes_world_args[key] for key in ("seed", "num_train", "num_heldout"))
    # "b" first holds a bigger world of another seed: regenerating must leave nothing of it behind.
    generate_world(root / "b", seed=seed + 1, num_train=num_train + 10, num_heldout=num_heldout + 5)
    generate_world(root / "b", **shapes_world_args)
    generate_world(root / "c", **{**shapes_world_args, "seed": seed + 1})
    return {"a": shapes_world, "b": root / "b", "c": root / "c"}


@pytest.fixture(scope="module")
def world_dir(shapes_world: Path) -> Path:
    return shapes_world


@pytest.fixture(scope="module")
def world(world_dir: Path) -> dict:
    return json.loads((world_dir / "world.json").read_text())


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _read_scene(path: Path, world: dict) -> dict[str, tuple[str, str]]:
    """position -> (colour, shape), from the pixels alone: the colour of the non-background pixels and how
    much of their bounding box they fill (square 1, circle pi/4, triangle 1/2)."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    cell = pixels.shape[0] // 2
    background = pixels[0, 0]
    palette = {name: np.array(rgb) for name, rgb in world["colors_rgb"].items()}
    found = {}
    for index, position in enumerate(POSITIONS):
        row, column = divmod(index, 2)
        block = pixels[row * cell : (row + 1) * cell, column * cell : (column + 1) * cell]
        mask = (block != background).any(axis=-1)
        if not mask.any():
            continue
        colours = {tuple(rgb) for rgb in block[mask]}
        assert len(colours) == 1, f"{path} {position}: a shape must be one flat colour, found {colours}"
        (rgb,) = colours
        color = next(name for name, value in palette.items() if tuple(value) == rgb)
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
        shape = "square" if fill > 0.92 else "circle" if fill > 0.65 else "triangle"
        found[position] = (color, shape)
    return found


def _expected_answer(question: str, scene: dict[str, tuple[str, str]]) -> str:
    if match := re.fullmatch(r"What color is the shape at the (.+)\?", question):
        return scene[match[1]][0]
    if match := re.fullmatch(r"What shape is at the (.+)\?", question):
        return scene[match[1]][1]
    if question == "How many shapes are there?":
        return NUMBERS[len(scene)]
    if match := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        (position,) = [where for where, item in scene.items() if item == (match[1], match[2])]
        return position
    if match := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):
        return "yes" if (match[1], match[2]) in scene.values() else "no"
    raise AssertionError(f"unknown question form: {question!r}")


def _caption_scene(caption: str) -> dict[str, tuple[str, str]]:
    items = re.findall(r"at the (top left|top right|bottom left|bottom right) a (\w+) (\w+)", caption)
    return {position: (color, shape) for position, color, shape in items}


def _text_answer(question: str) -> str:
    value = {word: number for number, word in enumerate(NUMBERS)}
    if match := re.fullmatch(r"What number comes after (\w+)\?", question):
        return NUMBERS[value[match[1]] + 1]
    if match := re.fullmatch(r"What number comes before (\w+)\?", question):
        return NUMBERS[value[match[1]] - 1]
    if match := re.fullmatch(r"What is (\w+) plus (\w+)\?", question):
        return NUMBERS[value[match[1]] + value[match[2]]]
    if match := re.fullmatch(r"What is (\w+) minus (\w+)\?", question):
        return NUMBERS[value[match[1]] - value[match[2]]]
    raise AssertionError(f"unknown text question: {question!r}")


# Determinism


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(
    worlds: dict[str, Path], sizes: tuple[int, int]
) -> None:
    a, b, c = (_hashes(worlds[name]) for name in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert sum(a[name] != c[name] for name in a) > sizes[0]  # images, captions, records all change


def test_generation_refuses_a_folder_holding_other_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        generate_world(tmp_path, num_train=2, num_heldout=1)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.txt"]


# The answers are those of the pixels


def test_heldout_vqa_answers_and_captions_match_the_pixels(
    world_dir: Path, world: dict, sizes: tuple[int, int]
) -> None:
    scenes = {}
    for record in _jsonl(world_dir / "eval" / "vqa_heldout.jsonl"):
        if record["image"] not in scenes:
            scenes[record["image"]] = _read_scene(world_dir / record["image"], world)
        assert record["answer"] == _expected_answer(record["question"], scenes[record["image"]]), record
    assert len(scenes) == sizes[1]
    for split in ("train", "heldout"):
        for record in _jsonl(world_dir / "captions" / f"{split}.jsonl"):
            assert _caption_scene(record["caption"]) == _read_scene(world_dir / record["image"], world), record


def test_llava_answers_match_the_pixels(world_dir: Path, world: dict) -> None:
    for split in ("train", "heldout"):
        records = json.loads((world_dir / "llava" / f"{split}.json").read_text())
        for record in random.Random(0).sample(records, min(40, len(records))):
            turns = record["conversations"]
            if "image" not in record:
                for human, gpt in zip(turns[::2], turns[1::2], strict=True):
                    assert gpt["value"] == _text_answer(human["value"]), record
                continue
            scene = _read_scene(world_dir / record["image"], world)
            for human, gpt in zip(turns[::2], turns[1::2], strict=True):
                assert gpt["value"] == _expected_answer(human["value"].removeprefix("<image>\n"), scene), record


def test_text_heldout_answers_are_right_and_unseen_in_training(world_dir: Path) -> None:
    heldout = _jsonl(world_dir / "eval" / "text_heldout.jsonl")
    assert heldout and all(set(record) == {"id", "question", "answer"} for record in heldout)
    assert all(record["answer"] == _text_answer(record["question"]) for record in heldout)
    train = json.loads((world_dir / "llava" / "train.json").read_text())
    trained = {turn["value"] for record in train if "image" not in record for turn in record["conversations"]}
    assert not trained & {record["question"] for record in heldout}


def test_heldout_images_show_layouts_no_training_image_shows(world_dir: Path, sizes: tuple[int, int]) -> None:
    train = {record["caption"] for record in _jsonl(world_dir / "captions" / "train.jsonl")}
    heldout = [record["caption"] for record in _jsonl(world_dir / "captions" / "heldout.jsonl")]
    assert len(set(heldout)) == len(heldout) == sizes[1]
    assert not train & set(heldout)


# Every format parses


def test_caption_jsonl(world_dir: Path, sizes: tuple[int, int]) -> None:
    for split, count in zip(("train", "heldout"), sizes, strict=True):
        records = _jsonl(world_dir / "captions" / f"{split}.jsonl")
        assert len(records) == len({record["id"] for record in records}) == count
        for record in records:
            assert set(record) == {"id", "image", "caption"}
            assert record["image"].startswith(f"images/{split}/") and (world_dir / record["image"]).is_file()
            assert record["caption"].startswith("at the ") and record["caption"].endswith(".")


def test_llava_json(world_dir: Path, world: dict) -> None:
    for split in ("train", "heldout"):
        records = json.loads((world_dir / "llava" / f"{split}.json").read_text())
        assert isinstance(records, list) and len({record["id"] for record in records}) == len(records)
        for record in records:
            turns = record["conversations"]
            assert turns and len(turns) % 2 == 0
            assert [turn["from"] for turn in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert all(isinstance(turn["value"], str) and turn["value"] for turn in turns)
            placeholders = [turn["value"].count("<image>") for turn in turns]
            if "image" in record:
                assert (world_dir / record["image"]).is_file()
                assert placeholders == [1] + [0] * (len(turns) - 1)
                assert turns[0]["value"].startswith("<image>\n")
            else:
                assert set(record) == {"id", "conversations"} and sum(placeholders) == 0
        lengths = Counter(len(record["conversations"]) // 2 for record in records if "image" in record)
        # Every question of an image and its contrasts: color and shape of each of its 1-3 shapes, count, two
        # yes/no and, when a colour-shape pair occurs once, one position question per such pair.
        assert set(lengths) <= set(range(6, 13)) and len(lengths) >= 2
        text_lengths = Counter(len(record["conversations"]) // 2 for record in records if "image" not in record)
        assert set(text_lengths) <= {1, 2, 3} and 1 in text_lengths  # single- and multi-turn text records
        assert any("image" not in record for record in records)
        counts = world["counts"][split]
        assert counts["llava_records"] == len(records)
        assert counts["llava_text_records"] == sum("image" not in record for record in records)


def test_webdataset_shards(world_dir: Path) -> None:
    for split in ("train", "heldout"):
        captions = {record["id"]: record for record in _jsonl(world_dir / "captions" / f"{split}.jsonl")}
        shards = sorted((world_dir / "wds").glob(f"{split}-*.tar"))
        assert [shard.name for shard in shards] == [f"{split}-{index:06d}.tar" for index in range(len(shards))]
        keys = []
        for shard in shards:
            with tarfile.open(shard) as tar:
                members = tar.getmembers()
                assert len(members) % 2 == 0
                for png, txt in zip(members[::2], members[1::2], strict=True):
                    key = png.name.removesuffix(".png")
                    assert png.name == f"{key}.png" and txt.name == f"{key}.txt" and "." not in key
                    assert png.mtime == txt.mtime == 0 and png.uid == png.gid == 0
                    record = captions[key]
                    assert tar.extractfile(txt).read().decode() == record["caption"]
                    assert tar.extractfile(png).read() == (world_dir / record["image"]).read_bytes()
                    keys.append(key)
        assert keys == list(captions)


def test_coco_captions_and_vqa_eval_files(world_dir: Path, world: dict, sizes: tuple[int, int]) -> None:
    coco = json.loads((world_dir / "eval" / "captions_heldout.json").read_text())
    image_ids = {image["id"] for image in coco["images"]}
    assert len(image_ids) == len(coco["images"]) == sizes[1]
    assert all((world_dir / image["file_name"]).is_file() for image in coco["images"])
    assert {annotation["image_id"] for annotation in coco["annotations"]} == image_ids
    assert len({annotation["id"] for annotation in coco["annotations"]}) == len(coco["annotations"])

    vqa = _jsonl(world_dir / "eval" / "vqa_heldout.jsonl")
    assert len({record["id"] for record in vqa}) == len(vqa)
    for record in vqa:
        assert set(record) == {"id", "image", "question", "answer", "answers", "question_type"}
        assert record["answers"] == [record["answer"]] * 10
        assert record["answer"] in world["answers"][record["question_type"]]
    assert dict(Counter(record["question_type"] for record in vqa)) == world["counts"]["heldout"]["questions"]


# world.json


def test_world_vocabulary_and_chance_levels(world: dict, sizes: tuple[int, int]) -> None:
    answers = world["answers"]
    assert set(answers["color"]) == COLORS and set(answers["shape"]) == SHAPES
    assert answers["position"] == POSITIONS and answers["count"] == NUMBERS[1:4]
    assert set(answers["yes_no"]) == {"yes", "no"} and answers["text"] == NUMBERS
    assert world["chance"] == {kind: 1 / len(values) for kind, values in answers.items()}
    assert world["chance"]["yes_no"] == 0.5 and world["chance"]["count"] == 1 / 3
    assert world["vocabulary"]["positions"] == world["grid"]["cells"] == POSITIONS
    assert world["sizes"] == {"train": sizes[0], "heldout": sizes[1]} and world["image_size"] == 112


def test_question_types_are_balanced(world: dict, sizes: tuple[int, int]) -> None:
    for split, images in zip(("train", "heldout"), sizes, strict=True):
        counts = world["counts"][split]
        assert set(counts["questions"]) == set(world["question_types"])
        assert all(count >= 0.8 * images for count in counts["questions"].values())
        yes_no = counts["yes_no_answers"]
        assert abs(yes_no["yes"] - yes_no["no"]) <= 1


# Tokenizer


def test_tokenizer_loads_and_covers_all_text_without_unk(world_dir: Path, world: dict) -> None:
    from owl2.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(world_dir / "tokenizer")
    assert len(tokenizer) == world["tokenizer"]["vocab_size"] <= 1024
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer.convert_tokens_to_ids("<|image|>") == tokenizer.unk_token_id  # not a piece

    texts = [record["caption"] for record in _jsonl(world_dir / "captions" / "train.jsonl")]
    texts += [f"{r['question']} {r['answer']}" for r in _jsonl(world_dir / "eval" / "vqa_heldout.jsonl")]
    texts += [f"{r['question']} {r['answer']}" for r in _jsonl(world_dir / "eval" / "text_heldout.jsonl")]
    for record in json.loads((world_dir / "llava" / "train.json").read_text()):
        texts += [turn["value"].replace("<image>", "") for turn in record["conversations"]]
    texts += ["USER: ", " ASSISTANT: red", "A chat between a curious user and an artificial intelligence assistant."]
    for ids in tokenizer(texts)["input_ids"]:
        assert 0 not in ids
    # Every word of the world is a single piece (a tiny decoder learns words faster than spellings).
    assert len(tokenizer("triangle", add_special_tokens=False)["input_ids"]) == 1


def test_training_templates_encode_the_records_with_the_world_tokenizer(world_dir: Path) -> None:
    from owl2.data.templates import encode_conversation
    from owl2.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(world_dir / "tokenizer")
    records = json.loads((world_dir / "llava" / "train.json").read_text())[:20]
    for record in records:
        messages = [
            {"role": {"human": "user", "gpt": "assistant"}[turn["from"]], "content": turn["value"]}
            for turn in record["conversations"]
        ]
        for message in messages:
            message["content"] = message["content"].replace("<image>", "<|image|>")
        for template in ("mplug_owl2", "vicuna_v1"):
            encoded = encode_conversation(messages, template, tokenizer, max_length=512, tokens_per_image=17)
            supervised = [token for token in encoded.labels if token != -100]
            replies = [message["content"] for message in messages if message["role"] == "assistant"]
            # Each reply is learnt as its own pieces ("▁red", the separator space glued on) plus the EOS.
            expected = [
                tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for reply in replies
            ]
            assert supervised == [token for reply in expected for token in reply]


# The scene API and the CLI


def test_describe_follows_the_fixed_grammar() -> None:
    red_circle, blue_square = Shape("circle", "red"), Shape("square", "blue")
    assert describe(Scene((red_circle, None, None, None))) == "at the top left a red circle."
    two = Scene((red_circle, None, None, blue_square))
    assert describe(two) == "at the top left a red circle and at the bottom right a blue square."
    three = Scene((red_circle, Shape("triangle", "green"), None, blue_square))
    assert describe(three) == (
        "at the top left a red circle, at the top right a green triangle and at the bottom right a blue square."
    )


def test_questions_ask_position_only_when_unique_and_yes_no_as_requested() -> None:
    red_circle = Shape("circle", "red")
    scene = Scene((red_circle, red_circle, Shape("square", "blue"), None), background="light grey")
    for seed in range(20):
        asked = {
            kind: (question, answer) for kind, question, answer in questions(scene, random.Random(seed), yes=False)
        }
        assert asked["position"] == ("Where is the blue square?", "bottom left")
        assert asked["count"] == ("How many shapes are there?", "three")
        assert asked["yes_no"][1] == "no" and asked["yes_no"][0] not in (
            "Is there a red circle?",
            "Is there a blue square?",
        )
    lone_pair = Scene((red_circle, red_circle, None, None))
    assert "position" not in {kind for kind, _, _ in questions(lone_pair, random.Random(0), yes=True)}


def test_contrast_questions_ask_every_cell_and_unique_position_and_flip_yes_no() -> None:
    red_circle = Shape("circle", "red")
    scene = Scene((red_circle, Shape("triangle", "green"), Shape("square", "blue"), red_circle))
    colors, shapes = ("red", "green", "blue", "red"), ("circle", "triangle", "square", "circle")
    for seed in range(20):
        for yes in (True, False):
            asked = questions(scene, random.Random(seed), yes=yes)
            extra = contrast_questions(scene, asked, random.Random(seed))
            yes_no = [(q, a) for kind, q, a in asked + extra if kind == "yes_no"]
            assert sorted(a for _, a in yes_no) == ["no", "yes"]
            for question, answer in yes_no:
                pair = question.removeprefix("Is there a ").removesuffix("?")
                assert answer == ("yes" if pair in ("red circle", "green triangle", "blue square") else "no")
            cells = {q: a for kind, q, a in asked + extra if kind in ("color", "shape")}
            assert cells == {
                **{f"What color is the shape at the {p}?": c for p, c in zip(POSITIONS, colors, strict=True)},
                **{f"What shape is at the {p}?": s for p, s in zip(POSITIONS, shapes, strict=True)},
            }
            assert len([kind for kind, _, _ in asked + extra if kind in ("color", "shape")]) == 8  # each cell once
            positions = {q: a for kind, q, a in asked + extra if kind == "position"}
            assert positions == {
                "Where is the green triangle?": "top right",
                "Where is the blue square?": "bottom left",
            }
            assert len([kind for kind, _, _ in asked + extra if kind == "position"]) == 2  # each pair once


def test_render_draws_what_the_scene_says(tmp_path: Path) -> None:
    scene = Scene((Shape("triangle", "yellow"), None, Shape("circle", "green"), Shape("square", "red")))
    render(scene, 64).save(tmp_path / "scene.png")
    world = {"colors_rgb": {"yellow": [235, 200, 30], "green": [40, 170, 60], "red": [220, 40, 40]}}
    assert _read_scene(tmp_path / "scene.png", world) == {
        "top left": ("yellow", "triangle"),
        "bottom left": ("green", "circle"),
        "bottom right": ("red", "square"),
    }


def test_cli_data_synth(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synth", "--out", str(tmp_path / "w"), "--train", "1", "--heldout", "1", "--seed", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'w'}: 1 train + 1 held-out images")
    assert json.loads((tmp_path / "w" / "world.json").read_text())["seed"] == 2
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--image-size", "33"]) == 2
    assert "image size" in capsys.readouterr().err
