"""Reference models trained here on offline text (CPython docs and sources), committed under models/.

corpus: the by-document train / held-out split; models: the configs; train: the reproducible training
CLI; metrics: held-out bits/byte next to gzip / xz, and MoE routing statistics.
"""
