from pathlib import Path

import pytest
import sentencepiece as spm

from owl2.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from owl2.data.templates import (
    TEMPLATES,
    VICUNA_SYSTEM,
    Encoded,
    Skip,
    encode_caption,
    encode_conversation,
    get_template,
    images_to_front,
    prompt_for_generation,
    render_conversation,
)
from owl2.data.tokenizer import load_tokenizer, tokenize_with_images

BOS, EOS, IMG, IGN = 1, 2, IMAGE_TOKEN_INDEX, IGNORE_INDEX
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
BIG = 10_000


@pytest.fixture(scope="module")
def tok(spm_tokenizer_dir: Path):
    return load_tokenizer(spm_tokenizer_dir)


@pytest.fixture(scope="module")
def sp(spm_tokenizer_dir: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(spm_tokenizer_dir / "tokenizer.model"))


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def encode(messages, template="mplug_owl2", tok=None, max_length=BIG, tokens_per_image=9, **kwargs):
    return encode_conversation(
        messages, template, tok, max_length=max_length, tokens_per_image=tokens_per_image, **kwargs
    )


SINGLE = [user("<|image|>What is this?"), assistant("A small dog.")]
MULTI = [user("<|image|>What is this?"), assistant("A small dog."), user("Is it red?"), assistant("The red car.")]
TEXT = [user("Hello there."), assistant("The cat sees the river.")]

# Multi-image conversation: images in rounds 1, 2 (two) and 4; round 3 is text only.
LONG = [
    user("<|image|>Describe the picture."),
    assistant("A small dog sees the river today."),
    user("And these two? <|image|> <|image|>"),
    assistant("Two birds watch the window in the morning!"),
    user("Text only now."),
    assistant("The cat likes three apples because it is sunny."),
    user("<|image|>Last one."),
    assistant("An old man paints the picture near the park?"),
]


# ------------------------------------------------------------------------------------------------
# Template strings (official conversation.py: TWO_NO_SYS for mplug_owl2, TWO with system for v1)
# ------------------------------------------------------------------------------------------------


def test_template_registry() -> None:
    assert sorted(TEMPLATES) == ["mplug_owl2", "plain", "vicuna_v1"]
    assert VICUNA_SYSTEM == SYSTEM
    assert get_template("vicuna_v1") is TEMPLATES["vicuna_v1"]
    assert get_template(TEMPLATES["plain"]) is TEMPLATES["plain"]
    with pytest.raises(ValueError, match="unknown template"):
        get_template("llava_v1")


@pytest.mark.parametrize(
    ("messages", "mplug_owl2"),
    [
        (SINGLE, "USER: <|image|>\nWhat is this? ASSISTANT: A small dog.</s>"),
        (
            MULTI,
            "USER: <|image|>\nWhat is this? ASSISTANT: A small dog.</s>USER: Is it red? ASSISTANT: The red car.</s>",
        ),
        (TEXT, "USER: Hello there. ASSISTANT: The cat sees the river.</s>"),
    ],
)
def test_rendered_training_prompts(messages, mplug_owl2: str) -> None:
    assert render_conversation(messages, "mplug_owl2") == mplug_owl2
    assert render_conversation(messages, "vicuna_v1") == SYSTEM + " " + mplug_owl2


def test_placeholder_moves_to_the_front_with_a_newline() -> None:
    assert images_to_front("What is <|image|> this?") == "<|image|>\nWhat is  this?"
    assert images_to_front("  Compare <|image|> and\n<|image|>  ") == "<|image|><|image|>\nCompare  and"
    assert images_to_front("<|image|>") == "<|image|>"  # the official strip() drops the newline
    assert images_to_front(" <|image|>  ") == "<|image|>"
    assert images_to_front(" text only ") == " text only "  # turns without images are left alone
    messages = [user("Compare <|image|> with <|image|>."), assistant("Same.")]
    assert (
        render_conversation(messages, "mplug_owl2") == "USER: <|image|><|image|>\nCompare  with . ASSISTANT: Same.</s>"
    )
    assert (
        render_conversation(messages, "mplug_owl2", image_token_at_front=False)
        == "USER: Compare <|image|> with <|image|>. ASSISTANT: Same.</s>"
    )
    assert render_conversation([user("<|image|>"), assistant("A dog.")], "mplug_owl2") == (
        "USER: <|image|> ASSISTANT: A dog.</s>"
    )


