"""Recorded outputs of pytorch-fid and lpips on seeded weights (record.py), and the seeded weights (seeded.py)."""
