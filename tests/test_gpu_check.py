"""benchmarks/gpu_check.py stays runnable: its --cpu-smoke run writes every check's fields, none failing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
STEP_KEYS = {
    "decoder_layers",
    "micro_batch",
    "tokens_per_row",
    "image_size",
    "trainable",
    "activation_checkpointing",
    "compiled",
    "optimizer",
    "step_seconds",
    "peak_memory_gb",
    "plan_estimate_gb",
    "check_seconds",
}
PLAN_KEYS = {"weights", "gradients", "optimizer", "buffers", "activations", "total"}
RATE_KEYS = {"seconds", "flops", "tflops", "mfu"}


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1]), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=environment, timeout=300
    )


def test_cpu_smoke_writes_every_check(tmp_path):
    out = tmp_path / "check.json"
    done = _run("--cpu-smoke", "--out", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["cpu_smoke"] is True and result["device"] == "cpu"
    failed = {key: value["error"] for key, value in result.items() if isinstance(value, dict) and "error" in value}
    assert not failed

    assert result["matmul_peak"]["tflops"] > 0
    layers = result["decoder_layer"]
    assert {key for key in layers if key != "check_seconds"} == {
        f"{kind}_T{length}"
        for kind in ("modality_adaptive", "modality_adaptive_compiled", "llama")
        for length in (16, 64)
    }
    assert layers["modality_adaptive_compiled_T64"]["compile_s"] > 0
    # Same width and length: routed by span, the modality-adaptive layer runs the same matmuls as LLaMA's.
    assert layers["modality_adaptive_T64"]["flops"] == layers["llama_T64"]["flops"] > layers["llama_T16"]["flops"]
    for rate in [value for key, value in layers.items() if key != "check_seconds"] + [
        result["vision"]["vit"],
        result["vision"]["abstractor"],
    ]:
        assert RATE_KEYS <= set(rate) and rate["flops"] > 0 and rate["mfu"] > 0

    steps = ("stage1_step", "stage1_step_other_checkpointing", "stage1_step_other_compile", "stage2_step")
    for name in (*steps, "stage2_step_full_state"):
        assert set(result[name]) == STEP_KEYS, name
        assert result[name]["step_seconds"] > 0 and result[name]["peak_memory_gb"] is None  # no CUDA
    assert result["stage1_step"]["trainable"] == ["vision", "abstractor", "decoder.visual"]
    assert result["stage1_step"]["optimizer"] and not result["stage2_step"]["optimizer"]
    assert result["stage2_step"]["activation_checkpointing"]  # as stage2.yaml asks
    other = result["stage1_step_other_checkpointing"]
    assert other["activation_checkpointing"] != result["stage1_step"]["activation_checkpointing"]
    # compile: auto leaves the CPU eager; the other way round compiles (Dynamo's eager backend in the smoke run).
    assert not result["stage1_step"]["compiled"] and result["stage1_step_other_compile"]["compiled"]
    for name in ("stage1_step", "stage2_step_full_state"):  # owl2.plan's estimate, AdamW state included
        plan = result[name]["plan_estimate_gb"]
        assert set(plan) == PLAN_KEYS and plan["optimizer"] > 0 and plan["activations"] > 0
        assert plan["total"] == pytest.approx(sum(value for key, value in plan.items() if key != "total"))
    assert result["stage2_step"]["plan_estimate_gb"]["optimizer"] == 0.0
    # Checkpointing keeps fewer activations, by the plan too.
    assert other["plan_estimate_gb"]["activations"] != result["stage1_step"]["plan_estimate_gb"]["activations"]
    assert result["sync_debug"]["raised"] is False
    packed = result["packing"]  # fp32 on the CPU: the block-diagonal mask against causal SDPA
    assert packed["packed_shape"][0] < packed["padded_shape"][0] and packed["padded_s"] > 0 < packed["packed_s"]
    assert packed["loss_relative_difference"] < 1e-5 and packed["grad_relative_difference"] < 1e-5


def test_without_a_gpu_it_exits_2_with_one_line(tmp_path):
    done = _run("--out", str(tmp_path / "never.json"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "no CUDA GPU" in done.stderr
    assert not (tmp_path / "never.json").exists()
