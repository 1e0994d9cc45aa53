"""Record every method's selections on fixed random inputs, or compare them with a recording.

    python benchmarks/selection_check.py --out before.json          # on the old code
    python benchmarks/selection_check.py --compare before.json      # on the new code

For each model (the tiny random models of every family, plus ``-mini`` presets at larger
images), method, budget and input (batch 1, and a left-padded batch of 3 with different image
sizes), it records what each cut kept: the vision-side rows (``keep``), the rows entering every
decoder layer from the first cut on, the units left after each encoder cut, and a digest of the
prefill's last-position logits (bit-exact). ``--compare`` prints every difference and exits 1 if
there is one: a change that leaves the arithmetic of a method's scores unchanged must give
identical selections. Runs on one CPU thread (BLAS results depend on the thread count).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import vlprune
from vlprune.eval.profiler.presets import PRESETS, build_preset_model, synthetic_inputs
from vlprune.registry import get_method
from vlprune.testing import FAMILIES, tiny_inputs, tiny_model

TINY_BUDGETS = (3, 9)
TINY_IMAGES = {"llava_next": [(84, 168), (168, 168), (84, 84)],
               "qwen2_vl": [(112, 84), (84, 112), (140, 140)],
               "qwen2_5_vl": [(112, 84), (224, 224), (140, 140)]}
MINI = (("llava-1.5-7b-mini", (336, 336), 64), ("llava-next-7b-mini", (336, 672), 160),
        ("qwen2-vl-7b-mini", (448, 448), 64), ("qwen2.5-vl-7b-mini", (448, 448), 64))


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def _record(handle: Any, logits: torch.Tensor) -> dict[str, Any]:
    """What each cut of the last prefill kept (hook internals: this is a check script)."""
    out: dict[str, Any] = {"logits": _digest(logits[:, -1])}
    vision = handle._vision.last
    if vision is not None:
        out["keep"] = [row.nonzero()[:, 0].tolist() for row in vision.keep]
        encoder = vision.encode.encoder if vision.encode is not None else None
        if encoder is not None:
            out["encoder"] = [units.tolist() for units in encoder.units()]
    decoder = handle._decoder.last if handle._decoder is not None else None
    if decoder is not None:
        out["decoder"] = {str(i): index.tolist() for i, index in decoder.layer_index.items()}
        out["slots"] = {str(i): slots.tolist() for i, slots in decoder.layer_slots.items()
                        if slots is not None}
    return out


def _cases() -> list[tuple[str, Any, dict[str, Any], list[int]]]:
    """(model name, model, inputs, budgets) to run every method on."""
    cases = []
    for family in FAMILIES:
        model = tiny_model(family)
        sizes = TINY_IMAGES.get(family)
        cases.append((family, model, tiny_inputs(family, seed=1), list(TINY_BUDGETS)))
        cases.append((f"{family}-b3", model,
                      tiny_inputs(family, batch=3, image_sizes=sizes, seed=2), list(TINY_BUDGETS)))
    for name, size, budget in MINI:
        preset = PRESETS[name]
        model = build_preset_model(preset)
        inputs = synthetic_inputs(model.config, preset.family, image_size=size, text_tokens=24)
        cases.append((name, model, inputs, [budget]))
    return cases


@torch.no_grad()
def record_all() -> dict[str, Any]:
    """Selections of every method x budget on every case."""
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    cases = _cases()
    jobs = [(c, m, b) for c in cases for m in vlprune.list_methods() for b in c[3]]
    for (name, model, inputs, _), method, budget in tqdm(jobs, desc="selections", file=sys.stderr):
        families = get_method(method).families
        family = vlprune.adapters.get_adapter(model).family
        if families is not None and family not in families:
            continue
        try:
            handle = vlprune.patch(model, method, budget=budget)
        except (TypeError, ValueError) as error:  # refused on this model: record the refusal
            results[f"{name}/{method}/{budget}"] = {"refused": str(error)}
            continue
        with handle:
            logits = model(**inputs).logits
            results[f"{name}/{method}/{budget}"] = _record(handle, logits)
    return results


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two recordings."""
    problems = [f"{key}: missing" for key in old if key not in new]
    for key in old.keys() & new.keys():
        for part in old[key].keys() | new[key].keys():
            if old[key].get(part) != new[key].get(part):
                problems.append(f"{key}: {part} differs")
    return sorted(problems)


def main() -> None:
    """Record, write and / or compare (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the recording here")
    parser.add_argument("--compare", type=Path, help="compare with this recording")
    args = parser.parse_args()
    results = record_all()
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.compare:
        problems = compare(json.loads(args.compare.read_text()), results)
        for line in problems:
            print(line)
        print(f"{len(results)} runs compared, {len(problems)} differences")
        sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
