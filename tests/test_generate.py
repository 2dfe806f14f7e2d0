"""Batched generation, stop strings, Ray Data batch inference, and the ``generate`` / ``chat`` commands."""

import io
import json
from pathlib import Path

import pytest

from owl2.cli import main
from owl2.config import IMAGE_TOKEN_INDEX
from owl2.data.tokenizer import tokenize_with_images
from owl2.eval.benchmarks import CAPTION_PROTOCOL, EvalItem, Protocol, load_shapes
from owl2.eval.chat import ChatSession, chat_loop
from owl2.eval.generate import (
    cut_at_stop,
    encode_prompt,
    generate_batch,
    generate_items,
    load_model,
    model_source,
    predict_dataset,
    render_prompt,
)


@pytest.fixture(scope="module")
def world(shapes_world) -> Path:
    return shapes_world


@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory, write_tiny_checkpoint) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint", world)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model(model_source(checkpoint), device="cpu")


@pytest.fixture(scope="module")
def shapes(world):
    return load_shapes(world)


def _mixed_items(shapes, world):
    """Image and text-only rows, one with two images, all of different prompt lengths."""
    vqa, text = shapes["vqa"], shapes["text"]
    two_images = EvalItem(
        "two",
        "chat",
        [{"role": "user", "content": "<|image|><|image|>Is there a red circle?"}],
        [str(world / "images/heldout/000001.png"), (world / "images/heldout/000002.png").read_bytes()],
    )
    return [vqa[0], text[0], vqa[3], two_images, text[5], vqa[9]]


def test_source_of_a_training_checkpoint(checkpoint, world):
    source = model_source(checkpoint)
    assert source.tokenizer == str((world / "tokenizer").resolve())
    assert (source.template, source.image_token_at_front, source.state["step"]) == ("vicuna_v1", True, 7)
    released_style = model_source(checkpoint, tokenizer=world / "tokenizer", template="mplug_owl2")
    assert released_style.template == "mplug_owl2"


def test_prompts_tokenise_like_the_official_code(loaded):
    _, tokenizer = loaded
    prompt = "USER: <|image|>What color is it? ASSISTANT: "
    assert encode_prompt(prompt, tokenizer) == tokenize_with_images(prompt, tokenizer)
    # The plain caption prompt keeps BOS first, as pre-training saw it (the official order would be [-200, bos]).
    assert encode_prompt("<|image|>", tokenizer) == [tokenizer.bos_token_id, IMAGE_TOKEN_INDEX]
    messages = [{"role": "user", "content": "<|image|>What is it?"}]
    assert render_prompt(messages, "mplug_owl2", suffix=" ") == "USER: <|image|>What is it? ASSISTANT: "
    assert render_prompt(messages, "plain") == "<|image|>"


def test_shapes_items_are_asked_exactly_as_training_encoded_them(loaded, shapes):
    from owl2.config import IGNORE_INDEX
    from owl2.data.templates import encode_caption, encode_conversation

    _, tokenizer = loaded
    for item in [shapes["vqa"][0], shapes["vqa"][4], shapes["text"][0]]:
        conversation = [*item.messages, {"role": "assistant", "content": item.answers[0]}]
        trained = encode_conversation(conversation, "vicuna_v1", tokenizer, max_length=512, tokens_per_image=9)
        reply_start = next(i for i, label in enumerate(trained.labels) if label != IGNORE_INDEX)
        asked = render_prompt(item.messages, "vicuna_v1", image_token_at_front=True)
        assert encode_prompt(asked, tokenizer) == trained.input_ids[:reply_start], item.id
    caption = shapes["captions"][0]
    trained = encode_caption(caption.answers[0], 1, tokenizer, max_length=512, tokens_per_image=9)
    assert encode_prompt(render_prompt(caption.messages, "plain"), tokenizer) == trained.input_ids[:2]


def test_left_padded_batch_equals_one_by_one_greedy(loaded, shapes, world):
    model, tokenizer = loaded
    items = _mixed_items(shapes, world)
    settings = {"template": "vicuna_v1", "image_token_at_front": True}
    lengths = {len(encode_prompt(render_prompt(item.messages, "vicuna_v1"), tokenizer)) for item in items}
    assert len(lengths) > 3  # the batch really is padded

    batched = generate_batch(model, tokenizer, items, 8, **settings)
    alone = [generate_batch(model, tokenizer, [item], 8, **settings)[0] for item in items]
    assert batched == alone
    assert all(batched)
    # The official protocol (mplug_owl2, placeholders in place, trailing space) and a minimum length, too.
    official = {"template": "mplug_owl2", "prompt_suffix": " ", "min_new_tokens": 4}
    some = items[:3]
    assert generate_batch(model, tokenizer, some, 6, **official) == [
        generate_batch(model, tokenizer, [item], 6, **official)[0] for item in some
    ]


