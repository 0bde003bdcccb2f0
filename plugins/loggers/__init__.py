"""Experiment loggers: plugins on the training-lifecycle hooks, picked by name in ``train.loggers``."""
