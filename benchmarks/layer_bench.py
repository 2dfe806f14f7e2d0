"""Forward + backward time of N owl2 decoder layers against N plain LLaMA layers of the same width.

    python benchmarks/layer_bench.py --device cpu --hidden 1024 --layers 2 --tokens 512 [--heads 8]
        [--visual-share 0.127] [--warmup 2] [--iters 7] [--compile [--backend inductor]] [--json]

Three stacks (four with ``--compile``) run on the same input (one row of ``--tokens`` tokens, an image span of
``visual_share x tokens`` tokens after the first one, as in a stage-2 sample: 65 image tokens among about 512):

* ``after``: owl2's ``DecoderLayer`` (the modality-adaptive module, routed by span: each per-modality copy runs
  on its own tokens only), the routing built from the host-known count as the decoder builds it per forward;
* ``before``: the same layers run the way owl2 routed before (both copies of every per-modality module on every
  token, ``torch.where`` picking per token), constructed here from the same weights;
* ``plain``: transformers' ``LlamaDecoderLayer`` (SDPA), intermediate width hidden x 11008 / 4096 rounded up to
  a multiple of 32, as the presets do;
* ``compiled`` (``--compile``): the ``after`` layers, each compiled as training compiles it (``stage.compile``:
  ``owl2.train.parallel.compile_layer``, ``--backend`` inductor by default); the first call, which compiles, is
  timed apart as ``compile_s``.

Each stack's time is the median over ``--iters`` timed runs after ``--warmup`` runs, the stacks taking turns so
that a busy machine slows them alike (CUDA events on a GPU). ``--json`` prints
``{"mam_s", "llama_s", "ratio", "before_s", "before_ratio", ...}`` (ratio = mam_s / llama_s), with ``--compile``
also ``compiled_s``, ``compiled_ratio`` (compiled_s / llama_s), ``compile_speedup`` (mam_s / compiled_s) and
``compile_s``; otherwise a table.
fp32 on the CPU, bf16 on CUDA. On a CPU shared with other work, ``OMP_NUM_THREADS=1`` gives steadier numbers:
preempted OpenMP threads slow the stacks of more, smaller kernels (owl2's) more than the others.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from owl2.config import ConfigError, DecoderConfig
from owl2.model.decoder import Attention, DecoderLayer, Multiway, Partition, llama_config
from owl2.train.parallel import compile_layer

VISUAL_SHARE = 65 / 512
"""A stage-2 sample: one 7B image (64 queries + end-of-image) among about 512 tokens."""


def bench_decoder(hidden: int, heads: int | None = None) -> DecoderConfig:
    """A decoder ``hidden`` wide with LLaMA's MLP ratio (rounded up to 32) and 128-wide heads by default."""
    heads = heads or max(1, hidden // 128)
    inner = 32 * math.ceil(hidden * 11008 / 4096 / 32)
    return DecoderConfig(hidden_size=hidden, intermediate_size=inner, num_heads=heads, num_kv_heads=heads)


# ------------------------------------------------------------------------------------------ owl2 before routing


class WhereMultiway(nn.Module):
    """A ``Multiway`` as owl2 ran it before: both copies on every token, ``torch.where`` picks per token."""

    def __init__(self, multiway: Multiway) -> None:
        super().__init__()
        self.text, self.visual = multiway.text, multiway.visual

    def forward(self, x: torch.Tensor, routing: Unrouted) -> torch.Tensor:
        return torch.where(routing.visual_mask[..., None], self.visual(x), self.text(x))


class Unrouted:
    """Stands where the layer expects a :class:`Partition`: tokens stay in sequence order, the mask picks."""

    def __init__(self, visual_mask: torch.Tensor) -> None:
        self.visual_mask = visual_mask

    def group(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def ungroup(self, rows: torch.Tensor) -> torch.Tensor:
        return rows


class WhereRouted(nn.Module):
    """An owl2 ``DecoderLayer`` (modified in place: its multiway modules become :class:`WhereMultiway`) run the
    way owl2 routed before span routing; called like the layer, with the decoder's :class:`Partition`."""

    def __init__(self, layer: DecoderLayer) -> None:
        super().__init__()
        for owner in list(layer.modules()):
            for name, child in owner.named_children():
                if isinstance(child, Multiway):
                    setattr(owner, name, WhereMultiway(child))
        self.layer = layer

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention: Attention,
        routing: Partition | None,
        cache: Any = None,
    ) -> torch.Tensor:
        """As ``DecoderLayer.forward``: ``[B, Q, D]`` -> ``[B, Q, D]``."""
        unrouted = None
        if routing is not None:
            unrouted = Unrouted((routing.position >= routing.sizes[0]).view(routing.shape))
        return self.layer(hidden_states, position_embeddings, attention, unrouted, cache)


# ------------------------------------------------------------------------------------------ timing


def _stacks(
    decoder: DecoderConfig,
    layers: int,
    tokens: int,
    visual_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    compile_backend: str | None = None,
) -> dict[str, Callable[[], None]]:
    """One forward + backward closure per stack, on the same input and output gradient."""
    llama = llama_config(decoder)
    llama._attn_implementation = "sdpa"
    mam = nn.ModuleList(DecoderLayer(decoder, llama, i) for i in range(layers)).to(device, dtype)
    before = nn.ModuleList(WhereRouted(copy.deepcopy(layer)) for layer in mam)
    plain = nn.ModuleList(LlamaDecoderLayer(llama, i) for i in range(layers)).to(device, dtype)

    x = torch.randn(1, tokens, decoder.hidden_size, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    positions = torch.arange(tokens, device=device)[None]
    rotary = LlamaRotaryEmbedding(llama).to(device)(x, positions)
    causal = Attention()  # one whole row: causal without a mask, as the decoder runs it and as LLaMA's SDPA does
    visual_mask = (positions >= 1) & (positions < 1 + visual_tokens)

    def owl2_step(stack: nn.ModuleList) -> Callable[[], None]:
        def step() -> None:
            routing = Partition.of(visual_mask, visual_tokens)  # built once per forward, as the decoder does
            hidden = x
            for layer in stack:
                hidden = layer(hidden, rotary, causal, routing)
            hidden.backward(grad)

        return step

    def plain_step() -> None:
        hidden = x
        for layer in plain:
            hidden = layer(hidden, position_embeddings=rotary)
        hidden.backward(grad)

    steps = {"after": owl2_step(mam), "before": owl2_step(before), "plain": plain_step}
    modules = [mam, before, plain]
    if compile_backend is not None:
        compiled = copy.deepcopy(mam)  # copied before compiling: a copy of a compiled layer would run the original
        for layer in compiled:
            compile_layer(layer, compile_backend)
        steps["compiled"] = owl2_step(compiled)
        modules.append(compiled)

    def fresh(step: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            for module in modules:
                module.zero_grad(set_to_none=True)
            x.grad = None
            step()

        return run

    return {name: fresh(step) for name, step in steps.items()}


def _seconds(run: Callable[[], None], device: torch.device) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    run()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1000


def time_layers(
    decoder: DecoderConfig,
    layers: int,
    tokens: int,
    visual_tokens: int,
    device: torch.device,
    dtype: torch.dtype,
    warmup: int = 2,
    iters: int = 7,
    compile_backend: str | None = None,
) -> dict[str, float]:
    """Median seconds of one forward + backward of ``layers`` layers over ``tokens`` tokens, per stack.

    Returns ``mam_s`` (owl2, routed by span), ``before_s`` (owl2 with ``torch.where`` routing), ``llama_s``
    (plain ``LlamaDecoderLayer``), ``ratio = mam_s / llama_s`` and ``before_ratio = before_s / llama_s``. With a
    ``compile_backend`` also ``compiled_s`` (owl2's layers compiled by it), ``compiled_ratio = compiled_s /
    llama_s``, ``compile_speedup = mam_s / compiled_s`` and ``compile_s`` (the first, compiling call).
    """
    if not 0 <= visual_tokens < tokens:
        raise ValueError(f"visual_tokens ({visual_tokens}) must lie in [0, tokens={tokens})")
    torch.manual_seed(0)
    steps = _stacks(decoder, layers, tokens, visual_tokens, device, dtype, compile_backend)
    result = {}
    if "compiled" in steps:
        result["compile_s"] = _seconds(steps["compiled"], device)
    for _ in range(warmup):
        for run in steps.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, run in steps.items():
            samples[name].append(_seconds(run, device))
    mam, before, llama = (statistics.median(samples[name]) for name in ("after", "before", "plain"))
    result |= {"mam_s": mam, "before_s": before, "llama_s": llama, "ratio": mam / llama, "before_ratio": before / llama}
    if "compiled" in samples:
        compiled = statistics.median(samples["compiled"])
        result |= {"compiled_s": compiled, "compiled_ratio": compiled / llama, "compile_speedup": mam / compiled}
    return result


# ------------------------------------------------------------------------------------------ command line


def _table(result: dict[str, Any]) -> str:
    rows = [
        ("before: owl2, torch.where routing", result["before_s"]),
        ("after: owl2, routed by span", result["mam_s"]),
        ("plain: LlamaDecoderLayer", result["llama_s"]),
    ]
    head = (
        f"{result['layers']} layers, hidden {result['hidden']} ({result['heads']} heads, MLP "
        f"{result['intermediate']}), {result['tokens']} tokens of which {result['visual_tokens']} visual, "
        f"{result['device']} {result['dtype']}; forward + backward, median of {result['iters']}"
    )
    if "compiled_s" in result:
        rows.append((f"compiled: after, {result['backend']} per layer", result["compiled_s"]))
    lines = [head, f"{'':36} {'seconds':>9} {'vs plain':>9}"]
    lines += [f"{name:36} {seconds:9.4f} {seconds / result['llama_s']:9.3f}" for name, seconds in rows]
    if "compiled_s" in result:
        lines.append(
            f"compiled is {result['compile_speedup']:.2f}x as fast as after; its first call, compiling, took "
            f"{result['compile_s']:.1f} s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--heads", type=int, default=None, help="default: hidden / 128")
    parser.add_argument("--visual-share", type=float, default=VISUAL_SHARE)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="also time the owl2 layers torch.compile'd")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend for --compile (inductor)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("layer_bench: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    try:
        decoder = bench_decoder(args.hidden, args.heads)
    except ConfigError as error:
        print(f"layer_bench: {error}", file=sys.stderr)
        return 2
    if not (0 <= args.visual_share < 1 and args.layers > 0 and args.tokens > 1 and args.iters > 0):
        print("layer_bench: need 0 <= --visual-share < 1, --layers > 0, --tokens > 1, --iters > 0", file=sys.stderr)
        return 2
    backends = torch._dynamo.list_backends(exclude_tags=())
    if args.compile and args.backend not in backends:
        print(f"layer_bench: --backend {args.backend!r} is not a torch.compile backend: {backends}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    visual = round(args.visual_share * args.tokens)
    backend = args.backend if args.compile else None
    result = time_layers(decoder, args.layers, args.tokens, visual, device, dtype, args.warmup, args.iters, backend)
    result.update(
        layers=args.layers,
        hidden=args.hidden,
        heads=decoder.num_heads,
        intermediate=decoder.intermediate_size,
        tokens=args.tokens,
        visual_tokens=visual,
        device=args.device,
        dtype=str(dtype).removeprefix("torch."),
        iters=args.iters,
        backend=backend,
    )
    print(json.dumps(result) if args.json else _table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
