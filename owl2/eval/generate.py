"""Batched generation done right, and batch inference over a dataset with Ray Data.

The official evaluation scripts left-pad batches but count pads as positions and misplace the image
tokens' mask (reference section 9), so they evaluate with batch size 1. Here batches are left-padded with
the tokenizer's pad id (LLaMA has none: ``<unk>``, id 0) and an explicit mask, which the model turns into
positions that ignore the pads: each row decodes as it would alone.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from owl2.config import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from owl2.data.images import decode, normalize, read_bytes, resize
from owl2.data.templates import prompt_for_generation
from owl2.eval.benchmarks import EvalItem, Protocol

if TYPE_CHECKING:
    from PIL import Image
    from transformers import PreTrainedTokenizerBase

    from owl2.model.owl2 import Owl2ForCausalLM

MAX_IMAGE_PIXELS = 64_000_000
"""Larger images are refused as possible decompression bombs (the data pipeline's default)."""
EXPERIMENT_FILE = "experiment.yaml"
STATE_FILE = "state.json"


# --------------------------------------------------------------------------------------------------
# What a checkpoint folder is
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """A checkpoint folder and what inference needs besides its weights (picklable, for Ray actors)."""

    checkpoint: str
    tokenizer: str
    template: str
    """The model's chat template: its training template for owl2 training checkpoints, else ``mplug_owl2``."""
    image_token_at_front: bool
    """Render user turns with their images first, as owl2 training does (not the released model)."""
    resize: str = "stretch"
    experiment: dict[str, Any] | None = None
    """The training checkpoint's ``experiment.yaml``; None for released or ``save_pretrained`` folders."""
    state: dict[str, Any] | None = None
    """The training checkpoint's ``state.json`` (stage, step)."""


def model_source(
    checkpoint: str | Path, tokenizer: str | Path | None = None, template: str | None = None
) -> ModelSource:
    """Describe a checkpoint folder: the released mPLUG-Owl2 one, a ``save_pretrained`` folder or an owl2
    training checkpoint (``config.json`` + ``model.safetensors`` + ``experiment.yaml`` + ``state.json``).

    The tokenizer is ``tokenizer``, else the folder itself when it holds ``tokenizer.model`` (released
    model), else the ``data.tokenizer`` of the experiment's first stage. ``template`` overrides the model's
    chat template (default: the template of the stage that wrote the checkpoint, else ``mplug_owl2``).
    """
    folder = Path(checkpoint).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint folder (no config.json)")
    experiment = state = None
    if (folder / EXPERIMENT_FILE).is_file():
        experiment = yaml.safe_load((folder / EXPERIMENT_FILE).read_text()) or {}
    if (folder / STATE_FILE).is_file():
        state = json.loads((folder / STATE_FILE).read_text())
    stages = (experiment or {}).get("stages") or {}
    if tokenizer is None:
        if (folder / "tokenizer.model").is_file():
            tokenizer = folder
        else:
            first = next(iter(stages.values()), {}) or {}
            tokenizer = (first.get("data") or {}).get("tokenizer")
            if not tokenizer:
                raise FileNotFoundError(
                    f"no tokenizer for {folder}: it holds no tokenizer.model and no experiment.yaml naming one; "
                    "pass --tokenizer DIR"
                )
    stage_name = (state or {}).get("stage")
    stage = stages.get(stage_name) or (list(stages.values())[-1] if stages else {}) or {}
    data = stage.get("data") or {}
    trained_here = experiment is not None
    return ModelSource(
        checkpoint=str(folder),
        tokenizer=str(Path(tokenizer).expanduser().resolve()),
        template=template or (data.get("template", "vicuna_v1") if trained_here else "mplug_owl2"),
        image_token_at_front=trained_here,
        resize=data.get("resize", "stretch"),
        experiment=experiment,
        state=state,
    )


def load_model(
    source: ModelSource, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[Owl2ForCausalLM, PreTrainedTokenizerBase]:
    """The model (eval mode; bf16 on a GPU, fp32 on the CPU unless ``dtype``) and its tokenizer."""
    from owl2.data.tokenizer import load_tokenizer
    from owl2.model.owl2 import Owl2ForCausalLM

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = Owl2ForCausalLM.from_pretrained(source.checkpoint, dtype=dtype, device=device)
    return model, load_tokenizer(source.tokenizer)


# --------------------------------------------------------------------------------------------------
# Prompts and images
# --------------------------------------------------------------------------------------------------


def render_prompt(
    messages: list[dict[str, str]], template: str, *, image_token_at_front: bool = False, suffix: str = ""
) -> str:
    """The generation prompt: ``USER: {q} ASSISTANT:`` rounds of ``template`` (plus ``suffix``), or for
    ``plain`` (caption pre-training) the user turn's placeholders alone."""
    if template == "plain":
        if len(messages) != 1:
            raise ValueError("the plain template takes a single user turn (its images)")
        return IMAGE_PLACEHOLDER * messages[0]["content"].count(IMAGE_PLACEHOLDER) + suffix
    return prompt_for_generation(messages, template, image_token_at_front=image_token_at_front) + suffix


def encode_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """``[bos]`` + the text between placeholders (each chunk without BOS) joined by ``-200``.

    For a prompt that starts with text this equals :func:`owl2.data.tokenizer.tokenize_with_images` (the
    official ``tokenizer_image_token``); a prompt that starts with an image gets its BOS first, as the
    plain pre-training format was learnt, rather than the official ``[-200, bos, ...]``.
    """
    ids = [tokenizer.bos_token_id]
    for index, chunk in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
        if index:
            ids.append(IMAGE_TOKEN_INDEX)
        if chunk:
            ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return ids


def load_image(image: str | bytes | Image.Image, size: int, mode: str = "stretch") -> np.ndarray:
    """A path, URI, encoded bytes or PIL image -> ``uint8 [3, size, size]`` (``mode``: stretch/pad/crop)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        from owl2.data.images import to_rgb

        picture = to_rgb(image)
    else:
        name = image if isinstance(image, str) else "image bytes"
        data = read_bytes(image) if isinstance(image, str) else bytes(image)
        picture = decode(data, MAX_IMAGE_PIXELS, name)
    return resize(picture, size, mode)


# --------------------------------------------------------------------------------------------------
# Batched generation
# --------------------------------------------------------------------------------------------------


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (which is dropped)."""
    cut = min((index for stop in stop_strings if stop and (index := text.find(stop)) >= 0), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate_batch(
    model: Owl2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[EvalItem],
    max_new_tokens: int,
    *,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_strings: Sequence[str] = (),
    image_size: int | None = None,
    resize: str = "stretch",
    template: str = "mplug_owl2",
    image_token_at_front: bool = False,
    prompt_suffix: str = "",
    streamer: Any = None,
) -> list[str]:
    """Generate one reply per item in a single left-padded batch; returns the new text of each, stripped.

    Prompts are rendered with ``template`` (see :func:`render_prompt`), images read, decoded, made square
    (``resize``) at ``image_size`` (default: the model's resolution) and CLIP-normalised. Only the new
    tokens are decoded (special tokens skipped). ``stop_strings`` end a row's generation as soon as one
    appears (transformers' ``StopStringCriteria``) and are cut from the text with what follows them.
    ``streamer`` (a transformers ``TextStreamer``) needs a batch of one.
    """
    from transformers import StoppingCriteriaList, StopStringCriteria

    if not items:
        return []
    if streamer is not None and len(items) != 1:
        raise ValueError("streaming needs a batch of one item")
    image_size = image_size or model.config.vision["image_size"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.unk_token_id
    rows, pixels = [], []
    for item in items:
        prompt = render_prompt(item.messages, template, image_token_at_front=image_token_at_front, suffix=prompt_suffix)
        ids = encode_prompt(prompt, tokenizer)
        if ids.count(IMAGE_TOKEN_INDEX) != len(item.images):
            found = ids.count(IMAGE_TOKEN_INDEX)
            raise ValueError(
                f"item {item.id}: the prompt has {found} image placeholders, the item {len(item.images)} images"
            )
        rows.append(ids)
        pixels.extend(load_image(image, image_size, resize) for image in item.images)
    length = max(len(ids) for ids in rows)
    # The mask comes from the lengths, not from comparing ids with the pad id: <unk> may be a real token.
    input_ids = torch.tensor([[pad_id] * (length - len(ids)) + ids for ids in rows], device=model.device)
    attention_mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in rows], device=model.device)
    images = normalize(torch.from_numpy(np.stack(pixels)).to(model.device), model.dtype) if pixels else None

    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": min_new_tokens,
        "do_sample": do_sample,
        "num_beams": 1,
        "pad_token_id": pad_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    if stop_strings:
        # Built here rather than via generate(stop_strings=, tokenizer=): generate() would hand the tokenizer
        # on to the model's forward as an input.
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopStringCriteria(tokenizer, list(stop_strings))])
    output = model.generate(input_ids, attention_mask=attention_mask, images=images, streamer=streamer, **kwargs)
    texts = tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)
    return [cut_at_stop(text, stop_strings).strip() for text in texts]


