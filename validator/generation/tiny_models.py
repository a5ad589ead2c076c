"""Tiny random BLIP-2, Llama and Stable Diffusion models saved with `save_pretrained`, for offline tests and demos.

Nothing can be downloaded in tests, yet the generator's loading code must run for real: these builders create
models from small configs (hidden size 32, one or two layers) and save them in the hub's folder layout, so the
production `from_pretrained` calls load them from a local path. Outputs are noise; shapes and plumbing are real.

Reuse: `build_tiny_models(root)` builds everything once (a marker file makes later calls free); the local demo
builds its generator's models with it, and tests use the session fixture in `tests/_tiny_models.py`.
Run these models with one torch thread (`torch.set_num_threads(1)` / `OMP_NUM_THREADS=1`): on a busy 2-core
machine, thread contention makes them 10-30x slower than single-threaded.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CHAT_TEMPLATE",
    "TinyModels",
    "build_tiny_blip2",
    "build_tiny_llm",
    "build_tiny_models",
    "build_tiny_sd",
    "build_tiny_sd_inpaint",
    "build_tiny_text_to_video",
    "word_tokenizer",
]

_MARKER = ".complete"

# Words the tiny models can emit; the caption prefixes are included so prompts tokenize without <unk>.
_WORDS = (
    "a an the of in on at with and is are image setting background type style photo painting picture "
    "cat dog person man woman child tree house street car sky field water beach mountain city room table "
    "red green blue white black bright dark small large old new sunny cloudy indoor outdoor close up view "
    "rephrase caption concise system user assistant"
).split()
_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")

CHAT_TEMPLATE = (
    "{% for message in messages %}<s> {{ message['role'] }} : {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


@dataclass(frozen=True)
class TinyModels:
    """Local folders of the tiny models; pass them where a hub id is expected."""

    root: Path
    blip2: Path
    llm: Path
    sd: Path
    sd_b: Path


def word_tokenizer():
    """A word-level fast tokenizer (tokenizers library) shared by the tiny BLIP-2 and Llama."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*_SPECIALS, *_WORDS, ".", ",", ":", "/"))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def build_tiny_blip2(path: Path, seed: int = 0) -> Path:
    """A Blip2ForConditionalGeneration (ViT + Q-Former + OPT, hidden 32) and its Blip2Processor in `path`."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        BlipImageProcessor,
        OPTConfig,
    )

    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    num_query_tokens = 4
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
            image_size=32, patch_size=8,
        ).to_dict(),
        qformer_config=Blip2QFormerConfig(
            hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
            encoder_hidden_size=32, cross_attention_frequency=1,
        ).to_dict(),
        text_config=OPTConfig(
            vocab_size=len(tokenizer), hidden_size=32, word_embed_proj_dim=32, ffn_dim=37, num_hidden_layers=1,
            num_attention_heads=4, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        ).to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = Blip2ForConditionalGeneration(config).eval()
    image_processor = BlipImageProcessor(size={"height": 32, "width": 32})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_llm(path: Path, seed: int = 0) -> Path:
    """A LlamaForCausalLM (hidden 32, one layer) with the word tokenizer and a chat template in `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = word_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _clip_tokenizer():
    """A byte-level CLIP BPE tokenizer with single-character tokens only (no merges)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=77)


def build_tiny_sd(path: Path, seed: int = 0) -> Path:
    """A StableDiffusionPipeline with a tiny random UNet / VAE / CLIP text encoder in `path` (64×64 output)."""
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline(**_tiny_sd_components(seed, unet_in_channels=4)).save_pretrained(path)
    return path


def build_tiny_sd_inpaint(path: Path, seed: int = 0) -> Path:
    """A StableDiffusionInpaintPipeline (UNet input: 4 latent + 4 masked-image latent + 1 mask channels) built the
    same way, for offline tests of the inpainting path; `AutoPipelineForInpainting` loads it from `path`."""
    from diffusers import StableDiffusionInpaintPipeline

    StableDiffusionInpaintPipeline(**_tiny_sd_components(seed, unet_in_channels=9)).save_pretrained(path)
    return path


def build_tiny_text_to_video(path: Path, seed: int = 0) -> tuple[Path, Path]:
    """An AnimateDiffPipeline (the tiny SD parts + a tiny random MotionAdapter) saved in `path / "pipeline"`, and
    the motion adapter alone in `path / "motion_adapter"`; returns both folders. `DiffusionPipeline` loads the first;
    the second, with the tiny SD folder as base, is how AnimateDiff-Lightning's adapter file is loaded."""
    from diffusers import AnimateDiffPipeline, MotionAdapter

    components = _tiny_sd_components(seed, unet_in_channels=4)
    adapter = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=False)
    parts = {key: components[key] for key in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    AnimateDiffPipeline(**parts, motion_adapter=adapter).save_pretrained(path / "pipeline")
    adapter.save_pretrained(path / "motion_adapter")
    return path / "pipeline", path / "motion_adapter"


def _tiny_sd_components(seed: int, unet_in_channels: int) -> dict:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _clip_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=unet_in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32, attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), sample_size=64,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )
    return dict(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
        scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_models(root: Path) -> TinyModels:
    """Build (once) every tiny model under `root`; a second call with the same root only returns the paths."""
    import torch

    root = Path(root)
    paths = TinyModels(root, root / "blip2", root / "llm", root / "sd", root / "sd_b")
    if (root / _MARKER).exists():
        return paths
    for folder in (paths.blip2, paths.llm, paths.sd, paths.sd_b):
        shutil.rmtree(folder, ignore_errors=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared machine
    try:
        build_tiny_blip2(paths.blip2)
        build_tiny_llm(paths.llm)
        build_tiny_sd(paths.sd)
    finally:
        torch.set_num_threads(threads)
    shutil.copytree(paths.sd, paths.sd_b)  # a second model: same weights, its own folder
    (root / _MARKER).write_text(json.dumps({"models": ["blip2", "llm", "sd", "sd_b"]}))
    return paths
