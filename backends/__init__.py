"""Model providers behind one Protocol (`backends.base.CausalLM`), picked by name from `BACKENDS`."""

import kd  # noqa: F401 - sets the OpenMP wait policy before torch loads
from backends.base import BACKENDS, CausalLMBackend, get_backend

__all__ = ["BACKENDS", "CausalLMBackend", "get_backend"]
