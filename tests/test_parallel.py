"""DDP/FSDP2 wrapping: the shard plan, activation checkpointing, and FSDP2 on two CPU processes (gloo).

The FSDP2 scenarios run once, in one two-process group (``torch.multiprocessing.spawn``), and leave their
results in files that the tests compare with a plain single-process run of the same batches: gradients,
updated parameters and optimizer state (fp32), the full state dict gathered to rank 0, and a checkpoint
save -> load round trip that continues exactly. They call ``owl2.train.parallel`` directly: the config
keeps refusing ``strategy: fsdp`` without GPUs, since FSDP2 on CPU is for tests only.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from owl2.config import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    ModelConfig,
    OptimConfig,
    StageConfig,
    build,
    load_experiment,
    load_yaml,
)
from owl2.model import Owl2Config, Owl2ForCausalLM
from owl2.train import checkpoint as ckpt
from owl2.train import parallel
from owl2.train.optim import apply_trainable, build_optimizer, verify_optimizer_setup, warmup_cosine
from owl2.train.parallel import unwrap
from owl2.train.step import TrainStep

WORLD = 2
RECIPE = Path(__file__).resolve().parents[1] / "experiments" / "owl2_7b"
STAGE1 = ["vision", "abstractor", "decoder.visual"]
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.05, grad_clip=0.5)
# Each scenario: trainable parts, micro-batches per rank, rank whose micro-batches are text only (-1: none),
# activation checkpointing, deferred FSDP gradient sync. Batches differ per rank, micro-batch and scenario.
SCENARIOS: dict[str, dict[str, Any]] = {
    "accumulate": {"parts": ["all"], "micro": 2, "text_rank": -1, "ac": False, "defer": False},
    "text_only_rank_with_checkpointing": {"parts": ["all"], "micro": 1, "text_rank": 0, "ac": True, "defer": False},
    "stage1_deferred_sync": {"parts": STAGE1, "micro": 2, "text_rank": -1, "ac": False, "defer": True},
}


def _model(seed: int = 0) -> Owl2ForCausalLM:
    torch.manual_seed(seed)
    return Owl2ForCausalLM(Owl2Config.from_spec(ModelConfig.from_preset("debug")))


def _batch(seed: int, images: bool = True) -> dict[str, Any]:
    """Two rows of 12 tokens; with ``images`` row 0 holds one image and row 1 two; labels skip placeholders."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (2, 12), generator=generator)
    counts = [0, 0]
    if images:
        ids[0, 1] = ids[1, 1] = ids[1, 6] = IMAGE_TOKEN_INDEX
        counts = [1, 2]
    labels = torch.where(ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX, ids)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "image_counts": counts}
    if images:
        batch["images"] = torch.randn(3, 3, 56, 56, generator=generator)
    return batch


def _batches(name: str, rank: int) -> list[dict[str, Any]]:
    spec = SCENARIOS[name]
    base = 1000 * list(SCENARIOS).index(name) + 10 * rank
    return [_batch(base + micro, images=rank != spec["text_rank"]) for micro in range(spec["micro"])]


def _prepare(model: Owl2ForCausalLM, parts: list[str], ac: bool) -> Owl2ForCausalLM:
    model.train()
    apply_trainable(model, parts)
    if ac:
        parallel.apply_activation_checkpointing(model)
    return model


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict[str, Any]]) -> float:
    """One optimizer step over ``batches`` as the loop takes it; the loss of the last micro-batch."""
    optimizer.zero_grad(set_to_none=True)
    for micro, batch in enumerate(batches):
        with parallel.gradient_sync(model, sync=micro == len(batches) - 1):
            loss = model(**batch, use_cache=False).loss
            (loss / len(batches)).backward()
    parallel.clip_grad_norm(model, OPTIM.grad_clip)
    optimizer.step()
    return float(loss.detach())


