"""Exploring a finished run: duplicates, outliers and quality flags, exporting clusters to folders."""
