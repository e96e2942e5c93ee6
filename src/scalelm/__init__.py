"""scalelm: GPT-style language models from theory to practice — plan, train at scale, compress, serve."""

__version__ = "0.1.0"


def load(path, device: str = "cpu"):
    """The model of a run directory or checkpoint, in eval mode, ready for `model(ids)` → logits."""
    from scalelm.train.checkpoint import load_model

    return load_model(path, device=device)


__all__ = ["load", "__version__"]
