"""Synthetic checkpoints and LoRAs with real tensor names, for tests, demos and benchmarks."""
