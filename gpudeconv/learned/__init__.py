"""Learned deconvolution: training data (`data`) and the network that restores from it."""
