"""The `growlm` command line: argv parsing and printing only, one module per command group (the top layer)."""

from growlm.cli.main import entry, main

__all__ = ["entry", "main"]
