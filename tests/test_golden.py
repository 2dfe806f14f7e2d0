"""Parity with the official mPLUG-Owl2 code: golden vectors from ../shared/golden/owl2_tiny (fp32, CPU)."""

import pytest
import torch
from safetensors.torch import load_file

from owl2.model import Owl2ForCausalLM

TOL = {"atol": 1e-4, "rtol": 1e-4}
CASES = ["A_image_text", "B_text_only", "C_batch2_rightpad", "E_two_images"]
IMAGE_CASES = ["A_image_text", "C_batch2_rightpad", "E_two_images"]
GENERATION_CASES = ["A_image_text", "B_text_only", "E_two_images"]


@pytest.fixture(scope="module")
def model(golden_dir):
    return Owl2ForCausalLM.from_pretrained(golden_dir)


@pytest.fixture(scope="module")
def golden(golden_dir):
    inputs, expected = load_file(golden_dir / "inputs.safetensors"), load_file(golden_dir / "expected.safetensors")

    def case(name):
        case_inputs = {k.split(".", 1)[1]: v for k, v in inputs.items() if k.startswith(name + ".")}
        case_expected = {k.split(".", 1)[1]: v for k, v in expected.items() if k.startswith(name + ".")}
        return case_inputs, case_expected

    return case


def test_official_folder_loads_every_weight(model):
    report = model.load_report
    assert report.missing == [] and report.unexpected == []
    # inv_freq per decoder layer and two sin-cos tables per abstractor layer are recomputed, not loaded.
    assert len(report.dropped) == 6


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_official(model, golden, case):
    inputs, expected = golden(case)
    with torch.no_grad():
        out = model(**inputs, use_cache=False, output_hidden_states=True)
    torch.testing.assert_close(out.logits, expected["logits"], **TOL)
    torch.testing.assert_close(out.loss.reshape(1), expected["loss"], **TOL)
    assert torch.equal(out.attention_mask.long(), expected["expanded_attention_mask"])
    assert torch.equal(out.labels, expected["expanded_labels"])
    assert torch.equal(out.visual_mask.long(), expected["modality_indicators"])
    for i in range(3):
        torch.testing.assert_close(out.hidden_states[i], expected[f"llm_hidden_states.{i}"], **TOL)
    if "inputs_embeds" in expected:
        torch.testing.assert_close(out.hidden_states[0], expected["inputs_embeds"], **TOL)


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_vision_and_abstractor_match_official(model, golden, case):
    inputs, expected = golden(case)
    with torch.no_grad():
        last, hidden_states = model.vision(inputs["images"], output_hidden_states=True)
        tokens, queries = model.abstractor(last, return_queries=True)
    torch.testing.assert_close(last, expected["vision_last_hidden_state"], **TOL)
    for i, state in enumerate(hidden_states):
        torch.testing.assert_close(state, expected[f"vision_hidden_states.{i}"], **TOL)
    torch.testing.assert_close(queries, expected["abstractor_encoder_output"], **TOL)
    torch.testing.assert_close(tokens, expected["abstractor_output"], **TOL)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("case", GENERATION_CASES)
def test_greedy_generation_matches_official(model, golden, case, use_cache):
    inputs, expected = golden(case)
    generated = model.generate(
        inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        images=inputs.get("images"),
        max_new_tokens=5,
        do_sample=False,
        num_beams=1,
        pad_token_id=0,
        eos_token_id=None,
        use_cache=use_cache,
    )
    new_ids = generated[:, inputs["input_ids"].shape[1] :]
    assert torch.equal(new_ids, expected["generated_new_ids"])
    assert torch.equal(new_ids, expected["generated_new_ids_nocache"])
