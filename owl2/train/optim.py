"""Optimizer policy of a stage: what trains, parameter groups with layer-wise LR decay, AdamW and its schedule.

The policy comes from hooks on the model (timm style): ``no_weight_decay()`` names the parameters AdamW
must not decay, ``param_group_info(name)`` places a parameter in a module and a layer, and
``visual_branch_parameter_names()`` names what the ``decoder.visual`` part trains. Every function here
accepts the bare model or a wrapped one (DDP, FSDP2, ``torch.compile``, activation checkpointing): names are
compared after dropping the wrappers' path components (:func:`canonical_name`).

Two bugs of the official training code cannot happen here, and :func:`verify_optimizer_setup` would catch
their kind: its per-module LR (``--visual_abstractor_lr``) selected parameters by a name that matches
nothing, and its LoRA path re-enabled gradients on every weight after freezing.

Learning rates. Group ``g`` gets ``lr * module_lr_scale * layer_decay ** (num_layers - layer_id)`` with
``(module, layer_id, num_layers)`` from ``param_group_info``. For the vision encoder (BEiT/EVA convention,
n blocks): embeddings have layer id 0, block i has i + 1, the final norm n + 1 = num_layers, so the final
norm gets 1, the last block ``layer_decay``, the first block ``layer_decay ** n`` and the embeddings
``layer_decay ** (n + 1)`` (0.9 ** 25 ~= 0.072 for ViT-L's 24 blocks). The abstractor and the decoder (with
``lm_head``) have ``layer_id = num_layers = 0``: just their module scale. :func:`warmup_cosine` multiplies
every group's peak LR by the same factor, so the ratios hold throughout training.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from owl2.config import TRAINABLE_PARTS, OptimConfig
from owl2.train.parallel import unwrap

MODULES = ("vision", "abstractor", "decoder")
"""The modules of the LR policy, in group order; ``decoder`` includes ``lm_head``."""

# Path components that wrappers insert: torch.compile (``_orig_mod``, also around a single block), FSDP1
# and activation checkpointing (wherever they wrap). DDP's ``module`` is only stripped in front, since a
# model may well have a submodule called ``module``. FSDP2's ``fully_shard`` keeps names unchanged.
_WRAPPER_COMPONENTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
_LEADING_WRAPPER_COMPONENTS = _WRAPPER_COMPONENTS | {"module"}

_PART_PREFIXES = {"vision": "vision.", "abstractor": "abstractor.", "decoder": "decoder.", "lm_head": "lm_head."}

_PREVIEW = 12
"""Names listed per problem in an error message."""


class OptimizerSetupError(RuntimeError):
    """The trainable parameters or the optimizer's groups do not match the stage spec."""


# ------------------------------------------------------------------------------------------ names


def canonical_name(name: str) -> str:
    """A parameter's name in the bare model: ``module._orig_mod.decoder.norm.weight`` -> ``decoder.norm.weight``."""
    parts = name.split(".")
    start = 0
    while start < len(parts) - 1 and parts[start] in _LEADING_WRAPPER_COMPONENTS:
        start += 1
    return ".".join(part for part in parts[start:] if part not in _WRAPPER_COMPONENTS)


def _named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(canonical_name(name), param) for name, param in model.named_parameters()]


def _policy_model(model: nn.Module, hooks: tuple[str, ...] = ("no_weight_decay", "param_group_info")) -> nn.Module:
    """The bare model, checked to have the policy ``hooks`` it is about to be asked."""
    inner = unwrap(model)
    for hook in hooks:
        if not callable(getattr(inner, hook, None)):
            raise TypeError(
                f"{type(inner).__name__} has no {hook}() hook: the optimizer policy needs {', '.join(hooks)}"
            )
    return inner


# ------------------------------------------------------------------------------------------ trainable set


def _check_parts(parts: Sequence[str]) -> None:
    if isinstance(parts, str):
        raise TypeError(f"trainable parts must be a list of names, got the string {parts!r}")
    unknown = [part for part in parts if part not in TRAINABLE_PARTS]
    if unknown or not parts:
        raise ValueError(f"trainable parts {list(parts)} must be a non-empty subset of {list(TRAINABLE_PARTS)}")


def visual_copies(model: nn.Module) -> set[str]:
    """Names of the decoder's visual-branch parameters (modality-adaptive norms, K/V), as the model declares them."""
    inner = _policy_model(model, ("visual_branch_parameter_names",))
    # Wrappers inside the model (a compiled block, FSDP1 or checkpoint wrappers) show in the names it reports.
    return {canonical_name(name) for name in inner.visual_branch_parameter_names()}


def expected_trainable(model: nn.Module, parts: Sequence[str]) -> set[str]:
    """The parameter names a stage with ``trainable: parts`` must train (see ``StageConfig.trainable``).

    ``all``: everything. ``vision``, ``abstractor``: that module. ``decoder``: embeddings, every layer
    (both modality copies) and the final norm, not ``lm_head``, which is its own part. ``decoder.visual``:
    only the visual copies of the modality-adaptive norms and K/V projections (the paper's stage 1).
    """
    _check_parts(parts)
    names = [name for name, _ in _named_parameters(model)]
    if "all" in parts:
        return set(names)
    prefixes = tuple(_PART_PREFIXES[part] for part in parts if part in _PART_PREFIXES)
    expected = {name for name in names if name.startswith(prefixes)} if prefixes else set()
    if "decoder.visual" in parts:
        expected |= visual_copies(model)
    return expected


