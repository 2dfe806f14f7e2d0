"""LLaMA tokenizer loading and the ``<|image|>`` placeholder.

The official code tokenised with the slow, SentencePiece-backed ``LlamaTokenizer`` of transformers 4.31:
every text segment was encoded exactly as ``SentencePieceProcessor.encode`` does, with a BOS in front.
Transformers 5 has no slow LLaMA tokenizer; its ``LlamaTokenizer`` converts ``tokenizer.model`` into a
``tokenizers`` BPE whose ``Metaspace`` pre-tokenizer differs from SentencePiece on text that starts with a
space (SentencePiece always prepends its dummy "▁"; ``Metaspace`` does not when one is already there) and
adds no BOS when the folder has no ``tokenizer_config.json``. :func:`load_tokenizer` fixes both.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from owl2.config import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPIECE_SPACE = "▁"
"""SentencePiece's visible space (U+2581)."""


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """Load the LLaMA SentencePiece tokenizer from a local checkpoint folder.

    ``folder`` holds ``tokenizer.model`` and optionally the released checkpoint's ``tokenizer_config.json``
    and ``special_tokens_map.json``; nothing is downloaded and no remote code runs. The result encodes text
    as ``[bos] + SentencePieceProcessor(model_file=folder / "tokenizer.model").encode(text)``. Special-token
    strings in the text (``<s>``, ``</s>``, ``<unk>``) become their single ids and the text on each side is
    encoded on its own, each piece with SentencePiece's dummy prefix (the slow tokenizer's ``legacy=True``
    behaviour, whatever the folder's ``legacy`` flag says).
    """
    from tokenizers import normalizers
    from transformers import LlamaTokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.model").is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.model (the LLaMA SentencePiece model)")
    tokenizer = LlamaTokenizer.from_pretrained(
        str(folder), local_files_only=True, legacy=True, add_bos_token=True, add_eos_token=False
    )
    # SentencePiece's own normalisation (llama: no rewriting, keep whitespace): a dummy "▁" before every
    # segment, then each space becomes "▁". Done in the normalizer, not the pre-tokenizer, so a segment that
    # already starts with a space still gets its dummy prefix, exactly like SentencePiece.
    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend(SPIECE_SPACE), normalizers.Replace(" ", SPIECE_SPACE)]
    )
    backend.pre_tokenizer = None
    return tokenizer


def tokenize_with_images(
    text: str,
    tokenizer: PreTrainedTokenizerBase,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    placeholder: str = IMAGE_PLACEHOLDER,
) -> list[int]:
    """Token ids of a prompt with one ``image_token_index`` per ``placeholder``, as the official code builds them.

    The placeholder is not a vocabulary token: the prompt is split on it, each non-empty chunk is tokenised on
    its own (with BOS) and the sentinel joins consecutive chunks. Only the first BOS survives, so
    ``"USER: <|image|>hi"`` -> ``[bos, *USER:, -200, *hi]``. Official quirk, kept for parity with the released
    model: the leading token of later chunks is dropped only when the first chunk is non-empty and starts
    with BOS, so a prompt that starts with the placeholder gives ``[-200, bos, ...]``.
    """
    chunks = [tokenizer(chunk)["input_ids"] if chunk else [] for chunk in text.split(placeholder)]
    first = chunks[0]
    drop = 1 if first and first[0] == tokenizer.bos_token_id else 0
    ids = list(first)
    for chunk in chunks[1:]:
        ids.append(image_token_index)
        ids.extend(chunk[drop:])
    return ids
