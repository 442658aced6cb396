"""Lyra-Nano: the embedded default that `make demo` trains and talks with on a 2-core CPU.

A self-contained experiment on top of the library (the library never imports it): a synthetic
omni task (`task`, and long-speech haystacks in `long_speech`), pretraining phases for the ViT
and the sound projector (`vision`, `sound`), the pipeline through the one training recipe
(`pipeline`, with its configs in `configs/`), held-out evaluation (`evaluate`), the demo
(`demo`: `python -m lyra.nano.demo`) and the paper's ablations in miniature (`reproduce`:
`python -m lyra.nano.reproduce`).
"""
