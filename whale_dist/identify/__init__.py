"""Identification: ranking, calibration, evaluation, baselines, the review report."""
