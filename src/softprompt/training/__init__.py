"""Training: ONE loop (``loop.fit``) for every method, the methods (prompt, multitask, LoRA, full,
hand-written prompts), ``tune.train`` end to end, checkpoints, data parallelism and transfer."""
