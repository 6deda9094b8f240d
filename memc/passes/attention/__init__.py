"""Attention passes: find every attention site, rewrite it into memc's memory-caching form, distill it."""
