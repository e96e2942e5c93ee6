"""scalelm: GPT-style language models from theory to practice — plan, train at scale, compress, serve."""

__version__ = "0.1.0"


def load(path, device: str = "cpu"):
    """The model of a run directory or checkpoint (quantized ones included), in eval mode, ready for
    `model(ids)` → logits."""
    from scalelm.infer.load import load_any_model

    return load_any_model(path, device=device)


__all__ = ["load", "__version__"]
