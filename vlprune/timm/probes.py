"""Attention probes for timm ViT blocks: recompute only what a method asks for, from ``qkv``.

timm's ``Attention`` projects queries, keys and values with one fused ``qkv`` linear (rows
``[q | k | v]``, each ``num_heads · head_dim`` wide) and runs its own fused kernel, which never
exposes weights. The probe keeps a reference to the block's input and, on request, computes the
attention input from it and projects only the slices it needs (:class:`FusedQKV`): the query
rows asked for and every key, after timm's ``q_norm`` / ``k_norm``. The model keeps its fused
attention.

The sequence a method sees is ``[CLS] + patches`` (no class token: the patches alone), so it
indexes patch keys exactly as on a CLIP tower (CLS at row 0). Register and distillation tokens
are *context* rows (see ``vlprune.hooks.signals.vision_probes``): their keys and values come
after the sequence's, they take part in every softmax as in the model's own attention, and no
probability over them is reported (a row's probabilities over the rows shown then sum to less
than 1). Queries are the sequence's rows only: "attention received" sums what ``[CLS]`` and the
patches give each row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlprune.hooks.signals import ClipAttentionProbe, Probe
from vlprune.hooks.state import ThreadLocal, eager_hook


class FusedQKV:
    """q / k / v projections of a timm ``Attention`` read off its fused ``qkv`` linear.

    ``q_proj`` / ``k_proj`` / ``v_proj`` map (..., D) to (..., num_heads · head_dim), q and k
    after the module's per-head ``q_norm`` / ``k_norm``; ``head_dim``, ``num_heads`` and
    ``scale`` are the module's. The same interface as a CLIP attention module.
    """

    def __init__(self, attention: nn.Module) -> None:
        self.module = attention
        self.num_heads = int(attention.num_heads)
        self.head_dim = int(attention.head_dim)
        self.scale = float(attention.scale)

    def _project(self, x: torch.Tensor, part: int, norm: nn.Module | None) -> torch.Tensor:
        width = self.num_heads * self.head_dim
        rows = slice(part * width, (part + 1) * width)
        qkv = self.module.qkv
        bias = None if qkv.bias is None else qkv.bias[rows]
        out = F.linear(x, qkv.weight[rows], bias)
        if norm is None:
            return out
        return norm(out.unflatten(-1, (self.num_heads, self.head_dim))).flatten(-2)

    def q_proj(self, x: torch.Tensor) -> torch.Tensor:
        """Queries of rows ``x``."""
        return self._project(x, 0, self.module.q_norm)

    def k_proj(self, x: torch.Tensor) -> torch.Tensor:
        """Keys of rows ``x``."""
        return self._project(x, 1, self.module.k_norm)

    def v_proj(self, x: torch.Tensor) -> torch.Tensor:
        """Values of rows ``x``."""
        return self._project(x, 2, None)


class TimmAttentionProbe(ClipAttentionProbe):
    """Attention rows of one timm block (module doc); one sequence per image.

    A pre-hook on the *block* remembers its input (per thread, no copy): hooks on modules inside
    a block are skipped when a model compiled after patching runs under ``torch.no_grad``
    (torch 2.13 / 2.14 drop an eager-only hook nested in the second and later modules of a
    loop), hooks on the blocks themselves run. The attention input is computed on request: the
    block's ``norm1`` of it (``pre_norm``, timm's ``Block``) or the input itself
    (``ResPostBlock``). ``context``: register and distillation rows (``prefix`` less the class
    row). :meth:`rows` projects queries for the requested rows only.
    """

    def __init__(self, block: nn.Module, *, pre_norm: bool, has_cls: bool, prefix: int) -> None:
        super().__init__(FusedQKV(block.attn))
        self.block = block
        self.pre_norm = pre_norm
        self.has_cls = has_cls
        self.prefix = prefix
        self.context = prefix - int(has_cls)

    def install(self) -> RemovableHandle:
        """Register the pre-hook on the block."""
        return self.block.register_forward_pre_hook(self._remember, with_kwargs=True)

    @eager_hook
    def _remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.inputs = {"block_input": args[0] if args else kwargs["x"]}

    def checked_inputs(self) -> dict[str, torch.Tensor]:
        """The block's input and (computed on the first request) ``"hidden"``, the attention
        input reordered: the n rows methods see (class row if any, then the patches), then the c
        context rows; ``RuntimeError`` if the block has not run."""
        inputs = super().checked_inputs()
        if "hidden" not in inputs:
            x = inputs["block_input"]
            with torch.no_grad():
                x = self.block.norm1(x) if self.pre_norm else x
            if self.context:
                cls = int(self.has_cls)
                x = torch.cat([x[:, :cls], x[:, self.prefix:], x[:, cls:self.prefix]], dim=1)
            inputs["hidden"] = x
        return inputs

    def _heads(self, tensor: torch.Tensor) -> torch.Tensor:
        """(B, L, H·d) → (B, H, L, d)."""
        return tensor.unflatten(-1, (self.attention.num_heads, -1)).transpose(1, 2)

    def _queries_keys(
        self, queries: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, Q, d) of rows ``queries`` (None: all n), k (B, H, n + c, d), and the rows."""
        attn = self.attention
        rows = self.checked_inputs()["hidden"]
        picked = rows[:, :rows.shape[1] - self.context]
        if queries is not None:
            picked = picked[:, queries.to(rows.device)]
        return self._heads(attn.q_proj(picked)), self._heads(attn.k_proj(rows)), rows

    def qkv(
        self, bounds: list[int] | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per image: q (H, n, d) of the rows methods see, k and v (H, n + c, d), context rows
        last."""
        if bounds is not None:
            raise ValueError("batched vision rows are their own sequences; pass no bounds")
        q, k, rows = self._queries_keys()
        return list(zip(q, k, self._heads(self.attention.v_proj(rows))))

    def query_key(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image: q (H, n, d) and k (H, n + c, d) (no value projection)."""
        q, k, _ = self._queries_keys()
        return list(zip(q, k))

    @torch.no_grad()
    def rows(self, queries: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Per image, float32 probabilities (H, Q, n) of query rows ``queries`` (local indices
        into the rows methods see, e.g. ``[0]`` for the class token), or of every row when None;
        queries are projected for the requested rows only, context keys are in the softmax."""
        if queries is None:
            return super().rows()
        q, k, rows = self._queries_keys(queries)
        probs = ((q @ k.transpose(2, 3)) * self.attention.scale).float().softmax(-1)
        return list(probs[..., :rows.shape[1] - self.context])


class PatchGridProbe(Probe):
    """Patch → token map of a ViT, for methods written for merged tokens (Qwen's 2×2 groups):
    every patch is its own token, in raster order, image after image.

    A pre-hook on the first block remembers the batch size and patch count of the forward (per
    thread).
    """

    vision = True
    shape = ThreadLocal()

    def __init__(self, block: nn.Module, *, prefix: int) -> None:
        self.block = block
        self.prefix = prefix

    def install(self) -> RemovableHandle:
        """Register the pre-hook."""
        return self.block.register_forward_pre_hook(self._remember, with_kwargs=True)

    @eager_hook
    def _remember(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["x"]
        self.shape = (hidden.shape[0], hidden.shape[1] - self.prefix)

    def clear(self) -> None:
        """Forget the last forward."""
        self.shape = None

    def token_of_patch(self) -> torch.Tensor:
        """(B · P,) LongTensor ``arange``: patch p of image b is token ``b · P + p``."""
        if self.shape is None:
            raise RuntimeError("the vision encoder has not run yet in this forward")
        batch, patches = self.shape
        return torch.arange(batch * patches)
