"""BLIP-2 captions of real images, built from chained prefixes.

A single BLIP-2 caption is short ("a dog on a beach"). Asking in turn for the subject, the setting, the background
and the image style, each time with everything said so far as the text prompt, gives a fuller description that
makes generated images look like the real image they came from.
"""

import logging
import re
import time
from typing import Any

from PIL import Image

__all__ = ["CAPTION_PREFIXES", "DEFAULT_CAPTIONER", "Captioner", "clean_answer"]

log = logging.getLogger(__name__)

DEFAULT_CAPTIONER = "Salesforce/blip2-opt-6.7b-coco"
CAPTION_PREFIXES: tuple[str, ...] = ("An image of", "The setting is", "The background is", "The image type/style is")


def clean_answer(answer: str, prefix: str) -> str:
    """The first sentence of a generated continuation, without an echo of the prefix."""
    answer = re.sub(r"\s+", " ", answer).strip()
    if answer.lower().startswith(prefix.lower()):
        answer = answer[len(prefix):].strip()
    return answer.split(".")[0].strip(" ,;:")


class Captioner:
    """Describes an image with BLIP-2, one sentence per prefix."""

    def __init__(
        self,
        model: str = DEFAULT_CAPTIONER,
        device: str = "cpu",
        max_new_tokens: int = 20,
        prefixes: tuple[str, ...] = CAPTION_PREFIXES,
    ) -> None:
        import torch
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        self.model_id = model
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.max_new_tokens = max_new_tokens
        self.prefixes = prefixes
        start = time.perf_counter()
        self.processor = Blip2Processor.from_pretrained(model)
        self.model: Any = Blip2ForConditionalGeneration.from_pretrained(model, dtype=self.dtype).to(self.device).eval()
        elapsed = time.perf_counter() - start
        log.info("loaded captioner %s on %s (%s) in %.1f s", model, self.device, self.dtype, elapsed)

    def caption(self, image: Image.Image) -> str:
        """A description made of one sentence per prefix; prefixes the model has nothing to add for are left out."""
        import torch

        image = image.convert("RGB")
        description = ""
        for prefix in self.prefixes:
            prompt = f"{description} {prefix}".strip()
            inputs = self.processor(images=image, text=prompt, return_tensors="pt").to(self.device, self.dtype)
            with torch.inference_mode():
                ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, no_repeat_ngram_size=3)
            new_ids = ids[:, inputs["input_ids"].shape[1]:]
            answer = clean_answer(self.processor.batch_decode(new_ids, skip_special_tokens=True)[0], prefix)
            if answer:
                description = f"{prompt} {answer}."
        return description.strip()
