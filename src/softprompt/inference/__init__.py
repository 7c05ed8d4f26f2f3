"""Inference: the prompt bank and prefix cache, key/value batching, sampling and the mixed-task
``Engine`` with its one decode loop."""
