"""``python -m zoo list``: the model table."""
from __future__ import annotations

import argparse
import sys

import torch

from zoo.flops import count_flops
from zoo.nn.act import ACTS
from zoo.nn.attention import ATTNS
from zoo.registry import ALIASES, count_params, create_model, get_model_spec, list_models


def model_table(names: list[str], act: str = "relu", attn: str | None = None) -> list[dict]:
    """One row per model, built with ``act`` and ``attn`` (None: each model's own attention)."""
    rows = []
    for name in names:
        spec = get_model_spec(name)
        with torch.device("meta"):  # shapes only: no weights initialised, no forward pass computed
            model = create_model(name, act=act, attn=attn)
        rows.append(dict(
            name=name,
            params=count_params(model),
            gflops=count_flops(model, spec.input_size) / 1e9,
            input=f"{spec.input_size[0]}x{spec.input_size[1]}x{spec.input_size[2]}",
            twin=spec.dense_twin or "",
            attn=(attn if attn not in (None, "none") else spec.attn) or "",
            aliases=", ".join(a for a, t in ALIASES.items() if t == name),
        ))
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'model':<18} {'params':>12} {'GFLOPs':>8} {'input':>10}  {'attn':<5} {'dense twin':<16} aliases"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:<18} {r['params']:>12,} {r['gflops']:>8.3f} {r['input']:>10}  "
              f"{r['attn']:<5} {r['twin']:<16} {r['aliases']}")
    print("\nGFLOPs: forward pass at batch 1 and the default input size; a multiply-add counts as 2 FLOPs; "
          "1000 classes.")
    print(f"Every model takes --act ({', '.join(ACTS)}; relu is the default) and --attn (none, "
          f"{', '.join(ATTNS)}; the seresnext models fix se): `python -m zoo list --act gelu --attn eca` "
          "counts them so.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo", description="The zoo's models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="print the model table")
    p_list.add_argument("names", nargs="*", help="only these models (default: all)")
    p_list.add_argument("--act", default="relu", help=f"build them with this activation, one of: {', '.join(ACTS)}")
    p_list.add_argument("--attn", help=f"and this attention, one of: none, {', '.join(ATTNS)} (default: each "
                        "model's own)")
    args = parser.parse_args(argv)
    if args.command == "list":
        try:
            names = [get_model_spec(n).name for n in args.names] or list_models()
            if args.attn not in (None, "none"):  # the seresnext models fix se: list only what can be built
                names = [n for n in names if get_model_spec(n).attn in (None, args.attn)]
            rows = model_table(names, args.act, args.attn)
        except ValueError as e:
            parser.exit(2, f"error: {e}\n")
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
