"""Datasets and the train / evaluate commands (``vqa-train``, ``vqa-eval``)."""
