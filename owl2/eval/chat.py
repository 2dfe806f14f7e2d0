"""Interactive multi-turn chat with streamed replies (``owl2 chat``).

Every line the user types is a turn; ``/image PATH`` attaches an image to the next turn, ``/reset`` starts a
new conversation, ``/quit`` (or the end of the input) leaves. Each turn re-reads the whole conversation, its
images included, so the answer never depends on a cache kept between turns.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from owl2.config import IMAGE_PLACEHOLDER
from owl2.eval.benchmarks import EvalItem, Protocol
from owl2.eval.generate import ModelSource, generate_batch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from owl2.model.owl2 import Owl2ForCausalLM

HELP = "type a message; /image PATH attaches an image to your next message; /reset clears; /quit leaves"


def make_streamer(tokenizer: PreTrainedTokenizerBase, out: TextIO) -> Any:
    """A transformers ``TextStreamer`` that writes the reply's words to ``out`` as they are decoded."""
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@dataclass
class ChatSession:
    """A conversation: the messages so far, their images, and the images waiting for the next turn."""

    model: Owl2ForCausalLM
    tokenizer: PreTrainedTokenizerBase
    template: str = "mplug_owl2"
    image_token_at_front: bool = False
    resize: str = "stretch"
    protocol: Protocol = field(default_factory=lambda: Protocol(max_new_tokens=512, min_new_tokens=0))
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    messages: list[dict[str, str]] = field(default_factory=list)
    images: list[str | bytes] = field(default_factory=list)
    pending: list[str | bytes] = field(default_factory=list)

    def attach(self, image: str | bytes) -> None:
        self.pending.append(image)

    def reset(self) -> None:
        self.messages, self.images, self.pending = [], [], []

    def ask(self, text: str, streamer: Any = None) -> str:
        """The reply to ``text`` (with the attached images, placed before it as in the official CLI)."""
        content = IMAGE_PLACEHOLDER * len(self.pending) + text
        messages = [*self.messages, {"role": "user", "content": content}]
        images = [*self.images, *self.pending]
        item = EvalItem(id=f"turn-{len(messages) // 2 + 1}", kind="chat", messages=messages, images=images)
        (reply,) = generate_batch(
            self.model,
            self.tokenizer,
            [item],
            self.protocol.max_new_tokens,
            min_new_tokens=self.protocol.min_new_tokens,
            do_sample=self.do_sample,
            temperature=self.temperature,
            top_p=self.top_p,
            stop_strings=self.protocol.stop_strings,
            resize=self.resize,
            template=self.template,
            image_token_at_front=self.image_token_at_front,
            streamer=streamer,
        )
        # Only a turn that got an answer enters the history, so a failed turn can simply be retried.
        self.messages = [*messages, {"role": "assistant", "content": reply}]
        self.images, self.pending = images, []
        return reply


def chat_loop(session: ChatSession, lines: Iterable[str], out: TextIO | None = None, prompt: bool = False) -> int:
    """Run the conversation over ``lines`` (stdin), streaming replies to ``out``; returns the number of turns.

    ``prompt`` writes ``USER: `` before reading each line (for a terminal; piped input does without).
    """
    from owl2.data.images import BadImage, read_bytes

    out = out or sys.stdout
    turns = 0
    out.write(HELP + "\n")
    iterator = iter(lines)
    while True:
        if prompt:
            out.write("USER: ")
            out.flush()
        line = next(iterator, None)
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":
            session.reset()
            out.write("(conversation cleared)\n")
            continue
        if line.startswith("/image"):
            path = line[len("/image") :].strip()
            try:
                session.attach(read_bytes(path))  # read now, so a wrong path is reported at once
            except BadImage as error:
                out.write(f"(cannot read image: {error})\n")
                continue
            out.write(f"(image {path} attached to your next message)\n")
            continue
        if line.startswith("/"):
            out.write(f"(unknown command {line.split()[0]}; {HELP})\n")
            continue
        out.write("ASSISTANT: ")
        out.flush()
        session.ask(line, streamer=make_streamer(session.tokenizer, out))
        turns += 1
    return turns


def run_chat(
    source: ModelSource,
    *,
    max_new_tokens: int = 512,
    temperature: float = 0.0,
    top_p: float = 1.0,
    device: str | None = None,
    lines: Iterable[str] | None = None,
    out: TextIO | None = None,
) -> int:
    """Load the model and chat over ``lines`` (default: stdin); returns the number of turns answered."""
    from owl2.eval.generate import load_model

    model, tokenizer = load_model(source, device=device)
    session = ChatSession(
        model,
        tokenizer,
        template=source.template,
        image_token_at_front=source.image_token_at_front,
        resize=source.resize,
        protocol=Protocol(max_new_tokens=max_new_tokens, min_new_tokens=0),
        do_sample=temperature > 0,
        temperature=temperature or 1.0,
        top_p=top_p,
    )
    interactive = lines is None and sys.stdin.isatty()
    return chat_loop(session, sys.stdin if lines is None else lines, out, prompt=interactive)
