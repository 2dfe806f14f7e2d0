"""Data parallelism for the train loop: DDP or FSDP2, activation checkpointing, compilation, and strategy-free
helpers.

``prepare_precision`` stores each parameter in the dtype the stage needs (frozen ones in bf16 under bf16), then
``wrap`` turns the bare ``Owl2ForCausalLM`` into what the loop trains (checkpointing, then ``torch.compile`` of
every layer, then DDP or FSDP2); everything the loop does that depends on the strategy goes through a helper
here (gradient sync during accumulation, clipping, checkpoint state in and out), so ``loop.py`` never asks
which strategy runs. The model itself holds no distribution code.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every decoder layer, vision block and abstractor layer
as its own unit, then the root, which keeps the rest (embeddings, head, norms, the vision stem, the
abstractor's queries and projection). ``fully_shard`` replaces each parameter by a ``DTensor`` shard, so the
optimizer must be built from the wrapped model, after ``wrap``. Checkpoints stay in the single-process format
either way: the full state is gathered to rank 0 on save and scattered from a full state on load.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from owl2.config import StageConfig


def use_bf16(stage: StageConfig, device: torch.device) -> bool:
    """Whether the stage computes in bfloat16: asked for, or ``auto`` on a GPU."""
    return stage.precision == "bf16" or (stage.precision == "auto" and device.type == "cuda")


def text_only_rows_possible(stage: StageConfig) -> bool:
    """Only conversation data can hold rows without an image (text-only instructions)."""
    return any(source.format == "llava" for source in stage.data.sources)


# ------------------------------------------------------------------------------------------ precision

NORMS = (nn.LayerNorm, nn.RMSNorm, LlamaRMSNorm)
"""Normalisation layers, whose weights :func:`prepare_precision` keeps in float32."""


def prepare_precision(model: nn.Module, stage: StageConfig, device: torch.device) -> None:
    """Store every parameter in the dtype the stage needs; call it after ``apply_trainable``, before ``wrap``.

    Trainable parameters are float32 masters (autocast, or FSDP2's policy, computes them in bfloat16). Frozen
    ones are stored in bfloat16 when the stage computes in bf16, float32 otherwise: autocast caches its casts
    only for weights that require gradients, so a float32 frozen weight would be cast again in every forward
    and that copy kept for the backward (13 GB for the frozen 6.7B decoder of stage 1, on top of its 27 GB of
    float32 storage). A bfloat16 weight goes through autocast as it is; with frozen embeddings the decoder's
    residual stream is then bfloat16, as under FSDP2's bf16 policy. With fp32 precision a float32 model
    is left unchanged, and a checkpoint written with bfloat16 frozen weights comes back as float32 for
    whatever the next stage trains. Frozen norms stay float32 too (0.01% of the weights): a frozen bfloat16
    LayerNorm fed by a trainable float32 tower (the abstractor after a trained vision encoder) fails under
    CPU autocast, which leaves ``layer_norm`` alone. Buffers keep their dtype: the only ones are the RoPE
    frequencies and the abstractor's sin-cos tables, fixed tables that must stay float32
    (``reset_fixed_buffers``).
    """
    frozen = torch.bfloat16 if use_bf16(stage, device) else torch.float32
    with torch.no_grad():
        for module in model.modules():
            norm = isinstance(module, NORMS)
            for param in module.parameters(recurse=False):
                target = torch.float32 if param.requires_grad or norm else frozen
                if param.is_floating_point() and param.dtype != target:
                    # In place of the storage, not of the Parameter: tied weights and hooks keep their object.
                    param.data = param.data.to(target)


# ------------------------------------------------------------------------------------------ wrapping


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def layer_stacks(model: nn.Module) -> dict[str, nn.ModuleList | nn.Sequential]:
    """The repeated layers of the three towers, by their path in the model. The MLP projector (``model.projector:
    mlp``) has no layers: it stays with the root."""
    stacks = {"vision.blocks": model.vision.blocks}
    if hasattr(model.abstractor, "layers"):  # asked, not imported: this module imports no model code
        stacks["abstractor.layers"] = model.abstractor.layers
    stacks["decoder.layers"] = model.decoder.layers
    return stacks


def shard_plan(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The FSDP2 units in the order ``fully_shard`` is applied: every layer of each tower, the root last."""
    units = [
        (f"{path}.{index}", layer) for path, stack in layer_stacks(model).items() for index, layer in enumerate(stack)
    ]
    return units + [("", model)]


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every layer of the three towers in the backward pass instead of keeping its activations.

    The decoder and the vision encoder use their own switches (transformers checkpoints ``forward``, so FSDP2's
    hooks stay outside the checkpoint; timm's blocks run under FSDP2's recompute-aware hooks); the abstractor,
    which has none, gets the hook-based composable checkpoint. Neither wraps a module, so parameter names and
    state-dict keys stay those of the bare model.
    """
    from torch.distributed._composable import checkpoint

    model.activation_checkpointing_enable()
    model.vision.set_grad_checkpointing(True)
    for layer in layer_stacks(model).get("abstractor.layers", []):
        checkpoint(layer)


def use_compile(stage: StageConfig, device: torch.device) -> bool:
    """Whether the stage compiles its layers: ``compile: true``, or ``auto`` on a GPU."""
    return stage.compile is True or (stage.compile == "auto" and device.type == "cuda")


def compile_layers(model: nn.Module, backend: str = "inductor") -> None:
    """``torch.compile`` every layer of the three towers, each on its own: not the whole model, whose forward
    splices images into the sequence with shapes known only on the host (torchtitan compiles per block too).

    In place (``nn.Module.compile``): no wrapper module, so parameter names and state-dict keys stay those of
    the bare model (no ``_orig_mod.``). Dynamo compiles the layer's ``forward`` and leaves the module's hooks
    (FSDP2's, the abstractor's checkpoint) to run around it eagerly. The layers of a tower share the code of one
    ``forward`` and, their parameters being graph inputs, its compiled graphs.

    ``dynamic=True``: the sequence length, the number of images and the text and visual row counts of the
    routing are symbolic from the first compile, so a new length or mix of images reuses the graph (the default,
    static first, would compile each kind of batch twice). Still compiled apart: a batch without images (no
    routing; under FSDP2 an empty visual group), a size of 1 where it is usually larger (one image, one row:
    Dynamo specialises it), forwards without gradients (validation), under FSDP2 with checkpointing the
    vision blocks' recompute, and once a first length that equals a fixed width (Dynamo then takes them for one
    size). That makes a few graphs per tower (``tests/test_compile.py`` counts them) against
    Dynamo's limit of 8 per ``forward``, past which a new kind of batch would run eagerly (with a warning).
    No ``fullgraph=True``: it makes Dynamo trace the hooks too, and neither FSDP2's nor the checkpoint's can be.
    """
    for stack in layer_stacks(model).values():
        for layer in stack:
            compile_layer(layer, backend)


def compile_layer(layer: nn.Module, backend: str = "inductor") -> None:
    """One layer compiled in place as :func:`compile_layers` compiles each (lazily: at its first call)."""
    layer.compile(backend=backend, dynamic=True)


def prepare_layers(model: nn.Module, stage: StageConfig, device: torch.device, backend: str = "inductor") -> None:
    """Activation checkpointing, then compilation of every layer, as the stage asks; before FSDP2's
    ``fully_shard`` (torchtitan's order: checkpoint, compile each block, shard). The decoder layers checkpoint
    inside their compiled ``forward``; the vision blocks and abstractor layers are compiled inside their
    checkpoint."""
    if stage.activation_checkpointing:
        apply_activation_checkpointing(model)
    if use_compile(stage, device):
        compile_layers(model, backend)


def wrap(
    model: nn.Module, stage: StageConfig, device: torch.device, mesh: Any = None, *, defer_fsdp_sync: bool = False
) -> nn.Module:
    """The stage's data-parallel model: ``model`` under DDP (through Ray Train) or sharded with FSDP2, its layers
    checkpointed and compiled as the stage asks (:func:`prepare_layers`).

    Call it after ``apply_trainable`` and :func:`prepare_precision`, before building the optimizer. ``mesh``
    (FSDP2 only) defaults to one dimension over the whole process group. ``defer_fsdp_sync`` makes
    :func:`gradient_sync` skip FSDP2's reduce-scatter on all but the last micro-batch (see there); it is
    recorded on the returned model.
    """
    prepare_layers(model, stage, device)
    if stage.strategy == "fsdp":
        wrapped = shard(model, mesh, bf16=use_bf16(stage, device), device=device)
        wrapped._owl2_defer_sync = defer_fsdp_sync
        return wrapped
    import ray.train.torch

    model.to(device)
    return ray.train.torch.prepare_model(model, parallel_strategy="ddp", parallel_strategy_kwargs=ddp_options(stage))


def ddp_options(stage: StageConfig) -> dict[str, bool]:
    """Keyword arguments of ``DistributedDataParallel`` for the stage (through Ray's ``prepare_model``).

    Micro-batches of text-only rows leave the vision side without gradients; DDP must then look for unused
    parameters (a graph walk per step), so only where such rows can occur. ``gradient_as_bucket_view`` makes
    the gradients views into DDP's all-reduce buckets instead of a second copy (4 bytes per trainable
    parameter: 5.8 GB for stage 1's 1.46B).
    """
    return {"find_unused_parameters": text_only_rows_possible(stage), "gradient_as_bucket_view": True}


def shard(model: nn.Module, mesh: Any = None, *, bf16: bool = False, device: torch.device | None = None) -> nn.Module:
    """Apply FSDP2 to ``model`` in place (per :func:`shard_plan`) and return it.

    With ``bf16`` the units gather their parameters in bfloat16 for compute while the trainable shards, the
    gradients' reduction and the optimizer stay float32. The parameters move to the mesh's device unit by unit,
    so a model loaded on the CPU never has to fit on one GPU whole.

    A unit may mix frozen and trainable parameters (stage 1's decoder layers: frozen shared weights, trainable
    visual K/V and norms): FSDP2 reduce-scatters gradients of the trainable ones only and needs only those to
    share one dtype, which :func:`prepare_precision` makes float32. Frozen shards stay in the dtype it gave
    them: bfloat16 ones are gathered as they are (the policy's dtype), the float32 norms cast for the gather.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mesh is None:
        device_type = (device or torch.device("cpu")).type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh} | ({"mp_policy": policy} if policy is not None else {})
    for _, unit in shard_plan(model):
        fully_shard(unit, **kwargs)
    model.decoder.register_forward_pre_hook(functools.partial(_visit_every_unit, model), with_kwargs=True)
    return model


def _visit_every_unit(
    owl2: nn.Module, decoder: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, Any] | None:
    """Make a forward without images run the vision and visual branches too, contributing exactly zero.

    FSDP2 gathers each unit's parameters when the unit runs and reduce-scatters the gradients it received: every
    rank must run the same units with the same gradients present, or the collectives disagree and the job
    hangs. A rank whose micro-batch is all text would skip the vision encoder, the abstractor and the visual
    copies of the decoder's norms and K/V while another rank runs them. So a text-only forward encodes one
    black image and adds ``0 *`` its sum to the embeddings, and routes with an all-text mask: the visual
    copies run on no token (their gradients are zeros) and the output is unchanged.
    """
    if kwargs.get("visual_mask") is not None:
        return None
    embeds = args[0] if args else kwargs["inputs_embeds"]
    size = owl2.vision.patch_embed.img_size
    black = embeds.new_zeros(1, 3, size[0], size[1])
    zero = owl2.encode_images(black).sum().to(embeds.dtype) * 0
    all_text = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
    kwargs = {**kwargs, "visual_mask": all_text, "visual_tokens": 0}
    if args:
        return (embeds + zero, *args[1:]), kwargs
    return args, {**kwargs, "inputs_embeds": embeds + zero}


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# ------------------------------------------------------------------------------------------ stepping


@contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Context for one micro-batch's forward and backward; ``sync=False`` on all but the last of a step.

    DDP skips its all-reduce (``no_sync``). FSDP2 reduce-scatters every micro-batch by default, so gradients
    accumulate in sharded form: deferring the reduction (``wrap(..., defer_fsdp_sync=True)``,
    ``set_requires_gradient_sync``) saves that communication but holds an unsharded float32 gradient of every
    trainable parameter until the step's last backward, 4 bytes per parameter (33 GB for the 8.2B model).
    """
    if isinstance(model, nn.parallel.DistributedDataParallel):
        with nullcontext() if sync else model.no_sync():
            yield
    elif is_sharded(model) and getattr(model, "_owl2_defer_sync", False):
        model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm over all ranks' shards before clipping, a 0-d tensor on the device (not read,
    so no host sync); the gradients are clipped to ``max_norm`` when it is positive.

    The norm is the same on every rank: DDP's gradients are already all-reduced, and FSDP2's shard norms are
    reduced over the mesh here, so ranks can act on it (skip a non-finite step) without another collective.
    """
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([param.grad for param in model.parameters() if param.grad is not None])
    # Over DTensor shards the norm is a DTensor too (reduced over the mesh by full_tensor).
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def peak_memory_gb(device: torch.device) -> float | None:
    """Most accelerator memory this process's tensors held so far, in GiB (None off CUDA)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


# ------------------------------------------------------------------------------------------ checkpoint state


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def model_state_for_checkpoint(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The bare model's full state dict on rank 0, None elsewhere. Every rank must call it (FSDP2 gathers)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_full_state_options(load=False))
        return state if _rank() == 0 else None
    return unwrap(model).state_dict() if _rank() == 0 else None


def optimizer_state_for_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """``optimizer.state_dict()`` of the unsharded run on rank 0 (None elsewhere); every rank must call it.

    Under FSDP2 the full state is gathered and renumbered into torch's own layout (state keyed by the
    parameter's position over the groups), so a checkpoint reads the same whichever strategy wrote it.
    """
    if not is_sharded(model):
        return optimizer.state_dict() if _rank() == 0 else None
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_full_state_options(load=False))
    if _rank() != 0:
        return None
    names = _names_in_order(optimizer)
    index = {name: position for position, name in enumerate(names)}
    state = {index[name]: value for name, value in by_name["state"].items()}
    groups, start = [], 0
    for group, own in zip(by_name["param_groups"], optimizer.param_groups, strict=True):
        count = len(own["params"])
        groups.append({**group, "params": list(range(start, start + count))})
        start += count
    return {"state": state, "param_groups": groups}


def reads_full_state(model: nn.Module | None) -> bool:
    """Whether this rank must read a full state from disk to load it: all ranks under DDP, rank 0 under FSDP2
    (the others receive their shards from it, so a node holds one full copy of the state, not one per GPU)."""
    return not is_sharded(model) or _rank() == 0


def load_optimizer_state(
    model: nn.Module | None, optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any] | None
) -> None:
    """Load an ``optimizer.state_dict()``-layout state (as :func:`optimizer_state_for_checkpoint` writes it).

    ``model`` is the wrapped model the optimizer belongs to. Under FSDP2 every rank must call this; rank 0
    passes the full state and the others may pass None (see :func:`reads_full_state`).
    """
    if not is_sharded(model):
        optimizer.load_state_dict(state_dict)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    by_name: dict[str, Any] = {}
    if _rank() == 0:
        names = _names_in_order(optimizer)
        groups = list(state_dict["param_groups"])
        if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
            raise ValueError("the optimizer state's groups differ from the optimizer's (saved for another stage spec?)")
        by_name = {
            "state": {names[int(position)]: value for position, value in state_dict["state"].items()},
            "param_groups": [
                {**group, "params": [names[int(position)] for position in group["params"]]} for group in groups
            ],
        }
    tuples = [{key for key, value in group.items() if isinstance(value, tuple)} for group in optimizer.param_groups]
    set_optimizer_state_dict(model, optimizer, by_name, options=_full_state_options(load=True))
    # The broadcast flattens the groups and brings tuples (AdamW's betas) back as lists: keep torch's types.
    for group, keys in zip(optimizer.param_groups, tuples, strict=True):
        group.update({key: tuple(group[key]) for key in keys if isinstance(group[key], list)})


def load_model_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None) -> None:
    """Load a full bare-model state dict; under FSDP2 every rank calls this, rank 0 with the state, and each
    keeps its shards (the others may pass None)."""
    if not is_sharded(model):
        unwrap(model).load_state_dict(state_dict)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, dict(state_dict or {}) if _rank() == 0 else {}, options=_full_state_options(load=True))


def _full_state_options(*, load: bool) -> Any:
    """Saving gathers every tensor whole to rank 0's CPU memory; loading sends rank 0's tensors to the others."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    if load:
        return StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _names_in_order(optimizer: torch.optim.Optimizer) -> list[str]:
    """The bare-model names of the optimizer's parameters over its groups (``build_param_groups`` records them)."""
    names = []
    for group in optimizer.param_groups:
        if "param_names" not in group:
            raise ValueError("the optimizer's groups lack param_names: build it with owl2.train.optim.build_optimizer")
        names.extend(group["param_names"])
    return names