def generate_items(
    model: Owl2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[EvalItem],
    batch_size: int = 8,
    *,
    chat_template: str = "mplug_owl2",
    image_token_at_front: bool | None = None,
    resize: str = "stretch",
    image_size: int | None = None,
) -> list[str]:
    """Replies to items of any benchmarks, each asked and decoded by its :class:`Protocol`, in item order.

    Consecutive items that share a protocol are batched together (``batch_size`` at most). A protocol
    without a template uses ``chat_template``, rendered with ``image_token_at_front`` (default: the
    protocol's choice).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    replies: list[str] = []
    start = 0
    while start < len(items):
        protocol = items[start].protocol
        end = start + 1
        while end < len(items) and end - start < batch_size and items[end].protocol == protocol:
            end += 1
        replies.extend(
            generate_batch(
                model,
                tokenizer,
                items[start:end],
                **_protocol_arguments(protocol, chat_template, image_token_at_front),
                image_size=image_size,
                resize=resize,
            )
        )
        start = end
    return replies


def _protocol_arguments(protocol: Protocol, chat_template: str, image_token_at_front: bool | None) -> dict[str, Any]:
    own_template = protocol.template is None
    return {
        "max_new_tokens": protocol.max_new_tokens,
        "min_new_tokens": protocol.min_new_tokens,
        "stop_strings": protocol.stop_strings,
        "template": chat_template if own_template else protocol.template,
        # The model's own template is rendered the way that model was trained; official ones as written.
        "image_token_at_front": (
            image_token_at_front if own_template and image_token_at_front is not None else protocol.image_token_at_front
        ),
        "prompt_suffix": protocol.prompt_suffix,
    }


# --------------------------------------------------------------------------------------------------
# Batch inference over a dataset (Ray Data)
# --------------------------------------------------------------------------------------------------


class Predictor:
    """A Ray Data actor: loads the model once, then answers batches of pickled items."""

    def __init__(self, source: ModelSource, use_gpu: bool, dtype: str | None, image_size: int | None) -> None:
        self.source = source
        self.image_size = image_size
        device = "cuda" if use_gpu else "cpu"
        self.model, self.tokenizer = load_model(source, device=device, dtype=getattr(torch, dtype) if dtype else None)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [pickle.loads(blob) for blob in batch["item"]]
        replies = generate_items(
            self.model,
            self.tokenizer,
            items,
            batch_size=len(items),
            chat_template=self.source.template,
            image_token_at_front=self.source.image_token_at_front,
            resize=self.source.resize,
            image_size=self.image_size,
        )
        return {"index": batch["index"], "prediction": np.array(replies, dtype=object)}


def prediction_record(item: EvalItem, prediction: str) -> dict[str, Any]:
    """One line of a predictions JSONL."""
    return {
        "id": item.id,
        "kind": item.kind,
        "question": item.question,
        "prediction": prediction,
        "answers": item.answers,
        "meta": item.meta,
    }


def predict_dataset(
    checkpoint: str | Path | ModelSource,
    items: Sequence[EvalItem],
    output_jsonl: str | Path,
    batch_size: int = 8,
    num_actors: int = 1,
    use_gpu: bool = False,
    *,
    tokenizer: str | Path | None = None,
    dtype: str | None = None,
    image_size: int | None = None,
    cpus_per_actor: float = 0.5,
) -> list[dict[str, Any]]:
    """Answer ``items`` with a pool of ``num_actors`` Ray actors, each holding the model once; write one JSONL
    line per item (``id``, ``kind``, ``question``, ``prediction``, ``answers``, ``meta``) in item order.

    Items travel through Ray Data pickled, so their images may be bytes as well as paths; paths must be
    readable where the actors run. CPU actors ask for ``cpus_per_actor`` (a fraction, so that on a 2-core
    machine the actors never starve the tasks that feed them); with ``use_gpu`` each actor takes one GPU
    and the model runs in bf16 unless ``dtype`` says otherwise. Returns the records written.
    """
    import ray.data

    from owl2.runtime import ensure_ray

    if batch_size < 1 or num_actors < 1:
        raise ValueError(f"batch_size ({batch_size}) and num_actors ({num_actors}) must be positive")
    source = checkpoint if isinstance(checkpoint, ModelSource) else model_source(checkpoint, tokenizer)
    output = Path(output_jsonl)
    output.parent.mkdir(parents=True, exist_ok=True)
    predictions: dict[int, str] = {}
    if items:
        ensure_ray()
        rows = [{"index": index, "item": pickle.dumps(item)} for index, item in enumerate(items)]
        resources = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": cpus_per_actor}
        dataset = ray.data.from_items(rows).map_batches(
            Predictor,
            fn_constructor_kwargs={"source": source, "use_gpu": use_gpu, "dtype": dtype, "image_size": image_size},
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            **resources,
        )
        # Actors finish batches in any order; the index restores the items' order.
        for row in dataset.select_columns(["index", "prediction"]).iter_rows():
            predictions[int(row["index"])] = str(row["prediction"])
        if len(predictions) != len(items):
            raise RuntimeError(f"got {len(predictions)} predictions for {len(items)} items")
    records = [prediction_record(item, predictions[index]) for index, item in enumerate(items)]
    write_predictions(records, output)
    return records


def write_predictions(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Prediction records as JSONL, one per line (read back by ``owl2.eval.runner.read_predictions``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    return path
