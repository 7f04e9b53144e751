"""Subcommands about model files and the method catalogue: inspect, methods, synth."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mergekit_sd.cli.common import add_common, command


def add_parsers(sub) -> None:
    i = sub.add_parser("inspect", help="what is inside a model file")
    i.add_argument("file", type=Path)
    i.add_argument("--json", action="store_true")
    i.add_argument("--tree", action="store_true", help="show the lineage tree")
    i.add_argument("--no-scan", action="store_true", help="read headers only (skip the NaN/Inf scan of tensor values)")
    i.add_argument("--against", nargs="+", default=None, metavar="DIR", help="also rank the models in these folders by distance (sdbuild similar)")
    i.add_argument("--device", default="cpu", help="with --against: where the distance math runs")
    add_common(i)

    m = sub.add_parser("methods", help="list merge methods and ops with their parameters")
    m.add_argument("--json", action="store_true")
    add_common(m)

    s = sub.add_parser("synth", help="write synthetic models with real tensor names (tests, demos, benchmarks)")
    s.add_argument("out", type=Path, help="output file (or folder with --demo)")
    s.add_argument("--arch", default="sd1", choices=["sd1", "sdxl", "flux", "sd3", "sd35l", "sd35m"])
    s.add_argument("--factor", type=int, default=32, help="shrink every large dimension by this (1 = full size)")
    s.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32", "fp8_e4m3", "fp8_e5m2"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--ema", action="store_true", help="add EMA copies of the UNet")
    s.add_argument("--junk", action="store_true", help="add an embedding_manager copy of CLIP")
    s.add_argument("--markers", action="store_true", help="add SDXL prediction-type marker tensors")
    s.add_argument("--inpainting", action="store_true", help="9-channel input conv")
    s.add_argument("--lora", metavar="FORMAT", help="write a LoRA of this format instead of a checkpoint")
    s.add_argument("--rank", type=int, default=4, help="LoRA rank")
    s.add_argument("--naming", choices=("sgm", "diffusers", "comfyui", "bfl", "kohya", "xlabs"), default=None,
                   help="LoRA module naming (default: kohya's; Flux/SD3 LoRAs: kohya, diffusers or xlabs); "
                        "Flux/SD3 checkpoints: comfyui (default), bfl or diffusers")
    s.add_argument("--diffusion-only", action="store_true", help="Flux/SD3 in ComfyUI naming: no text encoders or VAE")
    s.add_argument("--variant", choices=("dev", "schnell"), default=None, help="Flux: dev (default) or schnell (no guidance embedder)")
    s.add_argument("--demo", action="store_true", help="write the demo's input models into the folder OUT")
    s.add_argument("--like", type=Path, default=None, metavar="BASE", help="write a fine-tune of BASE: its tensors plus seeded noise")
    s.add_argument("--noise", type=float, default=0.01, metavar="SIGMA", help="with --like: noise as a fraction of each tensor's RMS (default 0.01)")
    s.add_argument("--trained-on", type=Path, default=None, metavar="FILE", help="with --lora: record FILE as the training base (kohya ss_* hashes)")
    add_common(s)


@command("inspect")
def cmd_inspect(args: argparse.Namespace) -> int:
    if args.tree:
        from mergekit_sd.engine.reproduce import lineage_tree

        sys.stdout.write(lineage_tree(args.file, as_json=args.json))
        return 0
    from mergekit_sd.inspect import format_inspect, inspect_model

    report = inspect_model(args.file, scan=not args.no_scan)
    if args.against:
        from mergekit_sd.engine.progress import Progress
        from mergekit_sd.forensics.similar import similar

        report["similar"] = similar(args.file, list(args.against), device=args.device, progress=Progress(args.quiet))
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True, default=str))
    else:
        print(format_inspect(report))
        if args.against:
            from mergekit_sd.cli.forensics import print_similar

            print()
            print_similar(report["similar"], False)
    return 0


@command("methods")
def cmd_methods(args: argparse.Namespace) -> int:
    from mergekit_sd.methods.catalog import describe_methods, format_methods_table

    if args.json:
        print(json.dumps(describe_methods(), indent=2))
    else:
        print(format_methods_table())
    return 0


@command("synth")
def cmd_synth(args: argparse.Namespace) -> int:
    from mergekit_sd.synth.demo import make_demo_models
    from mergekit_sd.synth.loras import write_synth_lora
    from mergekit_sd.synth.models import write_synth

    if args.demo:
        for p in make_demo_models(args.out):
            if not args.quiet:
                print(p)
        return 0
    if args.lora:
        path = write_synth_lora(args.out, arch=args.arch, format=args.lora, factor=args.factor, rank=args.rank, seed=args.seed,
                                naming=args.naming, trained_on=args.trained_on)
    elif args.like is not None:
        from mergekit_sd.synth.models import write_like

        path = write_like(args.out, args.like, args.noise, args.seed)
    else:
        from mergekit_sd.synth.models import TRANSFORMER_ARCHES

        if args.arch in TRANSFORMER_ARCHES:
            path = write_synth(args.out, args.arch, args.factor, args.dtype, args.seed, naming=args.naming or "comfyui",
                               diffusion_only=args.diffusion_only, variant=args.variant)
        else:
            path = write_synth(args.out, args.arch, args.factor, args.dtype, args.seed, ema=args.ema, junk=args.junk,
                               markers=args.markers, inpainting=args.inpainting)
    if not args.quiet:
        print(path)
    return 0
