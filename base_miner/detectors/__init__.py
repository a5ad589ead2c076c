"""Detector implementations; importing this package registers every built-in detector."""
