"""Validation: the pruned model against the original.

``pair`` runs both on the same data, ``compare`` measures output agreement and accuracy,
``latency`` times interleaved runs, ``slow`` diagnoses slowdowns, ``gates`` reads the verdicts.
"""
