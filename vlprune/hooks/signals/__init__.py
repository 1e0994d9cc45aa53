"""Attention signals without eager attention: probes that recompute only the rows a method asks for.

A probe sits on one module as hooks and keeps references to that call's inputs and to the
outputs of its q / k / v projections (per thread; no copy, no compute); when a method asks, it
computes ``softmax(q·kᵀ·scale + mask)`` or other reductions for the requested rows only, from
those projections and the module's RoPE. The model keeps running its own attention backend
(sdpa, eager or flash) untouched.

- ``vision_probes``: vision-encoder layers (CLIP, Qwen), their reductions, patch → token maps;
- ``text_probes``: decoder attention rows, values, token transitions;
- ``module_probes``: the :class:`Probe` base class, a module-input probe, the kept outputs of an
  attention's projections, handle groups;
- ``text_qk``: decoder queries and keys read off each text attention's projections;
- ``recompute``: RoPE and the fp32 masked softmax they share.
"""

from vlprune.hooks.signals.module_probes import (
    HandleGroup,
    ModuleInputProbe,
    Probe,
    ProjectionOutputs,
)
from vlprune.hooks.signals.recompute import (
    apply_rope,
    apply_vision_rope,
    masked_softmax,
    rotate_half,
)
from vlprune.hooks.signals.text_probes import (
    NextLayerAttentionProbe,
    TextAttentionProbe,
    TextQKV,
    TokenTransitionProbe,
    transition_terms,
)
from vlprune.hooks.signals.vision_probes import (
    ClipAttentionProbe,
    GlobalQueryAttention,
    PatchTokenProbe,
    QwenVisionAttentionProbe,
    VisionAttentionProbe,
    VisionAttentionScores,
    VisionQKV,
)

__all__ = [
    "ClipAttentionProbe",
    "GlobalQueryAttention",
    "HandleGroup",
    "ModuleInputProbe",
    "NextLayerAttentionProbe",
    "PatchTokenProbe",
    "Probe",
    "ProjectionOutputs",
    "QwenVisionAttentionProbe",
    "TextAttentionProbe",
    "TextQKV",
    "TokenTransitionProbe",
    "VisionAttentionProbe",
    "VisionAttentionScores",
    "VisionQKV",
    "apply_rope",
    "apply_vision_rope",
    "masked_softmax",
    "rotate_half",
    "transition_terms",
]
