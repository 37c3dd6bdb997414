"""Measuring a student: images for evaluation, FID / IS / CLIP score, parameters / MACs / latency."""
