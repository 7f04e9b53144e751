"""Forensics: what a model's weights say about where it came from.

`fit` recovers the affine merge (weights summing to 1, globally and per block) that best explains a model from
candidate parents; `similar` ranks models by relative distance; `family` clusters files into families from all
pairwise distances; `lora_fit` tells which checkpoints a LoRA fits. Every command streams the files once, chunk by
chunk, accumulating Gram matrices of differences from a reference model in fp64 (stream.py).
"""
