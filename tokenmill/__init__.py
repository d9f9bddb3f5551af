"""tokenmill: run language models over large prompt datasets.

from tokenmill import LLM, SamplingParams
llm = LLM()                      # the default model, SmolLM2-135M-Instruct
outs = llm.generate(["Hello"], SamplingParams(temperature=0.8, top_p=0.95))
"""

from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.engine.sampling_params import SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "SamplingParams",
    "StructuredOutputsParams",
    "RequestOutput",
    "CompletionOutput",
    "__version__",
]


def __getattr__(name: str):
    # LLM pulls in torch and transformers: import it on first use, so `tokenmill --help` is quick.
    if name == "LLM":
        from tokenmill.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'tokenmill' has no attribute {name!r}")
