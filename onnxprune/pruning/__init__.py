"""Pruning decisions: groups -> scores -> zeros.

``criteria`` scores channels from weights and ``calibrate``d activation statistics,
``decision`` records what a pass picked per group, ``workspace`` is what every structured pass
opens (the prepared model, its analysis, lazy statistics), ``zero`` writes the zeros.
"""
