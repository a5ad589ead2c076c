"""Synthetic challenge images: caption a real image (BLIP-2), rewrite the caption (LLM), generate it (diffusers).

Modules: `captioner` (chained-prefix BLIP-2 captions), `prompt_rewriter` (LLM rephrasing, 4-bit on GPU),
`moderation` (strip names and unsafe words), `diffusion` (model list, per-model arguments, a memory-budgeted pool),
`memory` (the pool's budget and when the captioner and rewriter leave the GPU),
`pipeline` (caption → rewrite → generate → cache). Heavy libraries are imported inside the functions that use them.
"""
