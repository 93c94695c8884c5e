"""Topologies, mixing weights, graph statistics and link / failure models."""
