"""Shared helpers: image I/O, metrics, checkpoints, losses, options and error handling."""
