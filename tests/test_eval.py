"""Benchmark loaders with the official prompts, scoring, and ``owl2 eval`` tracked in MLflow."""

import base64
import csv
import dataclasses
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from owl2.cli import main
from owl2.data.synth import QUESTION_TYPES
from owl2.eval.benchmarks import load_captions, load_mmbench, load_mme, load_shapes, load_vqa
from owl2.eval.generate import render_prompt
from owl2.eval.runner import log_final_eval, read_predictions, run_eval, training_run
from owl2.eval.suite import Suite
from owl2.model import Owl2ForCausalLM
from owl2.tracking import PARENT_RUN_TAG, Tracker

EXPERIMENT = "owl2-eval-tests"


@pytest.fixture(scope="module")
def world(shapes_world) -> Path:
    return shapes_world


@pytest.fixture(scope="module")
def heldout(shapes_world_args) -> int:
    """The world's held-out images: fewer than the eval command's ``--limit 12``, so its captions split stays whole."""
    return shapes_world_args["num_heldout"]


@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory, write_tiny_checkpoint) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint", world)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One sqlite store for the module: creating its tables takes seconds."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    Tracker(uri).experiment_id(EXPERIMENT)
    return uri


def prompt_of(item) -> str:
    protocol = item.protocol
    return render_prompt(
        item.messages,
        protocol.template,
        image_token_at_front=protocol.image_token_at_front,
        suffix=protocol.prompt_suffix,
    )


def png(color: str = "red") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 12), color).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------


def test_vqa_jsonl_and_json_array_with_the_official_prompt(tmp_path):
    records = [
        {
            "question_id": 7,
            "image": "val/a.jpg",
            "question": "What color is the bus?",
            "answers": [{"answer": "red"}] * 3,
        },
        {"id": "q2", "image": "/abs/b.jpg", "question": "How many?", "answer": "2", "question_type": "how many"},
    ]
    jsonl = tmp_path / "vqa.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    array = tmp_path / "vqa_array.jsonl"  # Qwen-VL's files are JSON arrays despite the name
    array.write_text(json.dumps(records))
    for path in (jsonl, array):
        items = load_vqa(path, image_root=tmp_path / "coco")
        assert [item.id for item in items] == ["7", "q2"]
        assert prompt_of(items[0]) == (
            "USER: <|image|>What color is the bus? Answer the question using a single word or phrase. ASSISTANT: "
        )
        assert items[0].images == [str(tmp_path / "coco" / "val/a.jpg")] and items[1].images == ["/abs/b.jpg"]
        assert items[0].answers == ["red"] * 3 and items[1].answers == ["2"]
        assert items[1].meta == {"id": "q2", "question_type": "how many"}
        assert (items[0].protocol.max_new_tokens, items[0].protocol.min_new_tokens) == (10, 1)
    assert len(load_vqa(jsonl, limit=1)) == 1
    assert load_vqa(jsonl)[0].images == [str(tmp_path / "val/a.jpg")]  # default root: beside the file


def test_mmbench_tsv_with_hint_options_and_base64_images(tmp_path):
    path = tmp_path / "mmbench_dev.tsv"
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    rows = [
        [0, "Which shape is shown?", "", "circle", "square", "triangle", "", "B", "shape", "perception", png()],
        [
            1,
            "What is the mood?",
            'Look at the "face".\nIt smiles.',
            "sad",
            "happy",
            "angry",
            "calm",
            "B",
            "emotion",
            "perception",
            png("blue"),
        ],
    ]
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, delimiter="\t")
        writer.writerow(header)
        for row in rows:
            writer.writerow([*row[:-1], base64.b64encode(row[-1]).decode()])
    items = load_mmbench(path)
    assert prompt_of(items[0]) == (
        "USER: <|image|>N/A\nWhich shape is shown?\nA. circle\nB. square\nC. triangle\n"
        "Answer with the option\u2019s letter from the given choices directly. ASSISTANT:"
    )
    assert prompt_of(items[1]).startswith('USER: <|image|>Look at the "face".\nIt smiles.\nWhat is the mood?\nA. sad\n')
    assert items[0].images == [rows[0][-1]] and items[1].answers == ["B"]
    assert items[0].meta["options"] == {"A": "circle", "B": "square", "C": "triangle"}
    assert items[0].meta["category"] == "shape" and items[0].kind == "choice"


