"""The vLLM engine behind ``softprompt serve --engine vllm``: imported only when vLLM was chosen
(``softprompt.serve.engines``), so a machine without vLLM never imports this package.

``launch`` builds vLLM's in-process ``AsyncLLM`` from vLLM's own engine flags; ``runner`` is the
scheduler that hands the server's generation jobs to it, each shallow prompt sent as
``prompt_embeds`` rows in front of the request's token ids (docs/design.md says why).
"""
