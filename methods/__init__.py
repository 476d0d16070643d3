"""Built-in multi-bit quantization methods; each module registers itself with ``@register_method``."""
