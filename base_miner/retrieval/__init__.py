"""Retrieval: recognise challenges that are distorted copies of public real images (an index CAMO looks up first).

`descriptor` (CNN features that shortlist), `local` (keypoints that verify), `index` (faiss search, keypoint store,
manifest, match score), `calibration` (match rule and answered probability), `builder` (resumable `bitmind-index
build`), `expert` (CAMO's look-up), `audit` (the validator's view), `cli` (the `bitmind-index` entry point, which
wires in the validator's augmenter).
"""
