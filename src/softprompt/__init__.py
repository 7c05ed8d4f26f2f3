"""softprompt: prompt tuning for frozen causal language models.

One frozen model, many tasks; each task is a small learned matrix ``P`` of shape ``(N, H)``
placed in front of the input embeddings. See ``docs/design.md``.
"""

__version__ = "0.1.0"
