"""Formats and runners: one file per format with its export, its runners and its Triton mapping;
``registry.py`` lists them."""