def _reference(name: str) -> dict[str, Any]:
    """The scenario in one process without any wrapper: the mean over ranks of each rank's step loss."""
    spec = SCENARIOS[name]
    model = _prepare(_model(), spec["parts"], spec["ac"])
    optimizer, _ = build_optimizer(model, OPTIM)
    optimizer.zero_grad(set_to_none=True)
    for rank in range(WORLD):
        for batch in _batches(name, rank):
            (model(**batch, use_cache=False).loss / (spec["micro"] * WORLD)).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip))
    optimizer.step()
    return {"grads": grads, "norm": norm, "model": model.state_dict(), "optimizer": optimizer.state_dict()}


# ------------------------------------------------------------------------------------------ the two workers


def _gathered_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # two processes on a two-core machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        _scenarios(rank, Path(out))
        _round_trip(rank, Path(out))
        _mixed_precision(rank, Path(out))
        _stage1_frozen_bf16(rank, Path(out))
        _skip_nonfinite(rank, Path(out))
    finally:
        dist.destroy_process_group()


def _scenarios(rank: int, out: Path) -> None:
    for name, spec in SCENARIOS.items():
        model = _prepare(_model(), spec["parts"], spec["ac"])
        wrapped = parallel.shard(model)
        wrapped._owl2_defer_sync = spec["defer"]
        optimizer, _ = build_optimizer(wrapped, OPTIM)  # after sharding: its tensors are the DTensor shards
        verify_optimizer_setup(wrapped, optimizer, spec["parts"])
        optimizer.zero_grad(set_to_none=True)
        batches = _batches(name, rank)
        for micro, batch in enumerate(batches):
            with parallel.gradient_sync(wrapped, sync=micro == len(batches) - 1):
                (wrapped(**batch, use_cache=False).loss / len(batches)).backward()
        grads = _gathered_grads(wrapped)
        norm = float(parallel.clip_grad_norm(wrapped, OPTIM.grad_clip))
        optimizer.step()
        result = {
            "grads": grads,
            "norm": norm,
            "model": parallel.model_state_for_checkpoint(wrapped),
            "optimizer": parallel.optimizer_state_for_checkpoint(wrapped, optimizer),
            "sharded": all(type(p).__name__ == "DTensor" for p in wrapped.parameters()),
            "units": sum(isinstance(m, torch.distributed.fsdp.FSDPModule) for m in wrapped.modules()),
        }
        if rank == 0:
            torch.save(result, out / f"{name}.pt")
        else:
            assert result["model"] is None and result["optimizer"] is None  # only rank 0 holds full states


def _round_trip(rank: int, out: Path) -> None:
    """Train a step, save a checkpoint, load it into a new sharded model, continue both: the same weights."""
    model = _prepare(_model(), ["all"], ac=False)
    wrapped = parallel.shard(model)
    optimizer, _ = build_optimizer(wrapped, OPTIM)
    scheduler = warmup_cosine(optimizer, 1, 10, 0.1)
    _train_step(wrapped, optimizer, [_batch(7 + rank)])
    scheduler.step()
    saved_model = parallel.model_state_for_checkpoint(wrapped)
    saved_optimizer = parallel.optimizer_state_for_checkpoint(wrapped, optimizer)
    folder = out / "checkpoint"
    if rank == 0:
        state = ckpt.TrainState(stage="stage2", step=1)
        ckpt.save(folder, unwrap(wrapped), saved_optimizer, scheduler, state, "name: test\n", model_state=saved_model)
    dist.barrier()

    # As the loop resumes: every rank reads the weights, shards, builds its optimizer, then loads its state.
    resumed = parallel.shard(_prepare(Owl2ForCausalLM.from_pretrained(folder), ["all"], ac=False))
    resumed_optimizer, _ = build_optimizer(resumed, OPTIM)
    resumed_scheduler = warmup_cosine(resumed_optimizer, 1, 10, 0.1)
    train_state = ckpt.load_training_state(folder, resumed_optimizer, resumed_scheduler, model=resumed)
    loaded_model = parallel.model_state_for_checkpoint(resumed)
    loaded_optimizer = parallel.optimizer_state_for_checkpoint(resumed, resumed_optimizer)

    # The model-state loader on its own: rank 0 sends the full state into another initialisation's shards.
    other = parallel.shard(_prepare(_model(seed=1), ["all"], ac=False))
    parallel.load_model_state(other, saved_model if rank == 0 else None)
    broadcast = parallel.model_state_for_checkpoint(other)

    batch = _batch(20 + rank)
    _train_step(wrapped, optimizer, [batch])
    _train_step(resumed, resumed_optimizer, [batch])
    continued, continued_resumed = (parallel.model_state_for_checkpoint(m) for m in (wrapped, resumed))
    if rank == 0:
        torch.save(
            {
                "saved_model": saved_model,
                "saved_optimizer": saved_optimizer,
                "loaded_model": loaded_model,
                "loaded_optimizer": loaded_optimizer,
                "broadcast": broadcast,
                "step": train_state.step,
                "lr": [group["lr"] for group in resumed_optimizer.param_groups],
                "saved_lr": [group["lr"] for group in optimizer.param_groups],
                "continued": continued,
                "continued_resumed": continued_resumed,
            },
            out / "round_trip.pt",
        )


