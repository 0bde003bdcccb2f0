"""Generic tasks that work with any backbone that gives features (classification)."""