def test_plain_rendering_keeps_only_the_placeholders_of_the_user_turn() -> None:
    messages = [user("Describe <|image|><|image|> please"), assistant("Two birds.")]
    assert render_conversation(messages, "plain") == "<|image|><|image|>Two birds.</s>"


# ------------------------------------------------------------------------------------------------
# Ids and labels, token by token, against an expectation assembled from raw SentencePiece pieces
# ------------------------------------------------------------------------------------------------


def glued(sp: spm.SentencePieceProcessor, instruction: str, reply: str) -> tuple[list[int], list[int]]:
    """Pieces of ``instruction`` and of `` reply``, checking that encoding them together splits between them."""
    head, tail = sp.encode(instruction), sp.encode(reply)  # the reply's dummy "▁" is the separator space
    assert sp.encode(instruction + " " + reply) == head + tail, "test text must split cleanly at the reply"
    return head, tail


@pytest.mark.parametrize("template", ["mplug_owl2", "vicuna_v1"])
def test_single_turn_with_image_by_hand(tok, sp, template: str) -> None:
    prefix = SYSTEM + " " if template == "vicuna_v1" else ""
    before_image = sp.encode(prefix + "USER: ")
    instruction, reply = glued(sp, "\nWhat is this? ASSISTANT:", "A small dog.")
    encoded = encode(SINGLE, template, tok, tokens_per_image=9)
    assert encoded.input_ids == [BOS, *before_image, IMG, *instruction, *reply, EOS]
    assert encoded.labels == [IGN] * (len(before_image) + 2 + len(instruction)) + [*reply, EOS]
    assert encoded.num_images == 1
    assert encoded.expanded_length == len(encoded.input_ids) + 8
    assert not encoded.truncated


@pytest.mark.parametrize("template", ["mplug_owl2", "vicuna_v1"])
def test_multi_turn_text_only_by_hand(tok, sp, template: str) -> None:
    prefix = SYSTEM + " " if template == "vicuna_v1" else ""
    messages = [user("Hello there."), assistant("The cat sees the river."), user("Why?"), assistant("It is sunny.")]
    first, reply1 = glued(sp, prefix + "USER: Hello there. ASSISTANT:", "The cat sees the river.")
    # After "</s>" the text is a new segment with its own dummy prefix (the slow tokenizer's legacy split).
    second, reply2 = glued(sp, "USER: Why? ASSISTANT:", "It is sunny.")
    encoded = encode(messages, template, tok)
    assert encoded.input_ids == [BOS, *first, *reply1, EOS, *second, *reply2, EOS]
    assert encoded.labels == [IGN] * (1 + len(first)) + [*reply1, EOS] + [IGN] * len(second) + [*reply2, EOS]
    assert encoded.num_images == 0 and encoded.expanded_length == len(encoded.input_ids)


def test_multi_turn_with_image_by_hand(tok, sp) -> None:
    before_image = sp.encode("USER: ")
    first, reply1 = glued(sp, "\nWhat is this? ASSISTANT:", "A small dog.")
    second, reply2 = glued(sp, "USER: Is it red? ASSISTANT:", "The red car.")
    encoded = encode(MULTI, "mplug_owl2", tok, tokens_per_image=65)
    assert encoded.input_ids == [BOS, *before_image, IMG, *first, *reply1, EOS, *second, *reply2, EOS]
    assert encoded.labels == (
        [IGN] * (len(before_image) + 2 + len(first)) + [*reply1, EOS] + [IGN] * len(second) + [*reply2, EOS]
    )
    assert encoded.expanded_length == len(encoded.input_ids) + 64


@pytest.mark.parametrize(
    "messages",
    [
        SINGLE,
        MULTI,
        TEXT,
        LONG,
        [user("bytes: é, Ω, 中, 😀 <|image|>"), assistant("digits 2024\nand a newline "), user("x"), assistant(" y")],
        [user(" two  spaces <|image|><|image|> "), assistant("  leading spaces")],
    ],
)
@pytest.mark.parametrize("template", ["mplug_owl2", "vicuna_v1"])
@pytest.mark.parametrize("front", [True, False])
def test_ids_are_tokenize_with_images_of_the_rendered_prompt(tok, messages, template: str, front: bool) -> None:
    encoded = encode(messages, template, tok, image_token_at_front=front)
    text = render_conversation(messages, template, image_token_at_front=front)
    assert encoded.input_ids == tokenize_with_images(text, tok)
    assert encoded.input_ids[0] == BOS  # templates start with text, so the official [-200, bos] quirk never shows
    assert encoded.input_ids.count(IMG) == encoded.num_images == text.count("<|image|>")
    assert len(encoded.labels) == len(encoded.input_ids)


