"""Test-wide settings: no model hub, few threads, and the shared golden vectors."""

import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Set before anything imports transformers/huggingface_hub, which read these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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
SYNCING_OPS = frozenset({"aten.nonzero", "aten._local_scalar_dense", "aten.masked_select", "aten.item", "aten.unique"})


class OpRecorder(TorchDispatchMode):
    """Records the name of every aten operation run inside ``with recorder:``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    @property
    def syncing(self) -> set[str]:
        assert self.ops, "the recorder saw no operations"
        return self.ops & SYNCING_OPS


@pytest.fixture
def op_recorder() -> OpRecorder:
    return OpRecorder()
