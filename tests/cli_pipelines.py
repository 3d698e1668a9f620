"""Tiny pipelines saved with save_pretrained, for the command line's tests: loaded back by the
real loading code (DiffusionPipeline.from_pretrained on local files)."""

import inspect
import os

import torch

import diffusers
import tiny_pipelines
import tiny_pipelines_more


def _bytes_to_unicode():
    """CLIP's byte-to-character table (every byte a printable character)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_tokenizer(max_length=16):
    """A CLIP tokenizer over single characters (no merges): no download."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:
        return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    import json
    import tempfile

    folder = tempfile.mkdtemp()
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=max_length)


def _text_config(dim=24):
    return dict(vocab_size=514, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=16, bos_token_id=512, eos_token_id=513, pad_token_id=513)


def save_sd(folder: str) -> str:
    """Stable Diffusion (tiny UNet, VAE, text encoder and tokenizer), prompts as text."""
    from transformers import CLIPTextConfig, CLIPTextModel

    pipe, _ = tiny_pipelines.sd()
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_text_config())).eval()
    diffusers.StableDiffusionPipeline(**dict(pipe.components, tokenizer=tiny_tokenizer(), text_encoder=text_encoder),
                                      requires_safety_checker=False).save_pretrained(folder)
    return folder


def save_dit(folder: str) -> str:
    pipe, _ = tiny_pipelines_more.dit()
    pipe.save_pretrained(folder)
    return folder


def save_clip(folder: str) -> str:
    """A tiny random CLIP model and its processor, as a local --clip-model folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    config = CLIPConfig(text_config=_text_config(16), projection_dim=8,
                        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=2, num_attention_heads=4))
    CLIPModel(config).eval().save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer=tiny_tokenizer())
    processor.save_pretrained(folder)
    return folder