@pytest.mark.parametrize(
    "reply", ["A small dog.", "2024 is a year", " leading space", "x", "The cat, the dog and 42 friends!", "é ok"]
)
@pytest.mark.parametrize("template", ["mplug_owl2", "vicuna_v1"])
def test_supervised_tokens_are_the_separator_space_the_reply_and_eos(tok, sp, template: str, reply: str) -> None:
    messages = [user("<|image|>Hello."), assistant("First."), user("Next?"), assistant(reply)]
    encoded = encode(messages, template, tok)
    supervised = [i for i, label in enumerate(encoded.labels) if label != IGN]
    first_eos = encoded.labels.index(EOS)
    first = [i for i in supervised if i <= first_eos]
    second = [i for i in supervised if i > first_eos]
    assert first == list(range(first[0], first_eos + 1)) and second == list(range(second[0], len(encoded.labels)))
    assert [encoded.labels[i] for i in first] == sp.encode("First.") + [EOS]
    reply_ids = [encoded.labels[i] for i in second]
    assert reply_ids[-1] == EOS and EOS not in reply_ids[:-1]
    # Rule: the space after "ASSISTANT:" belongs to the reply ("▁A", or a lone "▁" before a digit); everything
    # from the previous "</s>" to that space is instruction.
    assert sp.id_to_piece(reply_ids[0]).startswith("▁")
    assert sp.decode(reply_ids[:-1]) == reply  # decode drops one leading space: the separator
    assert sp.decode(encoded.input_ids[first_eos + 1 : second[0]]) == "USER: Next? ASSISTANT:"


def test_a_lone_separator_piece_before_a_digit_is_supervised(tok, sp) -> None:
    head, tail = glued(sp, "USER: Year? ASSISTANT:", "2024")
    assert sp.id_to_piece(tail[0]) == "▁" and sp.id_to_piece(head[-1]) == ":"
    encoded = encode([user("Year?"), assistant("2024")], "mplug_owl2", tok)
    assert encoded.input_ids == [BOS, *head, *tail, EOS]
    assert encoded.labels == [IGN] * (1 + len(head)) + [*tail, EOS]


# ------------------------------------------------------------------------------------------------
# plain (caption pre-training)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_images", [0, 1, 3])
def test_plain_caption(tok, sp, num_images: int) -> None:
    caption = "Two birds watch the window."
    encoded = encode_caption(caption, num_images, tok, max_length=BIG, tokens_per_image=9)
    assert encoded.input_ids == [BOS] + [IMG] * num_images + sp.encode(caption) + [EOS]
    assert encoded.labels == [IGN] * (1 + num_images) + sp.encode(caption) + [EOS]
    assert encoded.num_images == num_images
    assert encoded.expanded_length == 1 + 9 * num_images + len(sp.encode(caption)) + 1
    via_messages = encode([user("<|image|>" * num_images), assistant(caption)], "plain", tok)
    assert via_messages == encoded


def test_plain_caption_truncation_and_skips(tok, sp) -> None:
    caption = "Two birds watch the window."
    encoded = encode_caption(caption, 2, tok, max_length=1 + 2 * 9 + 3, tokens_per_image=9)
    assert encoded.input_ids == [BOS, IMG, IMG] + sp.encode(caption)[:3] and encoded.truncated
    assert encoded.labels == [IGN] * 3 + sp.encode(caption)[:3]
    assert encode_caption(caption, 2, tok, max_length=1 + 2 * 9, tokens_per_image=9).reason == "too_long"
    assert encode_caption("", 1, tok, max_length=BIG, tokens_per_image=9).reason == "no_assistant_turn"
    two_rounds = [user("<|image|>"), assistant("a"), user("b"), assistant("c")]
    assert encode(two_rounds, "plain", tok).reason == "malformed_record"


# ------------------------------------------------------------------------------------------------
# Truncation
# ------------------------------------------------------------------------------------------------


