"""The methods of SPEC §4 as plug-ins: one module per method, found by name through the registry.

    import fiseclip_jax.methods as methods
    methods.names()                       # ('musc', 'fiseclip', 'anoclip', 'anoclip+')
    m = methods.get("fiseclip", batch_size=8)
    det = m.score(m.encode(params, cfg, pixels), text, valid, size=S)

A new method: subclass `Method` as a frozen dataclass with `encode`/`score` (and `group` if it
matches over the whole category), then `@register("name")` it (see base.py).
"""

from .base import BankRefs, Detection, Method, as_text, get, names, register, replace_path, unregister
from .common import default_match_layers, text_alignment
from .musc import MuScConfig
from .fiseclip import FiSeCLIPConfig
from .anoclip import AnoCLIPConfig
from .tta import TTAConfig

__all__ = ["AnoCLIPConfig", "BankRefs", "Detection", "FiSeCLIPConfig", "Method", "MuScConfig", "TTAConfig", "as_text",
           "default_match_layers", "get", "names", "register", "replace_path", "text_alignment", "unregister"]
