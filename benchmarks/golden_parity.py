"""Measured distance to the official mPLUG-Owl2 outputs on the golden vectors, printed as a table.

    python benchmarks/golden_parity.py [--golden ../shared/golden/owl2_tiny]

Max absolute error per case and tensor (fp32, CPU); ids and integer bookkeeping must match exactly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from owl2.model import Owl2ForCausalLM

CASES = ["A_image_text", "B_text_only", "C_batch2_rightpad", "E_two_images"]


def measure(golden: Path) -> list[tuple[str, str, str]]:
    model = Owl2ForCausalLM.from_pretrained(golden)
    inputs, expected = load_file(golden / "inputs.safetensors"), load_file(golden / "expected.safetensors")
    rows = []
    for case in CASES:
        given = {k.split(".", 1)[1]: v for k, v in inputs.items() if k.startswith(case + ".")}
        want = {k.split(".", 1)[1]: v for k, v in expected.items() if k.startswith(case + ".")}
        with torch.no_grad():
            out = model(**given, use_cache=False, output_hidden_states=True)
            ours = {"logits": out.logits, "loss": out.loss.reshape(1)}
            ours.update({f"llm_hidden_states.{i}": h for i, h in enumerate(out.hidden_states)})
            if "images" in given:
                last, states = model.vision(given["images"], output_hidden_states=True)
                tokens, queries = model.abstractor(last, return_queries=True)
                ours.update(
                    {
                        "vision_last_hidden_state": last,
                        "abstractor_encoder_output": queries,
                        "abstractor_output": tokens,
                    }
                )
                ours.update({f"vision_hidden_states.{i}": s for i, s in enumerate(states)})
        for name, value in ours.items():
            rows.append((case, name, f"{(value - want[name]).abs().max().item():.2e}"))
        exact = (
            torch.equal(out.attention_mask.long(), want["expanded_attention_mask"])
            and torch.equal(out.labels, want["expanded_labels"])
            and torch.equal(out.visual_mask.long(), want["modality_indicators"])
        )
        rows.append((case, "mask/labels/modality", "exact" if exact else "DIFFERENT"))
        if "generated_new_ids" in want:
            for use_cache in (True, False):
                generated = model.generate(
                    given["input_ids"],
                    attention_mask=given["attention_mask"],
                    images=given.get("images"),
                    max_new_tokens=5,
                    do_sample=False,
                    pad_token_id=0,
                    eos_token_id=None,
                    use_cache=use_cache,
                )
                same = torch.equal(generated[:, given["input_ids"].shape[1] :], want["generated_new_ids"])
                rows.append(
                    (case, f"greedy ids ({'cache' if use_cache else 'no cache'})", "exact" if same else "DIFFERENT")
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[2] / "shared" / "golden" / "owl2_tiny"
    parser.add_argument("--golden", type=Path, default=default)
    rows = measure(parser.parse_args().golden)
    widths = [max(len(row[i]) for row in rows + [("case", "tensor", "max abs err")]) for i in range(3)]
    for row in [("case", "tensor", "max abs err"), tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
