"""Model fusion: several models into one (an ensemble graph, or one model's parameters
averaged over checkpoints of its architecture: :func:`onnxprune.fusion.weights.merge_weights`)."""