def _mixed_precision(rank: int, out: Path) -> None:
    """bf16 compute with float32 shards, reduction and optimizer: the loss stays near the fp32 loss."""
    model = _prepare(_model(), ["all"], ac=False)
    seen: list[torch.dtype] = []
    model.decoder.layers[0].mlp.register_forward_pre_hook(lambda module, args: seen.append(module.up_proj.weight.dtype))
    wrapped = parallel.shard(model, bf16=True)
    optimizer, _ = build_optimizer(wrapped, OPTIM)
    loss = _train_step(wrapped, optimizer, [_batch(30 + rank)])
    result = {
        "loss": loss,
        "compute_dtype": seen[0],
        "shard_dtypes": {p.dtype for p in wrapped.parameters()},
        "grad_dtypes": {p.grad.dtype for p in wrapped.parameters() if p.grad is not None},
        "model": parallel.model_state_for_checkpoint(wrapped),
    }
    if rank == 0:
        torch.save(result, out / "bf16.pt")


def _stage1_frozen_bf16(rank: int, out: Path) -> None:
    """Stage 1 as the 7B recipe can run it under FSDP2: frozen weights stored in bf16 next to float32 trainable
    ones in the same units (a decoder layer's visual K/V and norms), bf16 compute, rank 1 with text only."""
    model = _prepared(STAGE1, "bf16")
    before = {name: value.clone() for name, value in model.state_dict().items()}
    wrapped = parallel.shard(model, bf16=True)
    dtypes = {name: p.dtype for name, p in wrapped.named_parameters()}
    optimizer, _ = build_optimizer(wrapped, OPTIM)
    verify_optimizer_setup(wrapped, optimizer, STAGE1)
    loss, _ = _autocast_step(wrapped, _batch(50 + rank, images=rank == 0))
    grads = _gathered_grads(wrapped)
    parallel.clip_grad_norm(wrapped, OPTIM.grad_clip)
    optimizer.step()
    after = parallel.model_state_for_checkpoint(wrapped)
    after_optimizer = parallel.optimizer_state_for_checkpoint(wrapped, optimizer)

    # Into another initialisation's shards, as a resume loads them: the same full states come back.
    other = parallel.shard(_prepared(STAGE1, "bf16", _model(seed=1)), bf16=True)
    other_optimizer, _ = build_optimizer(other, OPTIM)
    parallel.load_model_state(other, after if rank == 0 else None)
    parallel.load_optimizer_state(other, other_optimizer, after_optimizer if rank == 0 else None)
    reloaded = parallel.model_state_for_checkpoint(other)
    reloaded_optimizer = parallel.optimizer_state_for_checkpoint(other, other_optimizer)
    if rank == 0:
        result = {"loss": loss, "dtypes": dtypes, "grads": grads, "before": before, "after": after}
        result |= {"optimizer": after_optimizer, "reloaded": reloaded, "reloaded_optimizer": reloaded_optimizer}
        torch.save(result, out / "stage1_bf16.pt")


