"""Experiments over the library: method comparison, continual learning, prompt inspection, and
their shared provenance and measurement helpers."""
