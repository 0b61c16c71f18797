"""Developer tools, run from the repository root as modules: ``python -m tools.dump_batches`` and so on.
Not part of the installed package."""
