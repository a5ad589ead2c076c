"""Challenges, scoring and weights: everything a validator judges miners with."""
