"""The orchestration of ``nav.optimize`` and ``nav.load_optimized``, read top to bottom from ``run.py``."""
