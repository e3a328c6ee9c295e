"""``rwkvunet info``: parameters and FLOPs of a model, beside the paper's figures."""

from __future__ import annotations

import json

from flax import nnx

from rwkvunet_jax.commands.parsing import CommandError, command_parser
from rwkvunet_jax.models.registry import create_model, list_models
from rwkvunet_jax.models.summary import OFFICIAL_USED_PARAMS, model_macs, paper_figures, param_count


def build_parser():
    parser = command_parser(
        "rwkvunet info",
        "Parameters (trainable, used by the forward pass) and FLOPs (multiply-accumulates of convs, "
        "linears, norms and resizes, one image, as the paper counts them) of a model.",
    )
    parser.add_argument("--model", required=True, choices=list_models())
    parser.add_argument("--num-classes", type=int, default=None,
                        help="output classes (default: 1000 for encoders, 9 for segmentation models)")
    parser.add_argument("--in-chans", type=int, default=None,
                        help="input channels (default: 3 for encoders and rwkv_unet_t, 1 for rwkv_unet_s/b)")
    parser.add_argument("--img-size", type=int, nargs="+", default=[224], metavar=("H", "W"),
                        help="input height [and width], multiples of 16 (default 224)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if len(args.img_size) > 2:
        raise CommandError("--img-size takes H or H W")
    height = args.img_size[0]
    width = args.img_size[-1]
    if height <= 0 or width <= 0 or height % 16 or width % 16:
        raise CommandError(f"--img-size must be positive multiples of 16, got {' '.join(map(str, args.img_size))}")
    for flag, value in (("--num-classes", args.num_classes), ("--in-chans", args.in_chans)):
        if value is not None and value < 1:
            raise CommandError(f"{flag} must be positive, got {value}")
    is_encoder = args.model.startswith("rwkv_unet_encoder")
    num_classes = args.num_classes or (1000 if is_encoder else 9)
    in_chans = args.in_chans or (3 if is_encoder or args.model == "rwkv_unet_t" else 1)
    # Shapes are all that counting needs: an abstract model draws no weights (seconds instead of minutes).
    model = nnx.eval_shape(lambda: create_model(args.model, num_classes=num_classes, in_chans=in_chans))
    params = param_count(model)
    macs = model_macs(model, height, width)
    total = sum(macs.values())
    paper = paper_figures(args.model, height, width, num_classes)
    result = {
        "model": args.model, "num_classes": num_classes, "in_chans": in_chans, "img_size": [height, width],
        "params": params, "flops": total, "flops_by_kind": macs,
        "paper": None if paper is None else {"params_m": paper[0], "gflops": paper[1]},
        "official_used_params": OFFICIAL_USED_PARAMS.get((args.model, num_classes, in_chans)),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    official = result["official_used_params"]
    rows = [("parameters (M)", f"{params / 1e6:.3f}", f"{paper[0]:.1f}" if paper else "-",
             f"{official / 1e6:.3f}" if official else "-"),
            ("FLOPs (G MACs)", f"{total / 1e9:.3f}", f"{paper[1]:.2f}" if paper else "-", "")]
    rows += [(f"  {kind}", f"{value / 1e9:.3f}", "", "") for kind, value in sorted(macs.items())]
    print(f"{args.model}  num_classes={num_classes}  in_chans={in_chans}  input {height}x{width}")
    print(f"{'':<16} {'ours':>10} {'paper':>8} {'official':>10}")
    for name, ours, theirs, measured in rows:
        print(f"{name:<16} {ours:>10} {theirs:>8} {measured:>10}")
    if paper is None:
        print("(the paper reports no figures for this configuration)")
    print("params: trainable parameters the forward pass uses ('official': the same count measured on the "
          "official PyTorch model); FLOPs: thop's convention plus the CCM resizes, WKV recurrence not counted")
    return 0
