"""The Transformer and its shapes.

`ModelConfig`, presets and counting are torch-free; `GPT` (PyTorch) is imported lazily so that
`from scalelm.model import ModelConfig` works on a machine without torch (the planner relies on it).
"""

from scalelm.model.config import ModelConfig
from scalelm.model.counting import flops_per_token, num_params
from scalelm.model.presets import PRESETS, get_preset

__all__ = ["GPT", "ModelConfig", "PRESETS", "flops_per_token", "get_preset", "num_params"]


def __getattr__(name: str):
    if name == "GPT":
        from scalelm.model.gpt import GPT

        return GPT
    raise AttributeError(name)
