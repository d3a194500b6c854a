"""Rewrite passes: one file each, each a pure function ``(GraphModule, PassContext) -> PassResult``.

The order they run in is written in ``tilec/pipeline.py``.
"""
