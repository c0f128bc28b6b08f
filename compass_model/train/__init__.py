"""The training side of the model layer: the recipe's stages (``pipeline.py``), the one training loop
(``loop.py``) and its objectives (``objectives.py``), alignment, evaluation, checkpoints and progress."""
