"""Datasets (bundled offline default and real image datasets) and partitioners."""
