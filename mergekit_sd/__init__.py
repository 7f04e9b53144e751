"""sdbuild: make for Stable Diffusion checkpoints."""

__version__ = "0.1.0"
TOOL = f"sdbuild {__version__}"
