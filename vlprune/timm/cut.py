"""Where a timm ViT loses tokens: between blocks, prefix rows always kept.

Hooks (all removable, per model instance; bound methods or partials of :class:`TimmCut`, run
eagerly under ``torch.compile``):

1. a pre-hook on ``patch_embed`` starts each forward: the image size gives the patch grid, every
   patch is alive, the method's scratch memory and the probes are cleared;
2. a pre-hook on block 0 refuses ``attn_mask`` / ``is_causal`` (a mask over every token cannot
   follow a cut) and checks the row count (prefix + grid);
3. a forward hook on each cut block asks the method which patch rows stay and returns the
   gathered output: prefix rows first, then the kept patch rows in raster order. Later blocks,
   the final norm and the pooling (token / avg / max / map) run on the kept rows only, so
   ``forward_features`` / ``forward_intermediates`` return only kept patch tokens;
4. a :class:`~vlprune.hooks.calls.Shadow` of ``forward_intermediates`` refuses
   ``output_fmt="NCHW"`` where a requested intermediate would hold fewer tokens than the grid
   (``"NLC"`` works).

The state of a forward (:class:`CutState`) is per thread: threads sharing a patched model each
cut their own images and read their own ``kept_indices``.

Two kinds of methods:

- single cut (``random``, ``uniform``, ``hiprune``, ``todre``): after ``cut_block`` the method's
  ``select`` sees one :class:`~vlprune.methods.base.VisionBatch` (one layout per image: the
  patch grid; features: the block's output patch rows) and returns each image's kept patches;
- encoder stage (``flowcut``): after every block of ``method.encoder_layers(cut_block)`` its
  ``encoder_choose`` sees an :class:`~vlprune.methods.base.EncoderBatch` (one sequence per
  image, ``prefix`` = 1 when there is a class token: the rows the probes show) and may cut.

Every image of a batch keeps the same count (its budget of the same grid), chosen on its own.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from vlprune.adapters.base import ImageLayout
from vlprune.budget import Budget
from vlprune.hooks.calls import Shadow
from vlprune.hooks.gather import gather_rows
from vlprune.hooks.state import PatchPart, ThreadLocal, eager_hook
from vlprune.methods.base import EncoderBatch, Method, VisionBatch
from vlprune.timm.adapter import TimmViTAdapter


@dataclass
class CutState:
    """One forward: ``grid`` (rows, cols), ``kept`` (B, n) raster patch ids of the current patch
    rows (ascending), ``block_rows[l]`` rows entering block l (prefix included), ``running``
    until the last cut block has run, ``memory`` the method's scratch space (encoder stage)."""

    grid: tuple[int, int]
    kept: torch.Tensor
    block_rows: list[int]
    running: bool = True
    memory: dict[str, Any] = field(default_factory=dict)

    @property
    def patches(self) -> int:
        """Patch tokens of the uncut grid."""
        return self.grid[0] * self.grid[1]


Select = Callable[[VisionBatch], list[torch.Tensor]]
"""The method's single cut: kept patch positions per image."""

Choose = Callable[[EncoderBatch], "list[torch.Tensor] | None"]
"""The method's encoder stage after one block: kept current patch positions per image, or None."""