def _mme_folder(root: Path) -> Path:
    existence = root / "existence"
    existence.mkdir(parents=True)
    (existence / "a.png").write_bytes(png())
    (existence / "a.txt").write_text(
        "Is there a red patch in this image? Please answer yes or no.\tYes\n"
        "Is there a cat in this image? Please answer yes or no.\tNo\n"
    )
    artwork = root / "artwork"
    (artwork / "images").mkdir(parents=True)
    (artwork / "questions_answers_YN").mkdir()
    (artwork / "images" / "b.jpg").write_bytes(png("green"))
    (artwork / "questions_answers_YN" / "b.txt").write_text("Is this by Monet? Please answer yes or no.\tNo\n")
    return root


def test_mme_folders_in_both_release_layouts(tmp_path):
    items = load_mme(_mme_folder(tmp_path / "MME"))
    assert [(item.meta["category"], item.meta["image"], item.answers) for item in items] == [
        ("artwork", "b.jpg", ["No"]),
        ("existence", "a.png", ["Yes"]),
        ("existence", "a.png", ["No"]),
    ]
    assert prompt_of(items[1]) == (
        "USER: <|image|>Is there a red patch in this image? \n"
        "Answer the question using a single word or phrase. ASSISTANT: "
    )
    assert items[0].images == [str(tmp_path / "MME/artwork/images/b.jpg")]


