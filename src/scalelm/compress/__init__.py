"""Making a trained model cheaper to run: weight-only quantization (quantize.py, checkpoint.py), pruning with an
optional masked recovery fine-tune (prune.py, recover.py), and distillation into a smaller student (distill.py).
Each is a conversion of a built model or a use of the normal trainer; cli.py holds the commands."""