def test_generate_items_batches_by_protocol_in_order(loaded, shapes):
    model, tokenizer = loaded
    items = shapes["vqa"][:3] + shapes["captions"][:2] + shapes["text"][:3]
    replies = generate_items(model, tokenizer, items, batch_size=2, chat_template="vicuna_v1")
    assert replies[:3] == generate_batch(
        model, tokenizer, items[:3], 10, template="vicuna_v1", image_token_at_front=True
    )
    assert replies[3:5] == generate_batch(model, tokenizer, items[3:5], 60, min_new_tokens=8, template="plain")


def test_stop_strings_cut_each_row(loaded, shapes):
    model, tokenizer = loaded
    items = shapes["text"][:2]
    settings = {"template": "vicuna_v1"}
    full = generate_batch(model, tokenizer, items, 16, **settings)
    stops = []
    for text in full:
        # A stretch of letters after the start, so it is made of whole vocabulary pieces' characters.
        start = next(i for i in range(1, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2].isalpha())
        stops.append(text[start : start + 2])
    cut = generate_batch(model, tokenizer, items, 16, stop_strings=stops, **settings)
    for text, short in zip(full, cut, strict=True):
        first = min(text.find(stop) for stop in stops if stop in text)
        assert short == text[:first].strip()
        assert len(short) < len(text.strip())
    assert cut_at_stop("red</s>USER: x", ["USER:", "</s>"]) == "red"


def test_predict_dataset_with_ray_actors_keeps_item_order(ray_cluster, checkpoint, loaded, shapes, world, tmp_path):
    model, tokenizer = loaded
    items = _mixed_items(shapes, world)[:4] + shapes["captions"][:2]
    out = tmp_path / "predictions.jsonl"
    records = predict_dataset(checkpoint, items, out, batch_size=2, num_actors=2)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == records
    assert [r["id"] for r in lines] == [item.id for item in items]
    expected = generate_items(model, tokenizer, items, batch_size=2, chat_template="vicuna_v1")
    assert [r["prediction"] for r in lines] == expected
    assert lines[0]["meta"]["question_type"] == items[0].meta["question_type"]
    assert lines[0]["answers"] == items[0].answers


def test_generate_command_answers_with_an_image(checkpoint, loaded, world, capsys):
    image = world / "images/heldout/000001.png"
    code = main(
        ["generate", "--checkpoint", str(checkpoint), "--image", str(image), "--prompt", "What color?"]
        + ["--max-new-tokens", "6", "--device", "cpu"]
    )
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    model, tokenizer = loaded
    item = EvalItem("q", "chat", [{"role": "user", "content": "<|image|>What color?"}], [str(image)])
    expected = generate_batch(model, tokenizer, [item], 6, template="vicuna_v1", image_token_at_front=True)[0]
    assert printed == expected


def test_generate_command_reports_a_missing_image(checkpoint, tmp_path, capsys):
    code = main(["generate", "--checkpoint", str(checkpoint), "--image", str(tmp_path / "nope.png"), "--prompt", "hi"])
    assert code == 2
    assert "nope.png" in capsys.readouterr().err


def test_chat_session_streams_and_keeps_two_turns(loaded, world):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, template="vicuna_v1", image_token_at_front=True)
    session.protocol = Protocol(max_new_tokens=6, min_new_tokens=0)
    out = io.StringIO()
    lines = ["/image " + str(world / "images/heldout/000001.png"), "What color is it?", "How many shapes?", "/quit"]
    assert chat_loop(session, lines, out) == 2
    assert len(session.messages) == 4 and len(session.images) == 1 and not session.pending
    assert session.messages[0]["content"] == "<|image|>What color is it?"
    # The second turn saw the first round and its image.
    replay = EvalItem("r", "chat", session.messages[:3], session.images)
    second = generate_batch(model, tokenizer, [replay], 6, template="vicuna_v1", image_token_at_front=True)[0]
    assert session.messages[3]["content"] == second
    streamed = [line for line in out.getvalue().splitlines() if line.startswith("ASSISTANT: ")]
    assert [line[len("ASSISTANT: ") :].strip() for line in streamed] == [
        session.messages[1]["content"],
        session.messages[3]["content"],
    ]
    session.reset()
    assert session.messages == [] and session.images == []


def test_chat_command_on_piped_input(checkpoint, world, monkeypatch, capsys):
    image = world / "images/heldout/000002.png"
    script = f"/image {image}\nWhat shape is at the top left?\n/image {world / 'missing.png'}\nAnd the color?\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    code = main(["chat", "--checkpoint", str(checkpoint), "--max-new-tokens", "5", "--device", "cpu"])
    assert code == 0
    output = capsys.readouterr().out
    assert output.count("ASSISTANT: ") == 2
    assert f"(image {image} attached" in output
    assert "cannot read image" in output


def test_caption_protocol_is_the_official_one():
    assert (CAPTION_PROTOCOL.max_new_tokens, CAPTION_PROTOCOL.min_new_tokens) == (60, 8)
