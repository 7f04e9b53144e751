"""File formats: safetensors and legacy pickle checkpoints read lazily, written atomically; file and content digests.

Knows nothing about architectures: names and bytes only. See docs/formats.md §1.1 and §4.4.
"""
