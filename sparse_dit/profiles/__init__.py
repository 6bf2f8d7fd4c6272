"""Profiles shipped with sparse-dit (JSON files); `sparse_dit.patch(pipe, profile="<name>")` finds them by name."""
