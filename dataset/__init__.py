"""Paired low/normal-light folders, the validation split, and training augmentations."""
