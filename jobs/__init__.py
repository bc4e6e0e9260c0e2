"""Thin command-line entry points over the `pipeline` library."""
