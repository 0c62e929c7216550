"""Exploring a finished run: duplicates, outliers and quality flags, similar-image search, assigning
new images to its clusters, exporting clusters to folders."""
