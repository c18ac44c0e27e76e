"""pdlaunch: disaggregated prefill/decode LLM serving from one command."""

__version__ = "0.1.0"
