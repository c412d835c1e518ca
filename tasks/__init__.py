"""Built-in tasks (installed as ``lwbench.tasks``); synthetic generators live in ``_synth``."""
