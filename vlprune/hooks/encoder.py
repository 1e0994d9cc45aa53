"""The encoder cut: drop rows of the vision encoder's hidden states between its layers.

A third cut point, before the vision-side cut (``hooks/vision.py``) and the decoder cut
(``hooks/decoder.py``). It only runs inside a ``get_image_features`` call that belongs to a
prefill (the call tracker, ``hooks/calls.py``, arms it), so video features, direct tower calls
and direct ``get_image_features`` calls from user code are never cut.

The encoder runs *sequences* made of *units*, the things that may be dropped:

- batched encoders (CLIP, LLaVA-1.5 / LLaVA-NeXT): hidden states (n_seq, 1 + P, D), one sequence
  per crop, the CLS row first; a unit is one patch row. CLS always stays, and every sequence
  keeps the same count (crops stay stackable).
- packed encoders (Qwen2-VL / Qwen2.5-VL): hidden states (S, D), the frames of all images
  concatenated; a unit is a 2×2 merge group (``group`` = 4 consecutive rows), never split, so the
  patch merger still merges the patches of one group.

A unit's id is its raster position in the sequence's grid (the Qwen2.5-VL window permutation is
undone through the adapter's ``vision_unit_tokens``); rows stay in the encoder's own order.

Hooks (all removable, per model instance):

1. the tracker arms the cut with the call's :class:`~vlprune.hooks.calls.Encode` (layout
   inputs ``image_sizes`` / ``image_grid_thw``); a pre-hook on encoder layer 0 starts a fresh
   state, kept on that encode (``encode.encoder``) for the prefill's vision-side selection;
2. a forward hook (prepended, so transformers' output-capturing hooks record the cut tensor)
   on every cut layer ℓ asks the chooser which units stay and returns the gathered output. The
   hidden states collected for ``vision_feature_layer`` (LLaVA's ``hidden_states[-2]``) are
   therefore exactly the kept rows, CLS still at row 0 — provided ℓ is at most the adapter's
   ``vision_output_layer``, which is checked;
3. pre-hooks on every later layer rewrite the per-row keyword inputs the encoder loop passes
   unchanged to all layers: ``position_embeddings`` (cos, sin) are gathered to the kept rows;
   any ``cu_seqlens`` (per-frame, or Qwen2.5-VL's per-window ``cu_window_seqlens``) is mapped
   to the kept rows, empty segments removed; ``max_seqlen`` is recomputed;
4. a forward hook on the projector / patch merger restores full length: its output rows are
   scattered back into a zero tensor of the uncut size. ``get_placeholder_mask`` then sees the
   counts it expects, LLaVA-NeXT's packing / unpadding and Qwen2.5-VL's window un-permutation
   run unchanged, and the vision-side cut (:class:`~vlprune.hooks.vision.VisionCut`) must drop
   exactly the tokens whose units were cut: :meth:`EncoderCut.units_per_image` tells the
   method, whose vision-stage selection keeps only surviving units' tokens. The zero rows never
   reach the language model. Qwen3-VL's DeepStack mergers (run mid-encoder on the rows alive
   there) are restored the same way: a unit cut before a DeepStack layer has a zero feature
   there, dropped with its token by the vision-side cut.

Everything is per thread; the state travels with the encode record to its prefill
(``generate`` encodes images once, before the first forward).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from vlprune.adapters.base import Adapter, ImageLayout
from vlprune.hooks.calls import Encode
from vlprune.hooks.encoder_state import (
    EncoderChooser,
    EncoderCutContext,
    EncoderState,
    checked_state,
    remap_seqlens,
)
from vlprune.hooks.state import PatchPart, ThreadLocal, eager_hook


class EncoderCut(PatchPart):
    """Installs the encoder hooks; ``chooser`` answers after each layer in ``layers``.

    ``layers``: 0-based encoder layers whose *output* may be cut, each at most
    ``adapter.vision_output_layer``; ``check`` (optional) sees the images' layouts before
    encoder layer 0 runs and raises for images the chooser cannot prune.
    """

    _armed = ThreadLocal()
    _running = ThreadLocal()

    def __init__(self, adapter: Adapter, layers: Sequence[int], chooser: EncoderChooser,
                 check: Callable[[list[ImageLayout]], None] | None = None) -> None:
        self.output_layer = adapter.vision_output_layer
        bad = [layer for layer in layers if not 0 <= layer <= self.output_layer]
        if bad:
            raise ValueError(
                f"encoder cut layers {bad} outside 0..{self.output_layer} (the last vision layer "
                "whose output reaches the projector)"
            )
        self.adapter = adapter
        self.layers = sorted(set(layers))
        self.n_layers = len(adapter.vision_layers)
        self.chooser = chooser
        self.check = check

    def install(self) -> list[RemovableHandle]:
        """Register the hooks; the caller keeps the handles."""
        if not self.layers:
            return []
        layers = self.adapter.vision_layers
        handles: list[RemovableHandle] = [
            layers[0].register_forward_pre_hook(self._start, with_kwargs=True),
        ]
        for i in self.layers:
            handles.append(layers[i].register_forward_hook(partial(self._after, i), prepend=True))
        for i in range(self.layers[0] + 1, self.n_layers):
            handles.append(
                layers[i].register_forward_pre_hook(partial(self._before, i), with_kwargs=True)
            )
        handles.append(self.adapter.projector.register_forward_hook(self._restore))
        for merger in self.adapter.deepstack_mergers:
            handles.append(merger.register_forward_hook(self._restore_deepstack))
        return handles

    # ------------------------------------------------------------------ reading the state

    def arm(self, encode: Encode) -> None:
        """The next encoder forward in this thread belongs to ``encode`` (a prefill's)."""
        self._armed = encode

    def disarm(self) -> None:
        """The encode is over."""
        self._armed = None
        self._running = None

    @property
    def state(self) -> EncoderState | None:
        """State of the encoder forward running in this thread (None outside one)."""
        return self._running.encoder if self._running is not None else None

    def units_per_image(
        self, encode: Encode | None, layouts: list[ImageLayout]
    ) -> list[list[torch.Tensor]]:
        """Per image, per vision sequence, the raster ids of the units that survived
        ``encode``."""
        state = checked_state(encode, layouts)
        out: list[list[torch.Tensor]] = [[] for _ in layouts]
        for image, units in zip(state.image, state.units()):
            out[image].append(units)
        return out

    def layer_tokens(self, encode: Encode | None) -> list[list[int]]:
        """Per image, rows entering each encoder layer in ``encode`` (summed over the image's
        sequences, CLS rows included); empty without one."""
        state = encode.encoder if encode is not None else None
        if state is None:
            return []
        out = [[0] * self.n_layers for _ in state.layouts]
        for image, rows in zip(state.image, state.layer_rows):
            out[image] = [a + b for a, b in zip(out[image], rows)]
        return out

    # ------------------------------------------------------------------ hooks

    @eager_hook
    def _start(self, module: Any, args: tuple, kwargs: dict) -> None:
        encode, self._armed = self._armed, None
        self._running = encode
        if encode is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            encode.encoder = self._new_state(hidden, encode.layout_inputs)

    def _new_state(self, hidden: torch.Tensor, inputs: dict[str, Any]) -> EncoderState:
        packed = hidden.dim() == 2
        layouts = self.adapter.encoder_layouts(inputs, hidden.shape[0])
        if self.check is not None:
            self.check(layouts)
        if packed:
            image, unit_ids, group = self._packed_units(hidden, layouts, inputs)
            prefix, rows = 0, hidden.shape[0]
        else:
            prefix = 1 if self.adapter.has_cls else 0
            patches = hidden.shape[1] - prefix
            counts = [1 + lay.crop_grid[0] * lay.crop_grid[1] if lay.crop_grid else 1
                      for lay in layouts]
            if sum(counts) != hidden.shape[0]:
                raise RuntimeError(
                    f"the images need {sum(counts)} vision sequences, the encoder runs "
                    f"{hidden.shape[0]}"
                )
            image = [i for i, n in enumerate(counts) for _ in range(n)]
            unit_ids = [torch.arange(patches, device=hidden.device) for _ in image]
            group, rows = 1, hidden.shape[1]
        sizes = [ids.numel() for ids in unit_ids]
        seq_rows = [prefix + n * group for n in sizes]
        return EncoderState(
            layouts=layouts,
            image=image,
            sizes=sizes,
            unit_ids=unit_ids,
            kept=[torch.arange(n, device=hidden.device) for n in sizes],
            packed=packed,
            prefix=prefix,
            group=group,
            rows=rows,
            layer_rows=[[r] * self.n_layers for r in seq_rows],
        )

    def _packed_units(
        self, hidden: torch.Tensor, layouts: list[ImageLayout], inputs: dict[str, Any]
    ) -> tuple[list[int], list[torch.Tensor], int]:
        """Image, raster unit ids and rows per unit of each frame of a packed forward."""
        tokens = self.adapter.vision_unit_tokens(inputs)
        n_units = sum(lay.num_tokens for lay in layouts)
        if tokens is None or n_units == 0 or tokens.numel() != hidden.shape[0] or (
            hidden.shape[0] % n_units
        ):
            raise RuntimeError("the packed vision rows do not match the images' tokens")
        group = hidden.shape[0] // n_units
        per_unit = tokens.to(hidden.device)[::group]
        image, unit_ids, start = [], [], 0
        for i, lay in enumerate(layouts):
            frame = lay.grid[0] * lay.grid[1]
            for _ in range(lay.frames):
                image.append(i)
                unit_ids.append(per_unit[start:start + frame] - start)
                start += frame
        return image, unit_ids, group

    def _context(self, layer: int, hidden: torch.Tensor) -> EncoderCutContext:
        state = self.state
        return EncoderCutContext(
            layer=layer,
            output_layer=self.output_layer,
            hidden=hidden,
            units=state.units(),
            sizes=list(state.sizes),
            image=list(state.image),
            layouts=state.layouts,
            packed=state.packed,
            bounds=state.bounds() if state.packed else None,
            prefix=state.prefix,
            group=state.group,
            memory=state.memory,
        )

    @eager_hook
    def _after(self, layer: int, module: Any, args: tuple, output: Any) -> Any:
        if self.state is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        local = self.chooser(self._context(layer, hidden))
        if local is None:
            return None
        self._check(local)
        hidden = self._gather(hidden, local)
        state = self.state
        state.kept = [k[i.to(k.device)] for k, i in zip(state.kept, local)]
        state.cut = True
        later = self.n_layers - layer - 1
        for rows, k in zip(state.layer_rows, state.kept):
            rows[layer + 1:] = [state.prefix + k.numel() * state.group] * later
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _check(self, local: list[torch.Tensor]) -> None:
        state = self.state
        if len(local) != len(state.kept):
            raise RuntimeError(
                f"encoder chooser answered {len(local)} of {len(state.kept)} sequences"
            )
        for s, (idx, k) in enumerate(zip(local, state.kept)):
            bad = idx.dim() != 1 or (
                idx.numel() and (idx.min() < 0 or idx.max() >= k.numel() or (idx.diff() <= 0).any())
            )
            if bad:
                raise RuntimeError(f"encoder chooser: positions of sequence {s} are not sorted, "
                                   "unique and in range")
        if not state.packed and len({idx.numel() for idx in local}) > 1:
            raise RuntimeError("encoder chooser: batched sequences must keep equal counts")

    def _gather(self, hidden: torch.Tensor, local: list[torch.Tensor]) -> torch.Tensor:
        state = self.state
        device = hidden.device
        if state.packed:
            starts = state.bounds()[:-1]
            step = torch.arange(state.group, device=device)
            rows = torch.cat([
                (start + idx.to(device)[:, None] * state.group + step).flatten()
                for start, idx in zip(starts, local)
            ])
            return hidden[rows]
        idx = torch.stack([i.to(device) for i in local]) + state.prefix
        prefix = torch.arange(state.prefix, device=device).expand(idx.shape[0], -1)
        rows = torch.cat([prefix, idx], 1)
        return hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))

    @eager_hook
    def _before(self, layer: int, module: Any, args: tuple, kwargs: dict) -> tuple | None:
        state = self.state
        if state is None or not state.cut:
            return None
        if not state.packed:
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            if mask is not None:
                raise NotImplementedError("the encoder cut does not support vision masks")
            return None
        kept = state.kept_rows()
        kwargs = dict(kwargs)
        if kwargs.get("cu_seqlens") is not None:
            kwargs["cu_seqlens"] = remap_seqlens(kwargs["cu_seqlens"], kept)
            if kwargs.get("max_seqlen") is not None:
                kwargs["max_seqlen"] = int(kwargs["cu_seqlens"].diff().max())
        embeddings = kwargs.get("position_embeddings")
        if embeddings is not None:
            kwargs["position_embeddings"] = tuple(
                t.index_select(0, kept.to(t.device)) if t.shape[0] == state.rows else t
                for t in embeddings
            )
        return args, kwargs

    @eager_hook
    def _restore(self, module: Any, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """The projector / patch merger ends the image forward: its output back to full size."""
        state = self.state
        self._running = None
        return self._full_size(state, output)

    @eager_hook
    def _restore_deepstack(self, module: Any, args: tuple,
                           output: torch.Tensor) -> torch.Tensor | None:
        """A DeepStack merger (Qwen3-VL) runs mid-encoder: its output back to full size like
        the main merger's, without ending the image forward."""
        return self._full_size(self.state, output)

    @staticmethod
    def _full_size(state: EncoderState | None, output: torch.Tensor) -> torch.Tensor | None:
        """A projector / merger output over the kept units, scattered back to every unit
        (zeros where cut); None when nothing was cut."""
        if state is None or not state.cut:
            return None
        if state.packed:
            units = state.kept_units()
            if output.shape[0] != units.numel():
                raise RuntimeError(
                    f"the patch merger gave {output.shape[0]} tokens but the encoder cut kept "
                    f"{units.numel()} merge groups"
                )
            full = output.new_zeros(sum(state.sizes), *output.shape[1:])
            full[units.to(output.device)] = output
            return full
        idx = torch.stack(state.kept).to(output.device)
        lead = output.shape[1] - idx.shape[1]
        if lead not in (0, state.prefix) or output.shape[0] != idx.shape[0]:
            raise RuntimeError(
                f"the projector got {tuple(output.shape[:2])} rows but the encoder cut kept "
                f"{tuple(idx.shape)} units: the selected feature layer was not cut"
            )
        full = output.new_zeros(output.shape[0], lead + state.sizes[0], output.shape[-1])
        full[:, :lead] = output[:, :lead]
        index = idx[..., None].expand(-1, -1, output.shape[-1])
        full[:, lead:].scatter_(1, index, output[:, lead:])
        return full
