"""Synthetic teaching data and small packaged data files."""
