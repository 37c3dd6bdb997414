"""`bksdm export`: the UNet of a saved (BK-SDM) pipeline to ONNX, checked in onnxruntime (see `docs/onnx.md`).

The flags follow `optimum-cli export onnx` (`--model`, `--opset`, `--atol`); the output folder is `--output_dir`, as
for every `bksdm` command that writes a folder (optimum takes it as a positional argument).
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(subparsers) -> None:
    from ._flags import add_command_parser, add_model_argument, add_output_dir_argument, add_overwrite_argument

    parser = add_command_parser(
        subparsers,
        "export",
        help="Export a pipeline's UNet (a BK-SDM student, its LCM form) to ONNX, checked against PyTorch in "
        "onnxruntime.",
        description="Export the UNet of a saved pipeline (from `bksdm compress`, `bksdm distill` or `bksdm lcm`), a "
        "bare UNet folder or a built-in model to ONNX with torch.onnx.export, in the layout and with the input names "
        "of optimum's ONNX export (unet/model.onnx: sample, timestep, encoder_hidden_states, and timestep_cond for an "
        "LCM UNet, text_embeds and time_ids for SDXL; output out_sample). The graph is run in onnxruntime (CPU) "
        "against PyTorch on two input shapes and kept only if they agree within --atol. Needs "
        '`pip install "diffusers-bksdm[onnx]"`.',
    )
    add_model_argument(
        parser, aliases=("--model",),
        help="The model: a pipeline folder (its unet/ and scheduler/ are read), a UNet folder, a hub repo id, or a "
        "built-in model (builtin:tiny-sd, builtin:shapes-sd).",
    )  # fmt: skip
    parser.add_argument("--subfolder", default=None, help="Read a bare UNet from this subfolder (e.g. `unet`).")
    parser.add_argument("--revision", default=None, help="Hub revision of the model; default: the main branch.")
    parser.add_argument("--variant", default=None,
                        help="Variant of the model's weight files, e.g. fp16 (exported in float32 all the same); "
                        "default: the full-precision files.")
    add_output_dir_argument(parser, deprecated=(), help="Folder to write: unet/model.onnx, unet/config.json, "
                            "scheduler/ (of a pipeline) and onnx_export.json.")
    add_overwrite_argument(parser, deprecated=())
    parser.add_argument("--opset", type=int, default=18,
                        help="ONNX opset: 18 and up with the dynamo exporter, 14 to 20 with torchscript.")
    parser.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"],
                        help="torch.onnx.export's exporter: dynamo (torch.export-based, PyTorch's default) or "
                        "torchscript (the older one optimum uses: far faster to export, deprecated by PyTorch).")
    parser.add_argument("--components", default="unet",
                        help="What to export: `unet`, a comma-separated list of unet, text_encoder, vae_decoder, or "
                        "`all` (the whole SD pipeline for onnxruntime: with the text encoder its tokenizer/ too; "
                        "each part is checked against PyTorch like the UNet).")
    parser.add_argument("--atol", type=float, default=1e-4,
                        help="Largest absolute difference between onnxruntime's and PyTorch's output accepted by the "
                        "check after export.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..ecosystem.onnx import export_onnx
    from ._flags import flag_name

    from ..ecosystem.onnx_components import COMPONENTS

    arguments = {"model": flag_name(args, "pretrained_model_name_or_path"),
                 "output_dir": flag_name(args, "output_dir"), "opset": "--opset", "exporter": "--exporter",
                 "atol": "--atol", "overwrite": flag_name(args, "overwrite_output_dir"), "components": "--components"}
    components = COMPONENTS if args.components.strip() == "all" else [
        c.strip() for c in args.components.split(",") if c.strip()]
    result = export_onnx(
        args.pretrained_model_name_or_path, args.output_dir, subfolder=args.subfolder, revision=args.revision,
        variant=args.variant, opset=args.opset, exporter=args.exporter, atol=args.atol,
        overwrite=args.overwrite_output_dir, arguments=arguments, components=components,
    )  # fmt: skip
    inputs = ", ".join(f"{name}{list(shape)}" for name, shape in result.inputs.items())
    print(f"exported the UNet to {result.path} (opset {result.opset}, {result.exporter} exporter, "
          f"{result.export_seconds:.1f} s)")
    print(f"inputs: {inputs}")
    print(f"onnxruntime vs PyTorch: max abs diff {result.max_abs_diff:.2e} <= --atol {result.atol:g} on "
          f"{len(result.checked_shapes)} input shapes")
    for name, part in result.components.items():
        print(f"exported the {name} to {part['path']}: max abs diff {part['max_abs_diff']:.2e} on "
              f"{len(part['checked_shapes'])} input shapes")
    return 0
