"""Conversation templates, label masking and image-aware truncation.

Three templates, rendered exactly as the official ``conversation.py`` / ``train.py`` do:

* ``mplug_owl2`` (official ``conv_mplug_owl2``, ``SeparatorStyle.TWO_NO_SYS``; the README, CLI and eval
  scripts use it), no system prompt::

      USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

* ``vicuna_v1`` (official ``conv_vicuna_v1``, ``SeparatorStyle.TWO``; the released fine-tune scripts pass
  ``--version v1``): the same rounds after the system prompt and one space::

      A chat between ... user's questions. USER: {q1} ASSISTANT: {a1}</s>USER: ...

* ``plain`` (the idea of the official, unreachable ``preprocess_plain``): caption pre-training,
  ``<|image|>...{caption}</s>``; the user turn contributes only its placeholders.

Training rendering (``image_token_at_front=True``, the official ``preprocess_multimodal``): a user turn that
holds placeholders becomes ``<|image|>...<|image|>\\n{rest stripped}`` (just the placeholders when nothing
else is left). Unlike the official code, which keeps one placeholder however many the turn had, every
placeholder is kept, in order, so the ids always match the images.

Tokenisation: one BOS, then the prompt split on ``<|image|>`` with each chunk tokenised without BOS and
-200 between chunks: :func:`owl2.data.tokenizer.tokenize_with_images` for every prompt that starts with
text (all chat templates), and BOS-first for ``plain``, where the official order would be ``[-200, bos]``.

Masking rule: labels are -100 except on the tokens of each assistant reply and its closing ``</s>``. A
token is supervised iff its character span (fast-tokenizer offsets) is non-empty and lies inside the
reply's *supervised span*: the reply text plus its ``</s>``, extended on the left by the one separator
space the template puts after ``ASSISTANT:``. SentencePiece glues that space to the reply's first piece
(``"▁A"``), or emits it alone (``"▁"`` before a digit), so the token the model must produce right after
``ASSISTANT:`` is always learnt, as in the official code. Lengths are never re-derived by tokenising parts
of the prompt on their own (the official ``-2`` heuristics and their "tokenization mismatch").

Truncation (``max_length`` counts expanded tokens: BOS and text tokens count 1, each image counts
``tokens_per_image``): keep whole (user, assistant) rounds from the start while they fit; if not even the
first round fits, cut inside the first reply provided the whole instruction, all its images and at least
one supervised token fit; otherwise skip as ``too_long``. An image is never cut or dropped on its own.
"""

from __future__ import annotations

import dataclasses
from bisect import bisect_right
from typing import TYPE_CHECKING

from owl2.config import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from owl2.data.sample import SKIP_REASONS

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

END_OF_REPLY = "</s>"
"""What closes every assistant reply in the rendered prompt (LLaMA's EOS as text; sep2 officially)."""

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclasses.dataclass(frozen=True)
class Template:
    """A prompt format. Chat templates render ``{system} USER: {q} ASSISTANT: {a}</s>`` rounds."""

    name: str
    system: str = ""
    """Text before the first round, followed by one space; empty for none."""
    user: str = "USER"
    assistant: str = "ASSISTANT"
    plain: bool = False
    """Caption pre-training: images, then the caption and ``</s>``; no roles, no system prompt."""


TEMPLATES: dict[str, Template] = {
    "mplug_owl2": Template("mplug_owl2"),
    "vicuna_v1": Template("vicuna_v1", system=VICUNA_SYSTEM),
    "plain": Template("plain", plain=True),
}


@dataclasses.dataclass(frozen=True)
class Skip:
    """Why a record yields no training example; ``reason`` is a key of ``SKIP_REASONS``."""

    reason: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {self.reason!r}; add it to SKIP_REASONS")


@dataclasses.dataclass
class Encoded:
    """One tokenised training example.

    ``input_ids`` holds one ``IMAGE_TOKEN_INDEX`` per image; ``num_images`` is their count, i.e. how many
    *leading* images of the sample the example uses (later ones fell with dropped rounds).
    ``expanded_length`` is the decoder sequence length once each image becomes ``tokens_per_image`` tokens.
    ``truncated`` says that rounds or reply tokens were dropped to fit ``max_length``.
    """

    input_ids: list[int]
    labels: list[int]
    num_images: int
    expanded_length: int
    truncated: bool


@dataclasses.dataclass
class _Rendered:
    text: str
    supervised: list[tuple[int, int]]  # per round: [start, end) of separator space + reply + "</s>"


def get_template(template: str | Template) -> Template:
    """The template itself, or the one of ``TEMPLATES`` with that name."""
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[template]