def apply_trainable(model: nn.Module, parts: Sequence[str]) -> None:
    """Set ``requires_grad`` on every parameter: True exactly for :func:`expected_trainable`."""
    expected = expected_trainable(model, parts)
    for name, param in _named_parameters(model):
        param.requires_grad_(name in expected)


def trainable_names(model: nn.Module) -> set[str]:
    """Names of the parameters that currently require gradients."""
    return {name for name, param in _named_parameters(model) if param.requires_grad}


# ------------------------------------------------------------------------------------------ groups


def _group_name(module: str, layer_id: int, num_layers: int, decay: bool) -> str:
    suffix = "decay" if decay else "no_decay"
    return f"{module}.layer_{layer_id:02d}.{suffix}" if num_layers else f"{module}.{suffix}"


def build_param_groups(model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters, one per (module, layer id, decayed or not).

    Each group holds ``params``, ``lr`` (peak), ``weight_decay`` (0 for the model's ``no_weight_decay()``
    names) and, for logs and checks, ``name`` (e.g. ``vision.layer_07.decay``), ``lr_scale``, ``module``,
    ``layer_id`` and ``param_names`` (torch's own key for named parameters: it is saved with the optimizer
    state). Groups are ordered by module (vision, abstractor, decoder), layer id, decayed first, and
    parameters by model order, so a resumed optimizer state lines up with the same groups.
    """
    inner = _policy_model(model)
    no_decay = inner.no_weight_decay()
    module_scales = {
        "vision": optim.vision_lr_scale,
        "abstractor": optim.abstractor_lr_scale,
        "decoder": optim.decoder_lr_scale,
    }
    groups: dict[tuple[int, int, bool], dict[str, Any]] = {}
    for name, param in _named_parameters(model):
        if not param.requires_grad:
            continue
        module, layer_id, num_layers = inner.param_group_info(name)
        if module not in module_scales:
            raise ValueError(f"param_group_info({name!r}) gave module {module!r}; expected one of {list(MODULES)}")
        if not 0 <= layer_id <= num_layers:
            raise ValueError(f"param_group_info({name!r}) gave layer id {layer_id} outside [0, {num_layers}]")
        decay = name not in no_decay
        key = (MODULES.index(module), layer_id, not decay)
        if key not in groups:
            lr_scale = module_scales[module] * optim.layer_decay ** (num_layers - layer_id)
            groups[key] = {
                "name": _group_name(module, layer_id, num_layers, decay),
                "params": [],
                "param_names": [],
                "lr": optim.lr * lr_scale,
                "lr_scale": lr_scale,
                "weight_decay": optim.weight_decay if decay else 0.0,
                "module": module,
                "layer_id": layer_id,
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    if not groups:
        raise ValueError("no parameter requires gradients: call apply_trainable() with the stage's parts first")
    return [groups[key] for key in sorted(groups)]


def group_table_rows(groups: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One plain dict per group (name, module, layer id, LR scale, peak LR, weight decay, tensors, params).

    The peak LR is the group's ``initial_lr`` once a scheduler has set it, else its ``lr``.
    """
    return [
        {
            "group": group.get("name", f"#{index}"),
            "module": group.get("module", ""),
            "layer_id": group.get("layer_id", 0),
            "lr_scale": group.get("lr_scale", 1.0),
            "lr": group.get("initial_lr", group["lr"]),
            "weight_decay": group["weight_decay"],
            "tensors": len(group["params"]),
            "params": sum(param.numel() for param in group["params"]),
        }
        for index, group in enumerate(groups)
    ]


def format_group_table(groups: Iterable[dict[str, Any]]) -> str:
    """The groups as an aligned text table with a total row, for start-up logs."""
    from owl2.tables import Column, format_table

    rows = group_table_rows(groups)
    columns = [
        Column("group", align="<"),
        Column("module", align="<"),
        Column("layer_id", "layer id"),
        Column("lr_scale", "lr scale", ".6g"),
        Column("lr", spec=".4g"),
        Column("weight_decay", "weight decay", "g"),
        Column("tensors"),
        Column("params", spec=","),
    ]
    total = {"group": "total", "tensors": sum(r["tensors"] for r in rows), "params": sum(r["params"] for r in rows)}
    return format_table(rows, columns, rules=True, footer=[total])


# ------------------------------------------------------------------------------------------ checks


def _preview(names: Iterable[str]) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - _PREVIEW} more" if len(names) > _PREVIEW else ""
    return ", ".join(names[:_PREVIEW]) + more


