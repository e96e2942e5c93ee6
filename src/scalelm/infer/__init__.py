"""Using a trained model: the generation engine (KV cache, batching, sampling, streaming), evaluation, and the
decoding variants built on them."""

from scalelm.infer.generate import Completion, Delta, GenerationError, Generator, Request
from scalelm.infer.sampling import Sampling
from scalelm.infer.speculative import SpeculativeDecoder, SpeculativeStats, speculative_generate

__all__ = ["Completion", "Delta", "GenerationError", "Generator", "Request", "Sampling", "SpeculativeDecoder",
           "SpeculativeStats", "speculative_generate"]