def _skip_nonfinite(rank: int, out: Path) -> None:
    """Only rank 1's backward overflows (a finite loss, inf activation gradients): the norm reduced over the
    shards is inf on both ranks, so both skip the fused AdamW update of their DTensor shards."""
    wrapped = parallel.shard(_prepare(_model(), ["all"], ac=False))
    optimizer, _ = build_optimizer(wrapped, OPTIM)
    stepper = TrainStep(wrapped, optimizer, accumulation=1, grad_clip=OPTIM.grad_clip, device=torch.device("cpu"))

    def local_state() -> dict[str, torch.Tensor]:
        state = {name: p.to_local().clone() for name, p in wrapped.named_parameters()}
        for index, values in enumerate(optimizer.state.values()):
            state |= {f"{index}.{key}": getattr(v, "_local_tensor", v).clone() for key, v in values.items()}
        return state

    def overflow(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        output.register_hook(lambda grad: torch.full_like(grad, float("inf")))

    result = {}
    for step in range(2):  # the first step creates the optimizer state
        if step == 1:
            result["before"] = local_state()
            if rank == 1:
                unwrap(wrapped).abstractor.proj.register_forward_hook(overflow)
        optimizer.zero_grad(set_to_none=True)
        loss = wrapped(**_batch(60 + rank), use_cache=False).loss
        loss.backward()
        norm = parallel.clip_grad_norm(wrapped, OPTIM.grad_clip)
        stepper.guarded_update(norm)
    result |= {"loss": float(loss), "norm": float(norm), "after": local_state()}
    result["nonfinite"] = stepper.nonfinite_steps()
    torch.save(result, out / f"skip_{rank}.pt")


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Children inherit the environment (offline hub) and find this module through the inherited sys.path.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # One retry, of the whole run: once in six CI runs a child aborted in C++ ("terminate called without an
    # active exception", SIGABRT) with every Python-level step fine. The results of a run that finishes are
    # what the tests check, so a retry cannot pass a wrong result.
    for attempt in range(2):
        out = tmp_path_factory.mktemp("fsdp")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        try:
            mp.spawn(_worker, args=(port, str(out)), nprocs=WORLD, join=True)
            return out
        except mp.ProcessExitedException:
            if attempt:
                raise


def _load(folder: Path, name: str) -> dict[str, Any]:
    return torch.load(folder / f"{name}.pt", weights_only=False)


def _assert_same_states(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], **tolerance: float) -> None:
    assert set(ours) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(ours[key], value, msg=key, **tolerance)


def _assert_same_optimizer(ours: dict[str, Any], reference: dict[str, Any], **tolerance: float) -> None:
    assert set(ours["state"]) == set(reference["state"])
    for index, values in reference["state"].items():
        for key, value in values.items():
            torch.testing.assert_close(ours["state"][index][key], value, msg=f"{index}.{key}", **tolerance)
    assert ours["param_groups"] == reference["param_groups"]  # names, LRs, decay, param_names, indices


# ------------------------------------------------------------------------------------------ FSDP2 on CPU


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fsdp_step_equals_a_single_process_step(fsdp_results, name):
    ours, reference = _load(fsdp_results, name), _reference(name)
    assert ours["sharded"]
    assert ours["units"] == 2 + 2 + 2 + 1  # vision blocks, abstractor layers, decoder layers, root
    tight = {"atol": 1e-6, "rtol": 1e-5}
    _assert_same_states(ours["grads"], reference["grads"], **tight)
    assert ours["norm"] == pytest.approx(reference["norm"], rel=1e-5)
    assert ours["norm"] > OPTIM.grad_clip  # the clipping did something
    # Adam's first step divides by |grad|: where a gradient is near eps, float rounding of the reduction shows.
    _assert_same_states(ours["model"], reference["model"], atol=OPTIM.lr * 2e-3, rtol=1e-5)
    _assert_same_optimizer(ours["optimizer"], reference["optimizer"], **tight)


