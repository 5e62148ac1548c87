"""fabrika: an LLM factory. One config runs collect, train, evaluate and export."""

__version__ = "0.1.0"
