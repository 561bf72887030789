"""Model providers behind one Protocol (`backends.base.CausalLM`), picked by name from `BACKENDS`."""

from backends.base import BACKENDS, CausalLMBackend, get_backend

__all__ = ["BACKENDS", "CausalLMBackend", "get_backend"]