def test_text_only_rank_gives_zero_but_present_vision_gradients(fsdp_results):
    """A rank with no image still runs the vision units (else FSDP2's collectives disagree and hang)."""
    ours = _load(fsdp_results, "text_only_rank_with_checkpointing")
    assert any(key.startswith("vision.blocks.") for key in ours["grads"])
    assert any(".visual." in key for key in ours["grads"])


def test_full_state_dict_on_rank0_is_the_bare_models_layout(fsdp_results):
    ours = _load(fsdp_results, "accumulate")["model"]
    assert list(ours) == list(_model().state_dict())  # same keys in the same order, no wrapper prefixes
    assert all(value.device.type == "cpu" for value in ours.values())


def test_checkpoint_round_trip_restores_everything_and_continues_identically(fsdp_results):
    result = _load(fsdp_results, "round_trip")
    exact = {"atol": 0.0, "rtol": 0.0}
    _assert_same_states(result["loaded_model"], result["saved_model"], **exact)
    _assert_same_optimizer(result["loaded_optimizer"], result["saved_optimizer"], **exact)
    _assert_same_states(result["broadcast"], result["saved_model"], **exact)
    assert result["step"] == 1 and result["lr"] == result["saved_lr"]
    _assert_same_states(result["continued_resumed"], result["continued"], **exact)

    # The files are the single-process format: weights loadable as such, optimizer state indexed by position.
    folder = fsdp_results / "checkpoint"
    _assert_same_states(load_file(folder / "model.safetensors"), result["saved_model"], **exact)
    plain = Owl2ForCausalLM.from_pretrained(folder)
    _assert_same_states(plain.state_dict(), result["saved_model"], **exact)
    optimizer, _ = build_optimizer(_prepare(plain, ["all"], ac=False), OPTIM)
    optimizer.load_state_dict(torch.load(folder / ckpt.OPTIMIZER_FILE, weights_only=True))


def test_bf16_computes_in_bf16_and_keeps_fp32_shards(fsdp_results):
    result = _load(fsdp_results, "bf16")
    assert result["compute_dtype"] == torch.bfloat16
    assert result["shard_dtypes"] == {torch.float32} and result["grad_dtypes"] == {torch.float32}
    assert all(value.dtype == torch.float32 for value in result["model"].values())
    fp32 = _prepare(_model(), ["all"], ac=False)
    with torch.no_grad():
        reference = float(fp32(**_batch(30), use_cache=False).loss)
    assert result["loss"] == pytest.approx(reference, abs=0.05)


def test_fsdp_stage1_keeps_frozen_bf16_weights_and_round_trips(fsdp_results):
    result = _load(fsdp_results, "stage1_bf16")
    model = _prepared(STAGE1, "bf16")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert result["dtypes"] == {name: p.dtype for name, p in model.named_parameters()}  # shards keep the policy
    assert torch.bfloat16 in result["dtypes"].values()
    assert set(result["grads"]) == trainable  # vision included: rank 1 (text only) visited every unit
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in result["grads"].values())
    assert math.isfinite(result["loss"])
    for name, value in result["after"].items():
        assert value.dtype == result["before"][name].dtype, name
        assert torch.equal(value, result["before"][name]) != (name in trainable), name
    exact = {"atol": 0.0, "rtol": 0.0}
    _assert_same_states(result["reloaded"], result["after"], **exact)
    _assert_same_optimizer(result["reloaded_optimizer"], result["optimizer"], **exact)

    # The same step on one process under autocast: 0.8% apart (FSDP2 also computes the norms and the trainable
    # weights' elementwise ops in bf16, and reduces in another order).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [model(**_batch(50 + rank, images=rank == 0), use_cache=False).loss for rank in range(WORLD)]
    (sum(losses) / WORLD).backward()  # the text-only loss alone reaches no trainable weight here
    ours = torch.cat([result["grads"][name].flatten() for name in sorted(trainable)])
    reference = torch.cat([model.get_parameter(name).grad.flatten() for name in sorted(trainable)])
    assert float((ours - reference).norm() / reference.norm()) < 0.03


