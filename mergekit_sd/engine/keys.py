"""Step keys: what a step's tensors depend on (compute key) and what its stored object holds (object key)."""

from __future__ import annotations

from mergekit_sd.formats.digests import canonical, hash_text


def compute_key(op: str, version: int, params: dict, input_digests: list[str]) -> str:
    """What the tensors of a step depend on: op, op version, canonical parameters, inputs' content digests."""
    return hash_text("sdbuild-step-v1", op, str(version), canonical(params), canonical(input_digests))


def object_key(compute: str, metadata_text: str) -> str:
    """The stored object also holds final metadata, so its address covers both."""
    return hash_text("sdbuild-object-v1", compute, metadata_text)
