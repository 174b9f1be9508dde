"""Model libraries arcvit adapts: each backend registers its block specs and model hooks with the core."""
