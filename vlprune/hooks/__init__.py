"""Where tokens are cut, model-agnostic, driven by the adapter.

- ``calls``: the entry points every cut shares (``generate``, ``get_image_features``, the base
  model's forward): which call runs in this thread, its image encode, its inputs;
- ``vision``: the vision-side cut before the language model (``images``: where the images of a
  prefill are; ``gather``: the shared gather);
- ``encoder`` / ``encoder_state``: the cut between vision-encoder layers;
- ``decoder``: the cut at decoder layers (``masks``: the masks of cut rows, in the convention
  of each attention implementation);
- ``deepstack``: Qwen3-VL's DeepStack inputs kept consistent with every cut;
- ``recurrent``: decoder cuts through linear-attention layers (Qwen3.5);
- ``loss``: the causal-LM loss over kept rows;
- ``signals``: probes that recompute only the attention rows a method asks for;
- ``state``: per-thread and per-cache state, deep copies and pickling of a patch.
"""
