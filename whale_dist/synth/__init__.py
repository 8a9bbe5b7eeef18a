"""Synthetic surveys: the generator (plan, draw, photo) in the Happywhale layout."""
