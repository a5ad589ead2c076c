"""Content gates that route an image to the expert detectors of CAMO."""
