"""One module per transformer architecture (Flux, SD3/3.5): detection rule, key namings, block map, LoRA names.

Each module defines `ARCHITECTURES`, a tuple of `arch.registry.Architecture`; `arch.registry` lists the modules.
docs/adding-an-architecture.md explains the seam.
"""