def verify_optimizer_setup(
    model: nn.Module, optimizer_or_groups: torch.optim.Optimizer | Iterable[dict[str, Any]], parts: Sequence[str]
) -> None:
    """Check, after all wrapping, that the stage trains exactly ``parts`` and the optimizer covers exactly that.

    The trainable set must equal :func:`expected_trainable`; every trainable parameter must sit in exactly
    one group (by identity), no frozen parameter and no foreign tensor in any group, and a group's
    ``param_names``, where present, must name its tensors. Wrappers that replace the parameters (FSDP2's
    ``fully_shard``) must therefore come before the optimizer. Raises :class:`OptimizerSetupError` listing
    every difference.
    """
    if isinstance(optimizer_or_groups, torch.optim.Optimizer):
        groups = optimizer_or_groups.param_groups
    else:
        groups = list(optimizer_or_groups)
    named = _named_parameters(model)
    by_id = {id(param): (name, param) for name, param in named}
    problems = []

    expected, actual = expected_trainable(model, parts), trainable_names(model)
    if expected - actual:
        problems.append(f"{len(expected - actual)} parameter(s) of the stage are frozen: {_preview(expected - actual)}")
    if actual - expected:
        problems.append(
            f"{len(actual - expected)} parameter(s) train outside the stage's parts: {_preview(actual - expected)}"
        )

    homes: dict[int, list[str]] = defaultdict(list)
    for index, group in enumerate(groups):
        label = group.get("name", f"#{index}")
        foreign = [param for param in group["params"] if id(param) not in by_id]
        if foreign:
            problems.append(
                f"group {label} holds {len(foreign)} tensor(s) that are not parameters of the model (was the "
                "optimizer built before a wrapper replaced the parameters?)"
            )
        for param in group["params"]:
            if id(param) in by_id:
                homes[id(param)].append(label)
        names = group.get("param_names")
        if names is not None and list(names) != [by_id.get(id(param), ("?",))[0] for param in group["params"]]:
            problems.append(f"group {label}: param_names do not name its tensors (a state from other groups?)")

    ungrouped = [name for name, param in named if param.requires_grad and id(param) not in homes]
    frozen = [f"{by_id[i][0]} (in {', '.join(homes[i])})" for i in homes if not by_id[i][1].requires_grad]
    repeated = [f"{by_id[i][0]} (in {', '.join(homes[i])})" for i in homes if len(homes[i]) > 1]
    if ungrouped:
        problems.append(f"{len(ungrouped)} trainable parameter(s) are in no group: {_preview(ungrouped)}")
    if frozen:
        problems.append(f"{len(frozen)} frozen parameter(s) are in a group: {_preview(frozen)}")
    if repeated:
        problems.append(f"{len(repeated)} parameter(s) are in more than one group: {_preview(repeated)}")
    if problems:
        raise OptimizerSetupError(
            f"optimizer set-up does not match the stage's trainable parts {list(parts)}:\n  - "
            + "\n  - ".join(problems)
        )


# ------------------------------------------------------------------------------------------ optimizer, schedule


def build_optimizer(model: nn.Module, optim: OptimConfig) -> tuple[torch.optim.AdamW, list[dict[str, Any]]]:
    """AdamW over :func:`build_param_groups`; the groups are returned too (they are the optimizer's own dicts).

    Build it after any wrapper that replaces parameters (FSDP2), and before DDP or compile, which keep them.
    The optimizer is torch's fused AdamW (CPU and CUDA kernels): it alone honours ``optimizer.found_inf``, the
    device flag with which :class:`~owl2.train.step.TrainStep` skips a non-finite step without a host sync.
    """
    groups = build_param_groups(model, optim)
    optimizer = torch.optim.AdamW(
        groups,
        lr=optim.lr,
        betas=(optim.betas[0], optim.betas[1]),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        fused=True,
    )
    return optimizer, groups


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR for the update made after ``step`` completed updates (0-based).

    Warm-up, ``step < warmup_steps``: ``(step + 1) / warmup_steps``, so the first update already moves
    (``1 / warmup_steps``) and update ``warmup_steps - 1`` runs at the peak. Then a half cosine from 1 at
    ``step = warmup_steps`` to ``min_lr_ratio`` at ``step = max_steps``:
    ``min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * (step - warmup_steps) / (max_steps - warmup_steps))) / 2``,
    held at ``min_lr_ratio`` beyond.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> LambdaLR:
    """Linear warm-up then cosine decay (:func:`lr_factor`), applied to every group's own peak LR.

    LambdaLR multiplies each group's ``initial_lr``, so layer-wise and per-module scales are kept, and each
    group ends at its own ``lr * min_lr_ratio``. Call ``scheduler.step()`` after every ``optimizer.step()``.
    The factor is a plain function of the arguments, not saved with the scheduler's state: a resumed run
    follows the schedule of its current config.
    """
    if max_steps <= 0:
        raise ValueError(f"max_steps must be positive, got {max_steps}")
    if not 0 <= warmup_steps <= max_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) must lie in [0, max_steps={max_steps}]: a longer warm-up never reaches "
            "the peak learning rate (set optim.warmup_steps for short stages)"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must lie in [0, 1], got {min_lr_ratio}")
    factor = functools.partial(lr_factor, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio)
    return LambdaLR(optimizer, factor)
