"""The generate stage's parts: prompts, keys, the answer store, the teacher clients, the writer.

Nothing here imports vllm or torch at module level; ``offline`` imports vllm inside its function.
"""
