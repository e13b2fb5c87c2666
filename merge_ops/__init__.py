"""Alloy's merge engine: checkpoint IO, recipes, task vectors and the method registry (no web or queue imports)."""

__version__ = "0.1.0"
