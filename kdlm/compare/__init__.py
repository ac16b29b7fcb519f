"""`kdlm compare`: distillation methods side by side at an equal budget (kdlm.compare.grid: the grid file;
kdlm.compare.run: running or printing its commands; kdlm.compare.collect: compare.json with bootstrap intervals)."""

from kdlm.compare.grid import Grid, load_grid

__all__ = ["Grid", "load_grid"]
