"""Test-wide settings: no model hub, few threads, the shared golden vectors and one synthetic shapes world."""

import json
import os
import random
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

# Set before anything imports transformers/huggingface_hub, which read these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Ray Train's controller polls workers every 2 s by default; tiny test runs would mostly wait. Set only while the
# session's cluster starts (its processes inherit it): see owl2.runtime.WARM_LOCAL_CLUSTER.
TRAIN_POLL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}

if "OMP_NUM_THREADS" not in os.environ:  # an explicit thread count from the caller wins
    # CI machines have 2 cores; more threads than cores slows the tiny models down.
    torch.set_num_threads(2)

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The specification's data files (``../shared/reference``), e.g. the 7B state-dict shapes."""
    path = SHARED_DIR / "reference"
    if not path.is_dir():
        pytest.fail(f"reference data not found at {path}: ../shared must sit beside the repository", pytrace=False)
    return path


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """Golden vectors from the official code (``../shared/golden/owl2_tiny`` beside the repository)."""
    path = SHARED_DIR / "golden" / "owl2_tiny"
    if not path.is_dir():
        pytest.fail(
            f"golden vectors not found at {path}: the shared/ folder must sit beside the repository "
            "(../shared from the repository root)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def shapes_world_args() -> dict[str, int]:
    """The ``generate_world`` arguments of :func:`shapes_world`. 60 training images: test_train's resume test
    counts its epochs in them; 8 held-out ones: fewer than test_eval's limit of 12 items per split."""
    return {"seed": 0, "num_train": 60, "num_heldout": 8}


@pytest.fixture(scope="session")
def shapes_world(tmp_path_factory: pytest.TempPathFactory, shapes_world_args: dict[str, int]) -> Iterator[Path]:
    """The root of one shapes world for the whole session, to read only (a test that writes into a world works
    on a copy): the session ends in an error if a test added, removed or rewrote any of its files."""
    from owl2.data.world import generate_world

    root = tmp_path_factory.mktemp("shapes-world")
    generate_world(root, **shapes_world_args)
    before = _file_stats(root)
    yield root
    assert _file_stats(root) == before, f"a test changed the shared shapes world in {root}"


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory, shapes_world: Path) -> Path:
    """A module's own folder that shows the shared world at ``data/shapes_world`` (a link), the path the shipped
    experiment YAMLs name relative to it; the module's runs go beside it."""
    root = tmp_path_factory.mktemp("pipeline")
    (root / "data").mkdir()
    (root / "data" / "shapes_world").symlink_to(shapes_world, target_is_directory=True)
    return root


def _file_stats(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, modification time) of every file under ``folder``, by relative path."""
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in folder.rglob("*")
        if path.is_file()
    }


@pytest.fixture(scope="session")
def tiny_llama_config():
    """A 2-layer transformers LLaMA with grouped-query attention (4 query heads, 2 K/V heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )


# Operations that make the host wait for the device (data-dependent shapes or scalar reads).
SYNCING_OPS = frozenset(
    {
        "aten.nonzero",
        "aten._local_scalar_dense",
        "aten.masked_select",
        "aten.item",
        "aten.unique",
        "aten.equal",
        "aten.is_nonzero",
    }
)


