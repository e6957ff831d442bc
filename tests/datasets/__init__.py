"""Tests of the dataset tools (MNIST, image sets)."""
