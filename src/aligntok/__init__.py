"""aligntok: pretrained vision foundation encoders aligned into image tokenizers for latent diffusion."""

__version__ = "0.1.0"

__all__ = ["AlignTokTokenizer", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import aligntok` (and the CLI's --help) does not pay for torch + transformers.
    if name == "AlignTokTokenizer":
        from aligntok.models.tokenizer import AlignTokTokenizer

        return AlignTokTokenizer
    raise AttributeError(f"module 'aligntok' has no attribute {name!r}")
