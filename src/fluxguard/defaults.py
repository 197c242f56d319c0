"""Defaults every front end shares (CLI, API, web UI), in a module light enough for ``fluxguard --help``."""

# The method that fools FR models it never attacked most often at the default (medium) visibility budget:
# benchmarks/results/transfer.md measures pgd against fluxguard on the lite models.
DEFAULT_METHOD = "pgd"
