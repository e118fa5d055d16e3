"""Whole pipelines on the built-in data: ``aligntok demo`` and ``aligntok reproduce``."""
