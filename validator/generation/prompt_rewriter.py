"""LLM rewrite of a chained BLIP-2 caption into a concise text-to-image prompt.

Chained captions repeat themselves ("An image of a dog. The setting is a beach. The background is a beach.") and
can name people. An instruction-tuned LLM rephrases them concisely; on a GPU it is loaded 4-bit with bitsandbytes
(~6 GB for Llama-3.1-8B), on a CPU (no bitsandbytes kernels) in full precision, and the log says which.
"""

import importlib.util
import logging
import re
import time
from typing import Any

__all__ = ["DEFAULT_REWRITER", "INSTRUCTION", "PromptRewriter", "clean_rewrite"]

log = logging.getLogger(__name__)

DEFAULT_REWRITER = "meta-llama/Llama-3.1-8B-Instruct"
INSTRUCTION = (
    "You turn image descriptions into prompts for a text-to-image model. Concisely rephrase the description, "
    "remove redundancy and remove any names of people. Answer with the prompt only, as one sentence, "
    "without quotes or comments."
)
_PREAMBLE = re.compile(r"^(?:here(?:'s| is)[^:\n]*|(?:rephrased |rewritten )?prompt)\s*:\s*", re.IGNORECASE)


def clean_rewrite(text: str) -> str:
    """The prompt itself, without a chatty preamble ("Here is the prompt:"), surrounding quotes or line breaks."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    text = _PREAMBLE.sub("", " ".join(lines))
    return text.strip().strip("\"'“”").strip()


def _load_kwargs(device: Any, quantize_4bit: bool, model_id: str) -> dict[str, Any]:
    """from_pretrained arguments: 4-bit NF4 on CUDA with bitsandbytes, else plain precision, logged either way."""
    import torch

    if device.type != "cuda":
        if quantize_4bit:
            log.info("4-bit loading needs a CUDA GPU; loading rewriter %s in full precision (float32) on %s",
                     model_id, device)
        return {"dtype": torch.float32}
    half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if not quantize_4bit:
        return {"dtype": half}
    if importlib.util.find_spec("bitsandbytes") is None:
        log.warning("bitsandbytes is not installed; loading rewriter %s in %s, not 4-bit", model_id, half)
        return {"dtype": half}
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=half, bnb_4bit_use_double_quant=True
    )
    log.info("loading rewriter %s 4-bit (nf4, compute %s) on %s", model_id, half, device)
    return {"quantization_config": quantization, "device_map": {"": device}}


class PromptRewriter:
    """Rephrases captions with a chat LLM through transformers' text-generation pipeline."""

    def __init__(
        self,
        model: str = DEFAULT_REWRITER,
        device: str = "cpu",
        quantize_4bit: bool = True,
        max_new_tokens: int = 80,
        instruction: str = INSTRUCTION,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

        self.model_id = model
        self.device = torch.device(device)
        self.max_new_tokens = max_new_tokens
        self.instruction = instruction
        start = time.perf_counter()
        kwargs = _load_kwargs(self.device, quantize_4bit, model)
        tokenizer = AutoTokenizer.from_pretrained(model)
        lm = AutoModelForCausalLM.from_pretrained(model, **kwargs)
        if "device_map" not in kwargs:
            lm = lm.to(self.device)
        self.quantized_4bit = bool(getattr(lm, "is_loaded_in_4bit", False))
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.model: Any = lm.eval()  # moved to host RAM and back in place by memory.Residency under a swap plan
        self.generator = pipeline("text-generation", model=self.model, tokenizer=tokenizer)
        log.info("loaded rewriter %s on %s (4-bit: %s) in %.1f s", model, self.device, self.quantized_4bit,
                 time.perf_counter() - start)

    def rewrite(self, caption: str) -> str:
        """The caption rephrased as a prompt ('' when the model produced nothing usable)."""
        messages = [{"role": "system", "content": self.instruction}, {"role": "user", "content": caption}]
        output = self.generator(
            messages,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            return_full_text=False,
            pad_token_id=self.pad_token_id,
        )
        return clean_rewrite(output[0]["generated_text"])
