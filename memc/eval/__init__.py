"""Evaluation: the yardsticks every rewrite is judged by (perplexity, recall, embedding cosine, bytes, speed).

Every measurement runs on a ``Backend``: a torch Program captured by memc or a compiled ONNX artifact, so the
same numbers can be compared before and after compilation.
"""
