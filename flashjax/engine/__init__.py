"""The flash engine: FFN rows stream from the flash store into fixed DRAM buffers.

``state`` (what a generation carries: ``FlashState``), ``selectors`` (which rows a token
needs), ``schedule`` (when reads, updates and FFN pieces run), ``kernels`` (the jitted
pieces), ``model`` (``FlashModel``: the decode step that ties them together).
"""

from flashjax.engine.model import FlashModel
from flashjax.engine.options import EngineOptions
from flashjax.engine.selectors import Hybrid, LowRank, Naive, Oracle, Selection, Selector
from flashjax.engine.state import FlashState, NeuronBuffer

__all__ = ["FlashModel", "EngineOptions", "FlashState", "NeuronBuffer", "Selector", "Selection",
           "Oracle", "LowRank", "Naive", "Hybrid"]
