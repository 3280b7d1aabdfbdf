"""Benchmarks run by the drill: warm-up (warmup.py), eager vs compiled (compare.py), roofline (roofline.py)."""
