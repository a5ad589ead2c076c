"""Video challenges: clip sources and caches, clip sampling, clip-consistent augmentation and the video sampler."""
