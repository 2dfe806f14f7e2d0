import json
from pathlib import Path

import pytest
import sentencepiece as spm

from owl2.config import IMAGE_TOKEN_INDEX
from owl2.data.tokenizer import load_tokenizer, tokenize_with_images

BOS, EOS = 1, 2

# Text that SentencePiece and a converted tokenizer are most likely to disagree on.
TRICKY_TEXTS = [
    "The small dog watches the river today.",
    " leading space",
    "two  spaces and a trailing one ",
    "\nstarts with a newline\tand a tab",
    "digits 2024 split one by one",
    "bytes for unseen characters: é, Ω, 中, 😀",
    "What is this? ASSISTANT:",
]

# tokenizer_config.json as the released mPLUG-Owl2 checkpoint has it (transformers 4.31 era).
RELEASED_TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                  "rstrip": False, "single_word": False},
    "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False,
                  "rstrip": False, "single_word": False},
    "unk_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": False, "normalized": True,
                  "rstrip": False, "single_word": False},
    "clean_up_tokenization_spaces": False,
    "legacy": False,
    "model_max_length": 2048,
    "pad_token": None,
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
}  # fmt: skip


@pytest.fixture(scope="session")
def sp_model_file(spm_tokenizer_dir: Path) -> Path:
    return spm_tokenizer_dir / "tokenizer.model"


@pytest.fixture(scope="session")
def sp(sp_model_file: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(sp_model_file))


@pytest.fixture(scope="session", params=["tokenizer_model_only", "released_config"])
def tokenizer(request: pytest.FixtureRequest, sp_model_file: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp(request.param)
    (folder / "tokenizer.model").write_bytes(sp_model_file.read_bytes())
    if request.param == "released_config":
        (folder / "tokenizer_config.json").write_text(json.dumps(RELEASED_TOKENIZER_CONFIG))
    return load_tokenizer(folder)


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_plain_text_matches_sentencepiece_with_bos(tokenizer, sp, text: str) -> None:
    assert tokenizer(text)["input_ids"] == [BOS] + sp.encode(text)


def test_special_token_strings_split_the_text_into_separately_encoded_segments(tokenizer, sp) -> None:
    assert tokenizer("yes</s>USER: hi")["input_ids"] == [BOS] + sp.encode("yes") + [EOS] + sp.encode("USER: hi")


def test_one_image_keeps_a_single_bos(tokenizer, sp) -> None:
    ids = tokenize_with_images("USER: <|image|>What is this? ASSISTANT:", tokenizer)
    assert ids == [BOS] + sp.encode("USER: ") + [IMAGE_TOKEN_INDEX] + sp.encode("What is this? ASSISTANT:")
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    assert ids.count(BOS) == 1


def test_two_images(tokenizer, sp) -> None:
    ids = tokenize_with_images("a <|image|> and b <|image|> differ?", tokenizer)
    assert ids == (
        [BOS]
        + sp.encode("a ")
        + [IMAGE_TOKEN_INDEX]
        + sp.encode(" and b ")
        + [IMAGE_TOKEN_INDEX]
        + sp.encode(" differ?")
    )


def test_adjacent_and_trailing_placeholders(tokenizer, sp) -> None:
    ids = tokenize_with_images("look<|image|><|image|>", tokenizer)
    assert ids == [BOS] + sp.encode("look") + [IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX]


def test_prompt_starting_with_the_placeholder_keeps_the_official_bos_quirk(tokenizer, sp) -> None:
    ids = tokenize_with_images("<|image|>Describe it.<|image|>Again.", tokenizer)
    assert ids == [IMAGE_TOKEN_INDEX, BOS] + sp.encode("Describe it.") + [IMAGE_TOKEN_INDEX, BOS] + sp.encode("Again.")


def test_prompt_without_placeholder_is_plain_tokenisation(tokenizer) -> None:
    text = "USER: Hello there. ASSISTANT:"
    ids = tokenize_with_images(text, tokenizer)
    assert IMAGE_TOKEN_INDEX not in ids
    assert ids == tokenizer(text)["input_ids"]


def test_text_chunks_round_trip_through_decode(tokenizer) -> None:
    chunks = ["USER: ", "What is in  this image? ", " ASSISTANT: A photo of 3 cats 😀."]
    ids = tokenize_with_images("<|image|>".join(chunks), tokenizer)
    segments, current = [], []
    for token in ids:
        if token == IMAGE_TOKEN_INDEX:
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    assert [tokenizer.decode(segment, skip_special_tokens=True) for segment in segments] == chunks


def test_missing_tokenizer_model_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        load_tokenizer(tmp_path)
