"""Leaving and arriving: Hugging Face checkpoints and tokenizers out (`export_hf`) and in (`import_hf`), LoRA
adapters in the peft format, and a classification head fine-tuned on labelled text. Needs the [hf] extra
(transformers, peft) for export and for slow-tokenizer imports; importing safetensors checkpoints does not."""

from scalelm.interop.hf_export import export_hf
from scalelm.interop.hf_import import import_hf

__all__ = ["export_hf", "import_hf"]
