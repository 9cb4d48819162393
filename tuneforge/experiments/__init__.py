"""Experiments over many runs: hyperparameter sweeps (Optuna) and learning curves.

Both call the training entry point (:func:`tuneforge.recipes.run_recipe`) as a plain function,
and every trial or curve point is an ordinary run folder (open, eval, export or serve it).
"""
