"""Native model classes of the suite: LLaDA and Dream without ``trust_remote_code``.

One file per architecture (``llada.py``, ``dream.py``) over the layers they share (``layers.py``),
which they import relatively and nothing else of the suite: ``bgpo.export`` ships them in an LLaDA /
Dream export (as ``modeling_llada.py`` / ``modeling_dream.py`` beside ``layers.py``, named by
config.json's ``auto_map``), which then loads with transformers alone (``trust_remote_code=True``).
Importing this package registers both with transformers' Auto classes, so that
``AutoConfig.from_pretrained(folder)`` / ``AutoModel.from_pretrained(folder)`` pick the native class
for a hub checkpoint's ``model_type`` (``llada``, ``Dream``) without running its remote code.
(The published remote code, if a later call runs it with ``trust_remote_code=True``, registers its
own config class under the same name; the suite's loader does not go through the Auto classes.)
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel

from bgpo.models.dream import DreamConfig, DreamModel
from bgpo.models.llada import LLaDAConfig, LLaDAModelLM

NATIVE = {"llada": LLaDAModelLM, "dream": DreamModel}
"""``model.kind`` -> native class (its ``config_class.model_type`` is what config.json must say)."""

for _cls in NATIVE.values():
    AutoConfig.register(_cls.config_class.model_type, _cls.config_class, exist_ok=True)
    AutoModel.register(_cls.config_class, _cls, exist_ok=True)

__all__ = ["NATIVE", "DreamConfig", "DreamModel", "LLaDAConfig", "LLaDAModelLM"]