class OpRecorder(TorchDispatchMode):
    """Records the name of every aten operation run inside ``with recorder:``, how often each ran, and the
    copies to host memory: ``_to_copy`` asked for the CPU device (on a CPU run too), or ``copy_`` into a CPU
    tensor from another device."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()
        self.counts: Counter[str] = Counter()
        self.host_copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops.add(name)
        self.counts[name] += 1
        kwargs = kwargs or {}
        to_host = name == "aten._to_copy" and kwargs.get("device") == torch.device("cpu")
        if name == "aten.copy_" and args[0].device.type == "cpu" and args[1].device.type != "cpu":
            to_host = True
        if to_host:
            self.host_copies.append(name)
        return func(*args, **kwargs)

    @property
    def syncing(self) -> set[str]:
        assert self.ops, "the recorder saw no operations"
        return self.ops & SYNCING_OPS


@pytest.fixture
def op_recorder() -> OpRecorder:
    return OpRecorder()


@pytest.fixture
def single_process_group() -> Iterator[None]:
    """A gloo process group of this process alone (DDP and FSDP2 on one CPU rank)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _spm_corpus(n: int = 400) -> list[str]:
    rng = random.Random(0)
    subjects = ["the cat", "a small dog", "my neighbour", "the red car", "an old man", "two birds", "a young girl"]
    verbs = ["sees", "likes", "paints", "carries", "finds", "watches", "describes"]
    objects = ["the picture", "a blue ball", "the river", "three apples", "the window", "an image of a house"]
    endings = ["today.", "in the morning!", "near the park?", "with 42 friends.", "because it is sunny.", ""]
    lines = [
        f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)} {rng.choice(endings)}".strip()
        for _ in range(n)
    ]
    return lines + ["USER: What is this? ASSISTANT: This is a photo."] * 20


@pytest.fixture(scope="session")
def spm_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding only ``tokenizer.model``: a tiny SentencePiece BPE trained with LLaMA's settings."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(_spm_corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        model_type="bpe",
        vocab_size=400,  # 256 byte pieces + 3 specials + ~140 learned pieces
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        minloglevel=2,
    )
    corpus.unlink()  # the folder doubles as a checkpoint folder for load_tokenizer
    return folder


@pytest.fixture(scope="session")
def write_tiny_checkpoint():
    """``write(folder, world) -> folder``: a random debug-size model (56 px images) over a shapes world's
    512-piece tokenizer, saved as an owl2 training checkpoint of stage2, step 7 (experiment ``owl2-eval-tests``)."""
    import json

    import yaml

    from owl2.config import ModelConfig
    from owl2.model import Owl2Config, Owl2ForCausalLM

    def write(folder: Path, world: Path) -> Path:
        spec = ModelConfig.from_preset("debug", {"decoder": {"vocab_size": 512}, "vision": {"image_size": 56}})
        torch.manual_seed(0)
        Owl2ForCausalLM(Owl2Config.from_spec(spec)).save_pretrained(folder)
        experiment = {
            "name": "tiny-eval",
            "tracking": {"experiment": "owl2-eval-tests", "tracking_uri": ""},
            "storage_path": str(folder.parent / "runs"),
            "stages": {"stage2": {"data": {"tokenizer": str(world / "tokenizer"), "template": "vicuna_v1"}}},
        }
        (folder / "experiment.yaml").write_text(yaml.safe_dump(experiment))
        (folder / "state.json").write_text(json.dumps({"stage": "stage2", "step": 7}))
        return folder

    return write


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (a cold start costs about 5 s on 2 cores), started as
    owl2 starts one (``runtime.ensure_ray``), sized for this machine."""
    import ray

    from owl2.runtime import WARM_LOCAL_CLUSTER, ensure_ray

    with pytest.MonkeyPatch.context() as patch:
        for name, value in TRAIN_POLL_ENV.items():
            patch.setenv(name, value)
        ensure_ray(
            # Always a fresh cluster of the session's own: without an address, Ray joins the cluster that
            # /tmp/ray/ray_current_cluster names (left by another session, or already gone).
            address="local",
            num_cpus=2,
            object_store_memory=256 * 1024 * 1024,
            # Idle worker processes kept: each data pass then takes ~0.4 s, not ~10 s.
            _system_config=WARM_LOCAL_CLUSTER,
        )
    yield ray
    ray.shutdown()


def registered_steps(snapshot: Path) -> list[int]:
    """The steps of the checkpoints Ray Train's controller has registered (its snapshot, beside the folders)."""
    try:
        results = json.loads(snapshot.read_text())["checkpoint_results"]
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return []
    return [result["metrics"].get("step") for result in results]