class TimmCut(PatchPart):
    """Installs the hooks of the module doc. The method answers through ``select`` or
    ``choose`` (the handle's: the model's hooks keep it alive) with ``probes`` (installed by the
    caller); ``method`` and ``budget`` give the counts. ``state``: the calling thread's last
    forward (None before one)."""

    state = ThreadLocal()

    def __init__(
        self,
        adapter: TimmViTAdapter,
        method: Method,
        budget: Budget,
        probes: dict[str, Any],
        select: Select,
        choose: Choose,
    ) -> None:
        self.adapter = adapter
        self.method = method
        self.budget = budget
        self.probes = probes
        self.select = select
        self.choose = choose
        self.encoder = sorted(set(method.encoder_layers(adapter.vision_output_layer)))
        self.layers = self.encoder or [adapter.cut_block]

    def install(self) -> list[RemovableHandle | Shadow]:
        """Register the hooks; the caller keeps the handles."""
        model = self.adapter.model
        blocks = self.adapter.blocks
        handles: list[RemovableHandle | Shadow] = [
            model.patch_embed.register_forward_pre_hook(self._start),
            blocks[0].register_forward_pre_hook(self._check_inputs, with_kwargs=True),
        ]
        for layer in self.layers:
            hook = partial(self._after, layer)
            handles.append(blocks[layer].register_forward_hook(hook, prepend=True))
        handles.append(Shadow(model, "forward_intermediates", self._intermediates))
        return handles

    # ------------------------------------------------------------------ reading the state

    @property
    def kept_indices(self) -> torch.Tensor | None:
        """(B, k) raster indices of the kept patches in the calling thread's last forward (None
        before one)."""
        return None if self.state is None else self.state.kept

    def _keep_all(self, patches: int) -> bool:
        return self.budget.kept(patches) >= patches

    # ------------------------------------------------------------------ hooks

    @eager_hook
    def _start(self, module: Any, args: tuple) -> None:
        images = args[0]
        grid = self.adapter.grid(images.shape[-2:])
        patches = grid[0] * grid[1]
        kept = torch.arange(patches, device=images.device).expand(images.shape[0], -1)
        rows = [self.adapter.prefix + patches] * self.adapter.depth
        self.state = CutState(grid, kept, rows)
        self._clear_probes()

    @eager_hook
    def _check_inputs(self, module: Any, args: tuple, kwargs: dict) -> None:
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise ValueError(
                "a timm ViT patched by vlprune takes no `attn_mask` / `is_causal`: a mask over "
                "every token cannot follow the rows vlprune cuts"
            )
        state = self.state
        hidden = args[0] if args else kwargs["x"]
        if state is not None and state.running:
            expected = self.adapter.prefix + state.patches
            if hidden.shape[1] != expected:
                raise RuntimeError(
                    f"block 0 got {hidden.shape[1]} rows, the {state.grid[0]}x{state.grid[1]} "
                    f"grid needs {expected} (PatchDropout in training mode? call model.eval())"
                )

    def _intermediates(self, original: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        self._check_intermediates(original, args, kwargs)
        return original(*args, **kwargs)

    @eager_hook
    def _check_intermediates(self, original: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        arguments = inspect.signature(original).bind(*args, **kwargs).arguments
        if arguments.get("output_fmt", "NCHW") != "NCHW":
            return
        from timm.models._features import feature_take_indices

        grid = self.adapter.grid(arguments["x"].shape[-2:])
        if self._keep_all(grid[0] * grid[1]):
            return
        taken, _ = feature_take_indices(self.adapter.depth, arguments.get("indices"))
        if max(taken) >= self.layers[0]:
            raise ValueError(
                "`output_fmt`='NCHW' needs every patch token, but intermediates from block "
                f"{self.layers[0]} on hold only the kept ones: pass output_fmt='NLC' "
                "(get_intermediate_layers: reshape=False) and read handle.kept_indices"
            )

    @eager_hook
    def _after(self, layer: int, module: Any, args: tuple, output: torch.Tensor) -> Any:
        state = self.state
        if state is None or not state.running:
            return None
        if layer == self.layers[-1]:
            state.running = False
        local = self._choose_encoder(layer, output) if self.encoder else self._select(output)
        if layer == self.layers[-1]:
            self._clear_probes()
        if local is not None:
            output = self._cut(layer, output, local)
        if layer == self.layers[-1]:
            self._check_final()
        return output if local is not None else None

    # ------------------------------------------------------------------ the method's answer

    def _layouts(self) -> list[ImageLayout]:
        state = self.state
        layout = ImageLayout(num_tokens=state.patches, grid=state.grid)
        return [layout] * state.kept.shape[0]

    def _select(self, hidden: torch.Tensor) -> list[torch.Tensor] | None:
        """Single cut: the method's kept patches per image (None: keep all)."""
        layouts = self._layouts()
        keep = self.method.budgets(layouts, self.budget)
        if all(k >= layout.num_tokens for k, layout in zip(keep, layouts)):
            return None
        prefix = self.adapter.prefix
        batch, _, width = hidden.shape
        positions = prefix + torch.arange(layouts[0].num_tokens, device=hidden.device)
        kept = self.select(VisionBatch(
            layouts=layouts,
            keep=keep,
            features=list(hidden[:, prefix:]),
            sample=list(range(batch)),
            input_ids=torch.zeros(batch, 0, dtype=torch.long, device=hidden.device),
            text_embeds=hidden.new_zeros(batch, 0, width),
            probes=self.probes,
            positions=[positions] * batch,
            budget=self.budget,
        ))
        self._check(kept, keep)
        return kept

    def _choose_encoder(self, layer: int, hidden: torch.Tensor) -> list[torch.Tensor] | None:
        """Encoder stage: the method's kept current patches per image (None: keep all)."""
        state = self.state
        batch = state.kept.shape[0]
        local = self.choose(EncoderBatch(
            layer=layer,
            output_layer=self.adapter.vision_output_layer,
            hidden=hidden,
            units=list(state.kept),
            sizes=[state.patches] * batch,
            image=list(range(batch)),
            layouts=self._layouts(),
            packed=False,
            bounds=None,
            prefix=int(self.adapter.has_cls),
            group=1,
            probes=self.probes,
            memory=state.memory,
        ))
        if local is not None:
            self._check(local, [len(local[0])] * batch)
        return local

    def _check(self, kept: list[torch.Tensor], keep: list[int]) -> None:
        """Every image keeps ``keep[i]`` sorted, unique, in-range current patch positions."""
        name = self.method.name
        current = self.state.kept.shape[1]
        if len(kept) != len(keep):
            raise RuntimeError(f"method {name!r} answered for {len(kept)} of {len(keep)} images")
        for i, (idx, k) in enumerate(zip(kept, keep)):
            if idx.dim() != 1 or idx.numel() != k:
                raise RuntimeError(f"method {name!r} kept {idx.numel()} patches of image {i}, "
                                   f"expected {k}")
            bad = k and (idx[0] < 0 or idx[-1] >= current or bool((idx.diff() <= 0).any()))
            if bad:
                raise RuntimeError(f"method {name!r}: patches of image {i} are not sorted, "
                                   "unique and in range")

    def _cut(self, layer: int, hidden: torch.Tensor, local: list[torch.Tensor]) -> torch.Tensor:
        """Prefix rows, then the kept patch rows; the state follows."""
        state = self.state
        prefix = self.adapter.prefix
        index = torch.stack(local).to(hidden.device)
        kept_rows = gather_rows(hidden[:, prefix:], index)
        state.kept = state.kept.gather(1, index)
        state.block_rows[layer + 1:] = [prefix + index.shape[1]] * (self.adapter.depth - layer - 1)
        return torch.cat([hidden[:, :prefix], kept_rows], dim=1)

    def _check_final(self) -> None:
        """After the last cut block every image holds exactly its budget."""
        state = self.state
        want = self.method.budgets(self._layouts(), self.budget)[0]
        have = state.kept.shape[1]
        if have != want:
            raise RuntimeError(
                f"method {self.method.name!r} left {have} of {state.patches} patch tokens after "
                f"block {self.layers[-1]}, budget {want}: its schedule does not reach the budget "
                "by this `cut_block`; choose a later one"
            )

    def _clear_probes(self) -> None:
        for probe in self.probes.values():
            probe.clear()