def test_truncation_keeps_whole_rounds(tok) -> None:
    full = encode(LONG, "mplug_owl2", tok, tokens_per_image=9)
    two = encode(LONG[:4], "mplug_owl2", tok, tokens_per_image=9)
    three = encode(LONG[:6], "mplug_owl2", tok, tokens_per_image=9)
    for max_length in (two.expanded_length, three.expanded_length - 1):
        cut = encode(LONG, "mplug_owl2", tok, max_length=max_length, tokens_per_image=9)
        assert (cut.input_ids, cut.labels, cut.num_images) == (two.input_ids, two.labels, 3)
        assert cut.truncated and cut.expanded_length == two.expanded_length
    assert encode(LONG, "mplug_owl2", tok, max_length=full.expanded_length, tokens_per_image=9) == full
    assert not full.truncated and full.num_images == 4


def test_truncation_counts_expanded_tokens(tok) -> None:
    raw = encode(MULTI, "mplug_owl2", tok, tokens_per_image=1)
    assert raw.expanded_length == len(raw.input_ids)
    # One short of the 65-token image: the ids fit many times over, the expanded sequence does not.
    max_length = len(raw.input_ids) + 63
    cut = encode(MULTI, "mplug_owl2", tok, max_length=max_length, tokens_per_image=65)
    assert cut.truncated and cut.input_ids == encode(SINGLE, "mplug_owl2", tok).input_ids
    assert cut.expanded_length == len(cut.input_ids) + 64 <= max_length
    assert encode(MULTI, "mplug_owl2", tok, max_length=max_length + 1, tokens_per_image=65).input_ids == raw.input_ids


def test_first_round_is_cut_inside_its_reply_only(tok, sp) -> None:
    full = encode(SINGLE, "mplug_owl2", tok, tokens_per_image=65)
    first_supervised = next(i for i, label in enumerate(full.labels) if label != IGN)
    instruction = first_supervised + 64  # expanded tokens before the reply
    cut = encode(SINGLE, "mplug_owl2", tok, max_length=instruction + 2, tokens_per_image=65)
    assert cut.input_ids == full.input_ids[: first_supervised + 2] and cut.labels == full.labels[: first_supervised + 2]
    assert cut.num_images == 1 and cut.truncated and cut.expanded_length == instruction + 2
    assert cut.labels[-2:] == sp.encode("A small dog.")[:2]
    for max_length in (instruction, instruction - 1, 5):
        skipped = encode(SINGLE, "mplug_owl2", tok, max_length=max_length, tokens_per_image=65)
        assert isinstance(skipped, Skip) and skipped.reason == "too_long"


def test_too_long_when_the_images_of_the_first_instruction_do_not_fit(tok) -> None:
    messages = [user("<|image|><|image|>Compare."), assistant("Same.")]
    assert encode(messages, "mplug_owl2", tok, max_length=100, tokens_per_image=65).reason == "too_long"
    assert isinstance(encode(messages, "mplug_owl2", tok, max_length=200, tokens_per_image=65), Encoded)


@pytest.mark.parametrize("tokens_per_image", [1, 9, 65])
@pytest.mark.parametrize("template", ["mplug_owl2", "vicuna_v1"])
def test_truncation_properties_over_every_max_length(tok, template: str, tokens_per_image: int) -> None:
    full = encode(LONG, template, tok, tokens_per_image=tokens_per_image)
    first_supervised = next(i for i, label in enumerate(full.labels) if label != IGN)
    needed = first_supervised + (tokens_per_image - 1) + 1  # round 1 has one image
    placeholders_per_round = [LONG[i]["content"].count("<|image|>") for i in range(0, len(LONG), 2)]
    previous_images = 0
    for max_length in range(1, full.expanded_length + 3):
        encoded = encode(LONG, template, tok, max_length=max_length, tokens_per_image=tokens_per_image)
        if max_length < needed:
            assert isinstance(encoded, Skip) and encoded.reason == "too_long", max_length
            continue
        assert isinstance(encoded, Encoded), max_length
        n = len(encoded.input_ids)
        assert encoded.input_ids == full.input_ids[:n] and encoded.labels == full.labels[:n]
        assert encoded.input_ids[0] == BOS
        assert encoded.input_ids.count(IMG) == encoded.num_images
        assert encoded.expanded_length == n + (tokens_per_image - 1) * encoded.num_images <= max_length
        assert any(label != IGN for label in encoded.labels)
        assert encoded.num_images >= previous_images
        previous_images = encoded.num_images
        assert encoded.truncated == (max_length < full.expanded_length)
        rounds = encoded.labels.count(EOS)
        if rounds:  # whole rounds, identical to encoding the shorter conversation
            shorter = encode(LONG[: 2 * rounds], template, tok, tokens_per_image=tokens_per_image)
            assert (encoded.input_ids, encoded.labels) == (shorter.input_ids, shorter.labels)
            assert encoded.num_images == sum(placeholders_per_round[:rounds])
        else:  # inside the first reply, with the round's image kept
            assert encoded.num_images == placeholders_per_round[0]
            assert n > first_supervised


