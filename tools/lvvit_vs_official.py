#!/usr/bin/env python
"""tl_fast's LV-ViT (a timm model) against the official TokenLabeling code, on shared weights.

The official model is built with its own random init (BatchNorm statistics made non-trivial by one
training-mode pass), its state dict is loaded into ``timm.create_model(name)`` unchanged (strict),
and both models' eval-mode logits and features are compared on the same random batch. The last row
loads the official state dict from a file through timm's own ``pretrained=True`` path.

The official code is not a dependency: pass a checkout of https://github.com/zihangJiang/TokenLabeling.
It is imported from a temporary copy with its ``@register_model`` lines removed (its names, e.g.
``lvvit_s``, would otherwise replace tl_fast's in timm's registry); it runs on timm 1.x as is.

    python -m tools.lvvit_vs_official --official /path/to/TokenLabeling        # T, S, M at 224; L at 448
    python -m tools.lvvit_vs_official --official ... --models lvvit_s --batch-size 4
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import timm
import torch

import tl_fast.models  # noqa: F401  (registers LV-ViT with timm)
from tl_fast.models import load_checkpoint

# tl_fast name -> (official builder, resolution)
_PAIRS = {"lvvit_t": ("lvvit_t", 224), "lvvit_s": ("lvvit_s", 224), "lvvit_m": ("lvvit_m", 224),
          "lvvit_l_448": ("lvvit_l", 448)}


def import_official(checkout: Path):
    """The official ``tlt.models.lvvit`` module, imported without touching timm's registry."""
    src = checkout / "tlt" / "models"
    if not (src / "lvvit.py").is_file():
        sys.exit(f"{src / 'lvvit.py'} not found: pass a TokenLabeling checkout with --official")
    pkg = Path(tempfile.mkdtemp(prefix="tlt_official_")) / "tlt_official"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    shutil.copy(src / "layers.py", pkg / "layers.py")
    text = (src / "lvvit.py").read_text()
    (pkg / "lvvit.py").write_text("\n".join(l for l in text.splitlines() if l.strip() != "@register_model"))
    sys.path.insert(0, str(pkg.parent))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # timm's deprecation notices for timm.models.layers / registry
        return importlib.import_module("tlt_official.lvvit")


@torch.no_grad()
def compare(official, name: str, batch_size: int, seed: int, tmp: Path) -> dict:
    off_name, img = _PAIRS[name]
    torch.manual_seed(seed)
    ref = getattr(official, off_name)(img_size=img).train()
    ref.forward_features(torch.randn(2, 3, img, img))  # BatchNorm running statistics
    ref.eval()
    ours = load_checkpoint(timm.create_model(name), ref.state_dict()).eval()
    x = torch.randn(batch_size, 3, img, img)
    a, fa = ref(x), ref.forward_features(x)
    row = {"model": name, "img_size": img, "logits_max_abs_diff": (ours(x) - a).abs().max().item(),
           "features_max_abs_diff": (ours.forward_features(x) - fa).abs().max().item(),
           "logits_max_abs": a.abs().max().item()}
    if name == "lvvit_s":  # the timm way: a local official file through pretrained=True
        path = tmp / f"{name}_official.pth"
        torch.save(ref.state_dict(), path)
        via = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
        row["pretrained_file_logits_max_abs_diff"] = (via(x) - a).abs().max().item()
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--official", type=Path, required=True, help="a checkout of zihangJiang/TokenLabeling")
    p.add_argument("--models", nargs="+", default=list(_PAIRS), choices=list(_PAIRS))
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    official = import_official(args.official)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            row = compare(official, name, args.batch_size, args.seed, Path(tmp))
            rows.append(row)
            extra = (f", via pretrained=True file {row['pretrained_file_logits_max_abs_diff']:.2e}"
                     if "pretrained_file_logits_max_abs_diff" in row else "")
            print(f"{name} @ {row['img_size']} px: logits max|diff| {row['logits_max_abs_diff']:.2e} "
                  f"(max|logit| {row['logits_max_abs']:.2f}), features {row['features_max_abs_diff']:.2e}{extra}",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
