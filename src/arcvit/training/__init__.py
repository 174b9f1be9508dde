"""Training and evaluation with Lightning Fabric: settings, the loop, checkpoints, recipes, progress."""
