"""Formats every floor shares: special tokens, chat templates and the run-directory layout."""