def images_to_front(text: str) -> str:
    """``"a <|image|> b"`` -> ``"<|image|>\\na  b"``: every placeholder first, in order, then the rest.

    Like the official ``preprocess_multimodal``, the rest is stripped and an image-only turn keeps no newline.
    """
    count = text.count(IMAGE_PLACEHOLDER)
    if not count:
        return text
    rest = text.replace(IMAGE_PLACEHOLDER, "").strip()
    return IMAGE_PLACEHOLDER * count + ("\n" + rest if rest else "")


def _rounds(messages: list[dict[str, str]]) -> list[tuple[str, str]] | Skip:
    """Validate a conversation and pair it into (user, reply) rounds.

    Leading assistant messages are dropped (the official ``preprocess_v1`` drops a first non-human turn);
    after that, roles must alternate user/assistant (else ``malformed_record``). The conversation ends at
    its first unanswered round (a trailing user message, or a blank reply): removing a round from the
    middle would take its images out of the middle of the sample's image list, while ending early keeps
    the images a prefix. No round left: ``no_assistant_turn``.
    """
    if not isinstance(messages, list):
        return Skip("malformed_record", f"messages must be a list, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            return Skip("malformed_record", f"message {i} must be a dict with role 'user' or 'assistant'")
        if not isinstance(message.get("content"), str):
            return Skip("malformed_record", f"message {i} content must be a string")
        if message["role"] == "assistant" and IMAGE_PLACEHOLDER in message["content"]:
            # The model cannot emit an image, and a reply is where the loss is.
            return Skip("malformed_record", f"message {i} is an assistant reply holding {IMAGE_PLACEHOLDER}")
    start = 0
    while start < len(messages) and messages[start]["role"] == "assistant":
        start += 1
    messages = messages[start:]
    for i, message in enumerate(messages):
        if message["role"] != ("user", "assistant")[i % 2]:
            return Skip("malformed_record", f"roles must alternate user/assistant; message {start + i} breaks it")
    rounds = []
    for i in range(0, len(messages) - 1, 2):
        reply = messages[i + 1]["content"]
        if not reply.strip():
            break
        rounds.append((messages[i]["content"], reply))
    if not rounds:
        return Skip("no_assistant_turn", "no user message is followed by a non-empty assistant reply")
    return rounds


def _render(rounds: list[tuple[str, str]], template: Template, image_token_at_front: bool) -> _Rendered | Skip:
    if template.plain:
        if len(rounds) != 1:
            return Skip("malformed_record", f"the plain template takes one (images, caption) round, got {len(rounds)}")
        ((user, caption),) = rounds
        text = IMAGE_PLACEHOLDER * user.count(IMAGE_PLACEHOLDER)
        return _Rendered(text + caption + END_OF_REPLY, [(len(text), len(text) + len(caption) + len(END_OF_REPLY))])
    text = template.system + " " if template.system else ""
    supervised = []
    for user, reply in rounds:
        if image_token_at_front:
            user = images_to_front(user)
        text += f"{template.user}: {user} {template.assistant}: "
        supervised.append((len(text) - 1, len(text) + len(reply) + len(END_OF_REPLY)))
        text += reply + END_OF_REPLY
    return _Rendered(text, supervised)


def render_conversation(
    messages: list[dict[str, str]], template: str | Template, *, image_token_at_front: bool = True
) -> str | Skip:
    """The training prompt of a conversation (see the module docstring), or why it has none."""
    rounds = _rounds(messages)
    if isinstance(rounds, Skip):
        return rounds
    rendered = _render(rounds, get_template(template), image_token_at_front)
    return rendered if isinstance(rendered, Skip) else rendered.text


def _tokenize(text: str, tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[tuple[int, int]]]:
    """BOS + the chunks between placeholders (no BOS each) joined by -200, with each token's character span."""
    ids, spans = [tokenizer.bos_token_id], [(0, 0)]
    position = 0
    for index, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if index:
            ids.append(IMAGE_TOKEN_INDEX)
            spans.append((position, position + len(IMAGE_PLACEHOLDER)))
            position += len(IMAGE_PLACEHOLDER)
        if chunk:
            encoded = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            ids.extend(encoded["input_ids"])
            spans.extend((position + start, position + end) for start, end in encoded["offset_mapping"])
        position += len(chunk)
    return ids, spans


def _label(
    ids: list[int], spans: list[tuple[int, int]], supervised: list[tuple[int, int]], eos_id: int
) -> tuple[list[int], list[int]]:
    """Labels by the masking rule, and the token index just past each round's closing EOS."""
    labels = [IGNORE_INDEX] * len(ids)
    round_ends = []
    starts = [start for start, _ in supervised]
    for index, (token, (start, end)) in enumerate(zip(ids, spans, strict=True)):
        if token == IMAGE_TOKEN_INDEX or end <= start:
            continue
        which = bisect_right(starts, start) - 1
        if which < 0 or end > supervised[which][1]:
            continue
        labels[index] = token
        if end == supervised[which][1]:
            if token != eos_id:
                raise ValueError(f"the tokenizer does not encode {END_OF_REPLY!r} as its EOS id {eos_id}")
            round_ends.append(index + 1)
    if len(round_ends) != len(supervised):
        raise ValueError(f"found {len(round_ends)} closing {END_OF_REPLY!r} tokens for {len(supervised)} replies")
    return labels, round_ends


def encode_conversation(
    messages: list[dict[str, str]],
    template: str | Template,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    tokens_per_image: int,
    image_token_at_front: bool = True,
) -> Encoded | Skip:
    """Token ids and labels of a training conversation, truncated to ``max_length`` expanded tokens.

    ``messages``: ``[{"role": "user"|"assistant", "content": str}, ...]`` with ``<|image|>`` placeholders in
    user turns. ``tokenizer`` comes from :func:`owl2.data.tokenizer.load_tokenizer` (a fast tokenizer: the
    masking needs character offsets). Returns a :class:`Skip` for records that cannot be learnt from
    (``malformed_record``, ``no_assistant_turn``, ``too_long``). The caller checks the placeholder count
    against the sample's images beforehand and keeps the first ``num_images`` of them afterwards.
    """
    if max_length < 1 or tokens_per_image < 1:
        raise ValueError(f"max_length ({max_length}) and tokens_per_image ({tokens_per_image}) must be positive")
    rounds = _rounds(messages)
    if isinstance(rounds, Skip):
        return rounds
    rendered = _render(rounds, get_template(template), image_token_at_front)
    if isinstance(rendered, Skip):
        return rendered
    ids, spans = _tokenize(rendered.text, tokenizer)
    labels, round_ends = _label(ids, spans, rendered.supervised, tokenizer.eos_token_id)

    extra = tokens_per_image - 1
    images_before = [0]  # images_before[n]: images among ids[:n]
    for token in ids:
        images_before.append(images_before[-1] + (token == IMAGE_TOKEN_INDEX))

    def expanded(n: int) -> int:
        return n + extra * images_before[n]

    kept = 0
    while kept < len(round_ends) and expanded(round_ends[kept]) <= max_length:
        kept += 1
    if kept:
        cut = round_ends[kept - 1]
    else:
        # Cut inside the first reply: all images of the round sit in its instruction, before the reply.
        first_supervised = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        room = max_length - expanded(first_supervised)
        if room < 1:
            return Skip(
                "too_long",
                f"the first instruction with its {images_before[first_supervised]} image(s) takes "
                f"{expanded(first_supervised)} tokens, leaving no room for the reply within {max_length}",
            )
        cut = first_supervised + room
    return Encoded(
        input_ids=ids[:cut],
        labels=labels[:cut],
        num_images=images_before[cut],
        expanded_length=expanded(cut),
        truncated=cut < len(ids),
    )


def encode_caption(
    caption: str,
    num_images: int,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    tokens_per_image: int,
) -> Encoded | Skip:
    """``[bos] + [-200] * num_images + caption tokens + [eos]``, loss on the caption and EOS (``plain``)."""
    messages = [
        {"role": "user", "content": IMAGE_PLACEHOLDER * num_images},
        {"role": "assistant", "content": caption},
    ]
    return encode_conversation(
        messages, TEMPLATES["plain"], tokenizer, max_length=max_length, tokens_per_image=tokens_per_image
    )


def prompt_for_generation(
    messages: list[dict[str, str]], template: str | Template, *, image_token_at_front: bool = False
) -> str:
    """The inference prompt: earlier rounds, then ``USER: {question} ASSISTANT:`` (the official ``get_prompt``).

    ``messages`` alternate user/assistant and end with the user's question. Placeholders stay where the
    caller put them, as in the official CLI and eval scripts (``USER: <|image|>{q} ASSISTANT:``); pass
    ``image_token_at_front=True`` to match the training rendering of a model fine-tuned here. Raises
    ``ValueError`` on a malformed conversation and for ``plain``, which has no instruction to answer.
    """
    template = get_template(template)
    if template.plain:
        raise ValueError("the plain template is a pre-training format; generate with a chat template")
    if not messages or len(messages) % 2 == 0:
        raise ValueError("messages must alternate user/assistant and end with a user message")
    for i, message in enumerate(messages):
        if message.get("role") != ("user", "assistant")[i % 2] or not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} must have role {('user', 'assistant')[i % 2]!r} and string content")
    text = template.system + " " if template.system else ""
    for i in range(0, len(messages), 2):
        user = messages[i]["content"]
        if image_token_at_front:
            user = images_to_front(user)
        text += f"{template.user}: {user} {template.assistant}:"
        if i + 1 < len(messages):
            text += " " + messages[i + 1]["content"] + END_OF_REPLY
    return text