# ------------------------------------------------------------------------------------------ without sharding


def test_fsdp_ranks_skip_a_nonfinite_step_together_and_bitwise(fsdp_results):
    for rank in range(WORLD):
        result = _load(fsdp_results, f"skip_{rank}")
        assert math.isfinite(result["loss"]) and not math.isfinite(result["norm"]), rank
        assert result["nonfinite"] == 1
        changed = [key for key, value in result["before"].items() if not torch.equal(value, result["after"][key])]
        assert not changed, (rank, changed)


def test_shard_plan_is_every_layer_of_the_three_towers_then_the_root():
    names = [name for name, _ in parallel.shard_plan(_model())]
    assert names == [
        "vision.blocks.0",
        "vision.blocks.1",
        "abstractor.layers.0",
        "abstractor.layers.1",
        "decoder.layers.0",
        "decoder.layers.1",
        "",
    ]


def _saved_tensors(model: torch.nn.Module, batch: dict[str, Any]) -> int:
    count = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch, use_cache=False).loss.backward()
    return count


def test_activation_checkpointing_keeps_names_and_gradients_and_saves_less():
    batch = _batch(3)
    plain, checkpointed = _prepare(_model(), ["all"], ac=False), _prepare(_model(), ["all"], ac=True)
    assert [n for n, _ in checkpointed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    saved_plain, saved_checkpointed = _saved_tensors(plain, batch), _saved_tensors(checkpointed, batch)
    assert saved_checkpointed < saved_plain / 2, (saved_checkpointed, saved_plain)
    for (name, ours), (_, reference) in zip(checkpointed.named_parameters(), plain.named_parameters(), strict=True):
        torch.testing.assert_close(ours.grad, reference.grad, msg=name)


def test_unsharded_state_helpers_are_the_plain_state_dicts(tmp_path):
    model = _prepare(_model(), STAGE1, ac=False)
    optimizer, _ = build_optimizer(model, OPTIM)
    scheduler = warmup_cosine(optimizer, 1, 10, 0.0)
    _train_step(model, optimizer, [_batch(5)])
    assert not parallel.is_sharded(model) and parallel.reads_full_state(model)
    model_state = parallel.model_state_for_checkpoint(model)
    optimizer_state = parallel.optimizer_state_for_checkpoint(model, optimizer)
    _assert_same_states(model_state, model.state_dict(), atol=0.0, rtol=0.0)
    _assert_same_optimizer(optimizer_state, optimizer.state_dict(), atol=0.0, rtol=0.0)

    # Passing the gathered states writes exactly what saving the model and optimizer themselves writes.
    state = ckpt.TrainState(stage="stage1", step=1)
    own = ckpt.save(tmp_path / "own", model, optimizer, scheduler, state, "name: x\n")
    given = ckpt.save(
        tmp_path / "given", model, optimizer_state, scheduler, state, "name: x\n", model_state=model_state
    )
    for file in ("model.safetensors", ckpt.OPTIMIZER_FILE, ckpt.SCHEDULER_FILE, "config.json"):
        assert (own / file).read_bytes() == (given / file).read_bytes(), file

    fresh = _prepare(_model(), STAGE1, ac=False)
    fresh_optimizer, _ = build_optimizer(fresh, OPTIM)
    ckpt.load_training_state(given, fresh_optimizer, warmup_cosine(fresh_optimizer, 1, 10, 0.0), model=fresh)
    _assert_same_optimizer(fresh_optimizer.state_dict(), optimizer.state_dict(), atol=0.0, rtol=0.0)


def test_no_gpu_no_memory_metric():
    assert parallel.peak_memory_gb(torch.device("cpu")) is None


def test_ddp_with_checkpointing_and_text_only_micro_batches(single_process_group):
    """What ``wrap`` builds for DDP (without Ray's helper): checkpointing composes with unused-parameter search
    and gradients that are views into DDP's buckets, over micro-batches that skip the all-reduce."""
    batches = [_batch(40, images=False), _batch(41)]
    reference = _prepare(_model(), ["all"], ac=False)
    ref_optimizer, _ = build_optimizer(reference, OPTIM)
    _train_step(reference, ref_optimizer, batches)
    model = _prepare(_model(), ["all"], ac=True)
    # The 7B stage 2's options: conversations (text-only rows) search unused parameters; gradient bucket views.
    wrapped = torch.nn.parallel.DistributedDataParallel(model, **parallel.ddp_options(_stage("bf16", "stage2")))
    optimizer, _ = build_optimizer(wrapped, OPTIM)
    verify_optimizer_setup(wrapped, optimizer, ["all"])
    _train_step(wrapped, optimizer, batches)
    grads = [p.grad for p in wrapped.parameters() if p.grad is not None]
    assert len({grad.untyped_storage().data_ptr() for grad in grads}) < len(grads)  # views into shared buckets
    assert (
        parallel.optimizer_state_for_checkpoint(wrapped, optimizer)["param_groups"]
        == ref_optimizer.state_dict()["param_groups"]
    )
    _assert_same_states(parallel.model_state_for_checkpoint(wrapped), reference.state_dict(), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ precision policy


def _stage(precision: str, name: str = "stage1") -> StageConfig:
    """The shipped 7B recipe's stage with ``precision`` (bf16 in the YAML)."""
    stage = build(StageConfig, load_yaml(RECIPE / f"{name}.yaml"), f"stages.{name}")
    return dataclasses.replace(stage, precision=precision)


def _prepared(parts: list[str], precision: str, model: Owl2ForCausalLM | None = None) -> Owl2ForCausalLM:
    model = _prepare(model if model is not None else _model(), parts, ac=False)
    parallel.prepare_precision(model, _stage(precision), torch.device("cpu"))
    return model


def _autocast_step(model: Owl2ForCausalLM, batch: dict[str, Any]) -> tuple[float, dict[str, torch.Tensor]]:
    """A forward and backward under CPU bf16 autocast, as the loop runs a bf16 stage: the loss and the grads."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    return float(loss.detach()), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def test_bf16_stage1_stores_frozen_weights_in_bf16_and_trains_fp32_masters():
    model = _prepared(STAGE1, "bf16")
    norms = {
        f"{name}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, parallel.NORMS)
        for p, _ in m.named_parameters()
    }
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        expected = torch.float32 if name in trainable or name in norms else torch.bfloat16
        assert param.dtype == expected, name
    assert model.decoder.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # the bulk of the frozen decoder
    assert model.decoder.rotary_emb.inv_freq.dtype == torch.float32
    assert {b.dtype for b in model.abstractor.buffers()} == {torch.float32}

    frozen_before = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    optimizer, _ = build_optimizer(model, OPTIM)
    loss, grads = _autocast_step(model, _batch(11))
    assert math.isfinite(loss) and set(grads) == trainable
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values())
    trained_before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer.step()
    for name, param in model.named_parameters():
        before = frozen_before.get(name, trained_before.get(name))
        assert torch.equal(param, before) != (name in trainable), name

    # The same step with the float32 frozen model under autocast: the residual stream is bf16 now (the
    # embeddings are), which moves the loss by ~1e-4 and the gradients by ~0.6% on this model.
    reference = _prepare(_model(), STAGE1, ac=False)
    reference_loss, reference_grads = _autocast_step(reference, _batch(11))
    assert loss == pytest.approx(reference_loss, abs=2e-3)
    ours, theirs = (torch.cat([g[name].flatten() for name in sorted(trainable)]) for g in (grads, reference_grads))
    assert float((ours - theirs).norm() / theirs.norm()) < 0.02


def _weight_copies_kept_for_backward(model: Owl2ForCausalLM, batch: dict[str, Any]) -> int:
    """Saved-for-backward tensors without gradient shaped like a frozen weight but not that weight: autocast's
    copies (those of trainable weights are cached per step and require gradients)."""
    frozen = {p.data_ptr(): p.shape for p in model.parameters() if not p.requires_grad and p.dim() == 2}
    shapes = set(frozen.values())
    copies = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal copies
        copies += tensor.shape in shapes and tensor.data_ptr() not in frozen and not tensor.requires_grad
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _autocast_step(model, batch)
    return copies


def test_bf16_frozen_weights_are_not_cast_per_forward():
    batch = _batch(12)
    assert _weight_copies_kept_for_backward(_prepare(_model(), STAGE1, ac=False), batch) > 0  # fp32: one copy each
    assert _weight_copies_kept_for_backward(_prepared(STAGE1, "bf16"), batch) == 0


def test_fp32_precision_changes_nothing():
    plain, prepared = _prepare(_model(), STAGE1, ac=False), _prepared(STAGE1, "fp32")
    assert {p.dtype for p in prepared.parameters()} == {torch.float32}
    _assert_same_states(prepared.state_dict(), plain.state_dict(), atol=0.0, rtol=0.0)


def test_bf16_stage1_model_generates_under_autocast():
    model = _prepared(STAGE1, "bf16").eval()
    batch = _batch(13)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            images=batch["images"],
            image_counts=None,
            max_new_tokens=3,
            do_sample=False,
        )
    assert out.shape[0] == 2 and out.shape[1] > batch["input_ids"].shape[1]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_stage2_upcasts_what_it_trains_from_a_bf16_stage1_checkpoint(tmp_path, precision):
    stage1 = _prepared(STAGE1, "bf16")
    optimizer, _ = build_optimizer(stage1, OPTIM)
    scheduler = warmup_cosine(optimizer, 1, 10, 0.0)
    ckpt.save(tmp_path / "stage1", stage1, optimizer, scheduler, ckpt.TrainState(stage="stage1"), "name: x\n")
    saved = load_file(tmp_path / "stage1" / "model.safetensors")
    assert saved["decoder.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16

    stage2 = _prepared(["all"], precision, Owl2ForCausalLM.from_pretrained(tmp_path / "stage1"))
    assert {p.dtype for p in stage2.parameters()} == {torch.float32}
    _assert_same_states({k: v.float() for k, v in saved.items()}, stage2.state_dict(), atol=0.0, rtol=0.0)
    loss, grads = _autocast_step(stage2, _batch(14))
    assert math.isfinite(loss) and set(grads) == {name for name, _ in stage2.named_parameters()}


def test_the_7b_recipe_may_run_stage1_under_fsdp():
    experiment = load_experiment(RECIPE / "pipeline.yaml", ["stages.stage1.strategy=fsdp"])
    assert experiment.stages["stage1"].strategy == "fsdp"


def test_ddp_options_share_gradient_buckets_and_search_unused_parameters_only_for_conversations():
    assert parallel.ddp_options(_stage("bf16", "stage1")) == {
        "find_unused_parameters": False,
        "gradient_as_bucket_view": True,
    }
    assert parallel.ddp_options(_stage("bf16", "stage2"))["find_unused_parameters"]


def test_ddp_stage1_with_frozen_bf16_weights(single_process_group):
    """DDP over a model that mixes bf16 frozen and fp32 trainable parameters: the step matches the bare model's."""
    batch = _batch(15)
    reference = _prepared(STAGE1, "bf16")
    _, reference_grads = _autocast_step(reference, batch)
    wrapped = torch.nn.parallel.DistributedDataParallel(
        _prepared(STAGE1, "bf16"), **parallel.ddp_options(_stage("bf16"))
    )
    _, grads = _autocast_step(wrapped, batch)
    assert set(grads) == {f"module.{name}" for name in reference_grads}
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grads[f"module.{name}"], grad, msg=name)
    assert {p.dtype for p in wrapped.parameters() if not p.requires_grad} >= {torch.bfloat16}
