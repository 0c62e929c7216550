"""Figures and the run report."""