def test_coco_captions_group_references_per_image(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(
        json.dumps(
            {
                "images": [{"id": 5, "file_name": "img/5.jpg"}, {"id": 9, "image": "/data/9.jpg"}],
                "annotations": [
                    {"image_id": 5, "id": 1, "caption": "a dog."},
                    {"image_id": 9, "id": 2, "caption": "a cat."},
                    {"image_id": 5, "id": 3, "caption": "a brown dog."},
                ],
            }
        )
    )
    items = load_captions(path)
    assert [(item.id, item.answers) for item in items] == [("5", ["a dog.", "a brown dog."]), ("9", ["a cat."])]
    assert prompt_of(items[0]) == "USER: <|image|>Provide a one-sentence caption for the provided image. ASSISTANT: "
    assert items[0].images == [str(tmp_path / "img/5.jpg")]
    assert (items[0].protocol.max_new_tokens, items[0].protocol.min_new_tokens) == (60, 8)


def test_shapes_heldout_splits(world, heldout):
    splits = load_shapes(world)
    world_json = json.loads((world / "world.json").read_text())
    assert len(splits["captions"]) == heldout and len(splits["text"]) == world_json["text_task"]["heldout_items"]
    vqa = splits["vqa"]
    assert {item.meta["question_type"] for item in vqa} <= set(QUESTION_TYPES)
    assert all(Path(item.images[0]).is_file() for item in vqa)
    # Asked as the world's models were trained: their own template, the image first.
    assert vqa[0].protocol.template is None and vqa[0].protocol.image_token_at_front
    assert render_prompt(vqa[0].messages, "vicuna_v1", image_token_at_front=True).endswith(
        f"USER: <|image|>\n{vqa[0].question} ASSISTANT:"
    )
    assert splits["text"][0].images == [] and prompt_of(splits["captions"][0]) == "<|image|>"
    assert all(len(split) == 2 for split in load_shapes(world, limit=2).values())


def test_suites_need_their_data(checkpoint, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="--data"):
        Suite.load("mme")
    with pytest.raises(ValueError, match="unknown suite"):
        Suite.load("nope", "x")
    data = tmp_path / "vqa.jsonl"
    data.write_text(json.dumps({"question_id": 1, "image": "val/1.jpg", "question": "Why?", "answer": "no"}) + "\n")
    # A wrong image root is reported before any model or Ray worker starts.
    assert main(["eval", "--checkpoint", str(checkpoint), "--suite", "vqa", "--data", str(data), "--no-mlflow"]) == 2
    assert "images are missing" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------


def _record(kind, prediction, answers, **meta):
    return {
        "id": f"{kind}-{prediction}-{len(meta)}",
        "kind": kind,
        "prediction": prediction,
        "answers": answers,
        "meta": meta,
    }


def test_score_mme_mmbench_and_unanswered_rows():
    mme = [
        _record("yes_no", "Yes", ["Yes"], category="existence", image="a.png"),
        _record("yes_no", "No.", ["No"], category="existence", image="a.png"),
        _record("yes_no", "yes", ["Yes"], category="existence", image="b.png"),
        _record("yes_no", "yes", ["No"], category="existence", image="b.png"),
    ]
    rows = {row.metric: row for row in Suite("mme").score(mme)}
    assert rows["mme/existence/score"].value == pytest.approx(75 + 50)
    assert rows["mme/perception"].value == pytest.approx(125) and rows["mme/cognition"].value == 0
    options = {"A": "cat", "B": "dog"}
    mmbench = [
        _record("choice", "B", ["B"], options=options, category="x"),
        _record("choice", "The answer is A.", ["B"], options=options, category="y"),
        _record("choice", "A", [], options=options),  # a test-split row: not scored
    ]
    rows = {row.metric: row for row in Suite("mmbench").score(mmbench)}
    assert (rows["mmbench/accuracy"].value, rows["mmbench/accuracy"].count) == (0.5, 2)
    assert rows["mmbench/x/accuracy"].value == 1.0 and rows["mmbench/y/accuracy"].value == 0.0


def test_score_shapes_per_question_type_against_chance():
    chance = {"color": 0.25, "yes_no": 0.5, "text": 0.1}
    records = [
        _record("vqa", "red", ["red"] * 10, question_type="color"),
        _record("vqa", "Blue.", ["blue"] * 10, question_type="color"),
        _record("vqa", "no", ["yes"] * 10, question_type="yes_no"),
        _record("text", "Three.", ["three"]),
        _record("caption", "a red circle.", ["a red circle at the top left."]),
    ]
    rows = {row.metric: row for row in Suite("shapes", chance=chance).score(records)}
    assert (rows["shapes/vqa/color/accuracy"].value, rows["shapes/vqa/color/accuracy"].chance) == (1.0, 0.25)
    assert rows["shapes/vqa/yes_no/accuracy"].value == 0.0
    assert rows["shapes/vqa/accuracy"].value == pytest.approx(2 / 3)
    assert rows["shapes/vqa/accuracy"].chance == pytest.approx((0.25 + 0.25 + 0.5) / 3)
    assert rows["shapes/text/exact_match"].value == 1.0 and rows["shapes/text/exact_match"].chance == 0.1
    assert "shapes/captions/cider" in rows
    table = Suite.table(list(rows.values()))
    assert re.search(r"^shapes/vqa/color/accuracy\s+1\.0000\s+0\.2500\s+2$", table, re.M)


# --------------------------------------------------------------------------------------------------
# The eval command and MLflow
# --------------------------------------------------------------------------------------------------


def test_training_run_lookup(mlflow_uri):
    tracker, experiment = Tracker(mlflow_uri), "lookup-tests"
    assert training_run(tracker, experiment, "tiny-eval", "stage2") is None
    sweep = tracker.start_run("sweep", experiment)
    trial = tracker.start_run("tiny-eval", experiment, parent_run_id=sweep)  # a Tune trial's experiment run
    assert training_run(tracker, experiment, "tiny-eval", "stage2") == trial
    top = tracker.start_run("tiny-eval", experiment)
    assert training_run(tracker, experiment, "tiny-eval", "stage2") == top
    stage = tracker.start_run("stage2", experiment, parent_run_id=top)
    assert training_run(tracker, experiment, "tiny-eval", "stage2") == stage
    assert training_run(tracker, experiment, "tiny-eval", None) == top


def test_final_checkpoint_scores_repeat_on_the_experiment_run(mlflow_uri):
    tracker, experiment = Tracker(mlflow_uri), "final-eval-tests"
    top = tracker.start_run("tiny", experiment)
    stage2 = tracker.start_run("stage2", experiment, parent_run_id=top)
    config = {"name": "tiny", "stages": {"stage1": {"max_steps": 4}, "stage2": {"max_steps": 6}}}
    scores = {"shapes/vqa/accuracy": 0.75, "shapes/captions/cider": 2.0}
    # Not the experiment's result: an earlier checkpoint, or the last checkpoint of an earlier stage.
    assert log_final_eval(tracker, stage2, config, "stage2", 4, scores) is None
    assert log_final_eval(tracker, stage2, config, "stage1", 4, scores) is None
    assert log_final_eval(tracker, stage2, config, "stage2", 6, scores) == top
    assert tracker.client.get_run(top).data.metrics == {
        "eval/shapes/vqa/accuracy": 0.75,
        "eval/shapes/captions/cider": 2.0,
    }
    view = tracker.client.get_experiment_by_name(experiment).tags["mlflow.sharedViewState.owl2"]
    assert json.loads(view)["selectedColumns"][-2:] == [
        "metrics.`eval/shapes/vqa/accuracy`",
        "metrics.`eval/shapes/captions/cider`",
    ]
    # The eval nested under the experiment run itself (its stage run was not found): the same run gets them.
    alone = tracker.start_run("tiny-2", experiment)
    assert log_final_eval(tracker, alone, config, "stage2", 6, scores) == alone


def test_eval_command_logs_a_child_run_with_metrics_per_question_type(
    ray_cluster, checkpoint, heldout, mlflow_uri, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    tracker = Tracker(mlflow_uri)
    parent = tracker.start_run("tiny-eval", EXPERIMENT)
    stage = tracker.start_run("stage2", EXPERIMENT, parent_run_id=parent)
    output = tmp_path / "out" / "shapes_predictions.jsonl"

    args = ["eval", "--checkpoint", str(checkpoint), "--suite", "shapes", "--batch-size", "4", "--limit", "12"]
    assert main([*args, "--output", str(output)]) == 0
    printed = capsys.readouterr().out

    records = read_predictions(output)
    types = {r["meta"]["question_type"] for r in records if r["kind"] == "vqa"}
    assert len(records) == 12 + heldout + 12 and len(types) >= 3
    for question_type in types:
        assert re.search(rf"^shapes/vqa/{question_type}/accuracy\s+\d\.\d{{4}}\s+\d\.\d{{4}}\s+\d+$", printed, re.M)
    assert "shapes/captions/cider" in printed and "shapes/text/exact_match" in printed

    run_id = re.search(r"MLflow run: (\w+)", printed).group(1)
    run = tracker.client.get_run(run_id)
    assert run.data.tags[PARENT_RUN_TAG] == stage
    assert run.info.status == "FINISHED" and run.info.run_name == "eval-shapes"
    assert run.data.params["suite"] == "shapes" and run.data.params["checkpoint"] == str(checkpoint.resolve())
    expected = {row.metric: row.value for row in Suite("shapes", chance={"text": 0}).score(records)}
    assert {f"shapes/vqa/{t}/accuracy" for t in types} <= set(run.data.metrics)
    assert run.data.metrics == pytest.approx(expected)
    history = tracker.client.get_metric_history(run_id, "shapes/vqa/accuracy")
    assert [point.step for point in history] == [7]  # the checkpoint's training step
    artifacts = {artifact.path for artifact in tracker.client.list_artifacts(run_id)}
    assert {"shapes_predictions.jsonl", "eval_table.txt", "metrics.json"} <= artifacts


def test_released_layout_gets_a_top_level_eval_run(ray_cluster, checkpoint, world, mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    released = tmp_path / "released"
    released.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint / name, released / name)
    for tokenizer_file in (world / "tokenizer").iterdir():
        shutil.copy(tokenizer_file, released / tokenizer_file.name)

    result = run_eval(released, "shapes", world, batch_size=4, limit=2, output=tmp_path / "predictions.jsonl")
    run = Tracker(mlflow_uri).client.get_run(result.run_id)
    assert PARENT_RUN_TAG not in run.data.tags
    assert run.data.params["template"] == "mplug_owl2"
    assert set(result.metrics) >= {"shapes/vqa/accuracy", "shapes/captions/cider", "shapes/text/exact_match"}


# --------------------------------------------------------------------------------------------------
# Evaluation during training (a stage's eval section, owl2.train.evaluate)
# --------------------------------------------------------------------------------------------------


def _stage_with_eval(world, **eval_section):
    from owl2.config import StageConfig, build

    data = {
        "sources": [{"format": "captions", "path": str(world / "captions" / "train.jsonl")}],
        "tokenizer": str(world / "tokenizer"),
        "image_size": 56,
    }
    section = {"limit": 3, "batch_size": 4, **eval_section}
    return build(
        StageConfig,
        {"image_size": 56, "data": data, "max_steps": 10, "optim": {"warmup_steps": 1}, "eval": section},
        "stage2",
    )


def test_checkpoint_eval_scores_the_shapes_suite_and_restores_train_mode(world, checkpoint, tmp_path):
    from owl2.train.evaluate import CheckpointEval, eval_due

    # No eval.data: the world is the one whose tokenizer the stage trains with, as `owl2 eval` finds it.
    stage = _stage_with_eval(world, every=4)
    evaluator = CheckpointEval(stage)
    assert [step for step in range(1, 11) if evaluator.due(step)] == [4, 8, 10]
    # The other ranks ask the stage itself (they have no evaluator); a stage without an eval section never evaluates.
    assert [step for step in range(1, 11) if eval_due(stage, step)] == [4, 8, 10]
    assert not any(eval_due(dataclasses.replace(stage, eval=None), step) for step in range(1, 11))
    model = Owl2ForCausalLM.from_pretrained(checkpoint)
    model.train()
    outcome = evaluator.run(model, step=4)
    assert model.training and all(param.grad is None for param in model.parameters())

    metrics = outcome.metrics
    assert 0.0 <= metrics["eval/shapes/vqa/accuracy"] <= 1.0
    assert {"eval/shapes/captions/cider", "eval/shapes/text/exact_match", "eval/time_s"} <= set(metrics)
    assert all(key.startswith("eval/") for key in metrics)
    assert len(outcome.records) == len(evaluator.items()) == 3 + 3 + 3  # limit per split: vqa, captions, text
    assert all(isinstance(record["prediction"], str) for record in outcome.records)
    assert outcome.headline.startswith("eval shapes step 4: shapes/vqa/accuracy ")
    assert "shapes/captions/cider" in outcome.headline and "(chance " in outcome.headline

    # The predictions file is the `owl2 eval` one: it re-scores to the same metrics.
    path = outcome.write_predictions(tmp_path / "predictions.jsonl")
    rescored = Suite("shapes", chance={"text": 0}).score(read_predictions(path))
    assert {f"eval/{row.metric}": row.value for row in rescored} == pytest.approx(
        {key: value for key, value in metrics.items() if key != "eval/time_s"}
    )
    assert re.search(r"^shapes/vqa/accuracy\s+\d\.\d{4}\s+\d\.\d{4}\s+3$", outcome.table(), re.M)
    # The suite is read once per stage and reused.
    assert evaluator.items() is evaluator.items()


def test_checkpoint_eval_logs_artifacts_to_the_stage_run(world, checkpoint, mlflow_uri, tmp_path):
    from owl2.train.evaluate import CheckpointEval, log_outcome

    evaluator = CheckpointEval(_stage_with_eval(world, data=str(world), limit=1))
    assert all(evaluator.due(step) for step in range(1, 11))  # no eval.every: at every checkpoint
    outcome = evaluator.run(Owl2ForCausalLM.from_pretrained(checkpoint), step=2)
    tracker = Tracker(mlflow_uri)
    run_id = tracker.start_run("stage-with-eval", EXPERIMENT)
    log_outcome(tracker, run_id, outcome, "shapes")
    artifacts = {a.path for a in tracker.client.list_artifacts(run_id, "eval/step_000002")}
    assert artifacts == {
        "eval/step_000002/shapes_predictions.jsonl",
        "eval/step_000002/eval_table.txt",
        "eval/step_000002/metrics.json",
    }
    # The logged table is the suite's, titled with the step, as `owl2 eval` logs its own.
    table = tracker.client.download_artifacts(run_id, "eval/step_000002/eval_table.txt", str(tmp_path))
    assert Path(table).read_text() == outcome.table("shapes at step 2") + "\n"


def test_trainer_checks_the_eval_suite_before_workers_start(world, tmp_path):
    from owl2.config import ConfigError, ExperimentConfig
    from owl2.train.trainer import check_evals, resolve_paths

    stage = _stage_with_eval(world, suite="vqa", data="missing/vqa.jsonl", image_root="images")
    experiment = resolve_paths(ExperimentConfig(stages={"stage2": stage}), base=tmp_path)
    assert stage.eval.data == str(tmp_path / "missing" / "vqa.jsonl") and stage.eval.image_root == str(
        tmp_path / "images"
    )
    with pytest.raises(ConfigError, match="stages.stage2.eval: "):
        check_evals(experiment)
    check_evals(experiment, stages=["stage1"])  # a stage that does not run is not checked
