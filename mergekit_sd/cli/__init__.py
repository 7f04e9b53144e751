"""Command line: argument parsing and printing only; every command calls one library function."""
