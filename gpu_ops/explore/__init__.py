"""Exploring a finished run: similar-image search and assigning new images to its clusters."""
