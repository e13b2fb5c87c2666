"""Alloy's merge engine: checkpoint IO, recipes, task vectors and the method registry (no web or queue imports)."""

import os

# torch's OpenMP threads (libgomp) spin on a core for a while after every parallel region by default; a merge's
# compiled passes and its reader and writer threads already use both cores, so each torch op on a mid-sized tensor
# (a histogram's accumulation, a norm) cost them that core: ComPEFT took 8.6–9.3 s with spinning threads and
# 6.2–6.9 s without (2-core VM, measured). libgomp reads this once, when torch loads it, so it is set before any
# torch import (every engine module imports this package first); a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
