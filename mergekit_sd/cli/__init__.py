"""Command line: argument parsing and printing only; every command calls one library function.

Commands import the library inside their handlers, so that a no-op `sdbuild build` answers from stamps without
importing torch.
"""
