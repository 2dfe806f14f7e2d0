"""owl2: an open platform for training mPLUG-Owl2-style multimodal LLMs on Ray.

The package root stays free of heavy imports (torch, transformers, ray) so that the CLI and Ray
drivers start fast; import the submodules you need.
"""

__version__ = "0.1.0"
