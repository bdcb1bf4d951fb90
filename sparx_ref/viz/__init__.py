"""Figures shared by the lessons, the demo and the README."""
