"""``owl2 plan``: parameters, memory per GPU, FLOPs and a fits/does-not-fit verdict for each stage, from the config
alone (the model is built on the ``meta`` device: no weights, no GPU).

``gpus`` holds the GPU table, ``flops`` the FLOP rule (also used for MFU in training), ``memory`` the memory
estimate, ``report`` puts them together per stage.
"""
