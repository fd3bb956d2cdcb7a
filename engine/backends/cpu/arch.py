"""The architectures the CPU backend's fused paths implement: Llama, Mistral and Qwen2 (so SmolLM2,
Llama 2/3, Mistral, Qwen2/2.5). One list for the lean activations and the fused decoder."""
from __future__ import annotations

FAMILIES = (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"))


def llama_family(suffix: str) -> tuple[type, ...]:
    """Exact transformers classes `<Family><suffix>` (e.g. "MLP", "RMSNorm", "ForCausalLM") that exist
    in the installed transformers; duplicates (Mistral's norm may be Llama's own class) once."""
    found = []
    for module, prefix in FAMILIES:
        try:
            mod = __import__(f"transformers.models.{module}.modeling_{module}", fromlist=[prefix + suffix])
            found.append(getattr(mod, prefix + suffix))
        except (ImportError, AttributeError):  # pragma: no cover - older/newer transformers
            pass
    return tuple(dict.fromkeys(found))