# ------------------------------------------------------------------------------------------------
# Conversations that cannot be learnt from, or only partly
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [user("<|image|>Hello?")],
        [user("Hello?"), assistant("")],
        [user("Hello?"), assistant("  \n")],
        [assistant("I am here.")],
        [user("Hello?"), assistant(""), user("Again?"), assistant("Yes.")],  # ends at the unanswered round
    ],
)
def test_no_assistant_turn(tok, messages) -> None:
    for template in TEMPLATES:
        skipped = encode(messages, template, tok)
        assert isinstance(skipped, Skip) and skipped.reason == "no_assistant_turn"
        assert render_conversation(messages, template) == skipped


@pytest.mark.parametrize(
    "messages",
    [
        [user("a"), user("b"), assistant("c")],
        [user("a"), assistant("b"), assistant("c")],
        [{"role": "system", "content": "x"}, user("a"), assistant("b")],
        [{"role": "user", "content": 3}, assistant("b")],
        [user("a"), assistant("Here: <|image|>")],
        "not a list",
    ],
)
def test_malformed_conversations(tok, messages) -> None:
    skipped = encode(messages, "mplug_owl2", tok)
    assert isinstance(skipped, Skip) and skipped.reason == "malformed_record"


def test_leading_assistant_and_trailing_user_messages_are_dropped(tok) -> None:
    core = encode(SINGLE, "mplug_owl2", tok)
    assert encode([assistant("Hi!"), *SINGLE], "mplug_owl2", tok) == core
    with_tail = encode([*SINGLE, user("<|image|>And this?")], "mplug_owl2", tok)
    assert with_tail == core and with_tail.num_images == 1  # the caller keeps the first image only
    blank_then_more = [*SINGLE, user("<|image|>And this?"), assistant(" "), user("More?"), assistant("No.")]
    assert encode(blank_then_more, "mplug_owl2", tok) == core


def test_skip_reasons_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown skip reason"):
        Skip("bad_luck")


def test_bad_lengths_are_errors(tok) -> None:
    with pytest.raises(ValueError, match="positive"):
        encode(SINGLE, "mplug_owl2", tok, max_length=0)
    with pytest.raises(ValueError, match="positive"):
        encode(SINGLE, "mplug_owl2", tok, tokens_per_image=0)


# ------------------------------------------------------------------------------------------------
# Inference prompts
# ------------------------------------------------------------------------------------------------


def test_prompt_for_generation() -> None:
    question = [user("<|image|>What is this?")]
    assert prompt_for_generation(question, "mplug_owl2") == "USER: <|image|>What is this? ASSISTANT:"
    assert prompt_for_generation(question, "vicuna_v1") == SYSTEM + " USER: <|image|>What is this? ASSISTANT:"
    assert (
        prompt_for_generation(question, "vicuna_v1", image_token_at_front=True)
        == SYSTEM + " USER: <|image|>\nWhat is this? ASSISTANT:"
    )
    history = [*SINGLE, user("Is it red?")]
    assert prompt_for_generation(history, "mplug_owl2") == (
        "USER: <|image|>What is this? ASSISTANT: A small dog.</s>USER: Is it red? ASSISTANT:"
    )


@pytest.mark.parametrize("template", ["mplug_owl2", "vicuna_v1"])
@pytest.mark.parametrize("front", [True, False])
def test_training_prompt_continues_the_generation_prompt(template: str, front: bool) -> None:
    prompt = prompt_for_generation(MULTI[:3], template, image_token_at_front=front)
    rendered = render_conversation(MULTI, template, image_token_at_front=front)
    assert rendered == prompt + " " + MULTI[3]["content"] + "</s>"


@pytest.mark.parametrize(
    "messages",
    [[], SINGLE, [assistant("Hi"), user("q")], [user("a"), user("b"), user("c")], [{"role": "user", "content": 1}]],
)
def test_prompt_for_generation_rejects_malformed_conversations(messages) -> None:
    with pytest.raises(ValueError):
        prompt_for_generation(messages, "mplug_owl2")


def test_plain_has_no_generation_prompt() -> None:
    with pytest.raises(ValueError, match="plain"):
        prompt_for_generation([user("<|image|>")], "plain")
