"""Subcommands that read a model's history from its weights: fit, similar, family, lora-fit.

Argument parsing and printing only; each command calls one function of `mergekit_sd.forensics`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mergekit_sd.cli.common import add_common, cache_dir, command
from mergekit_sd.engine.progress import Progress


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="where the math runs: cpu (default) or cuda")
    p.add_argument("--json", action="store_true", help="print a JSON report on stdout")


def add_parsers(sub) -> None:
    f = sub.add_parser("fit", help="recover the merge (weights of candidate parents) that best explains a model")
    f.add_argument("model", type=Path)
    f.add_argument("--candidates", nargs="+", required=True, metavar="FILE", help="candidate parents, in order (at least two)")
    f.add_argument("--blocks", action="store_true", help="fit every block of the architecture's block map separately")
    f.add_argument("-o", "--output", type=Path, default=None, help="write a recipe that rebuilds the fitted model")
    _device(f)
    add_common(f)

    s = sub.add_parser("similar", help="rank models by relative distance to a model, globally and per block")
    s.add_argument("model", type=Path)
    s.add_argument("--among", nargs="+", required=True, metavar="DIR_OR_FILE", help="candidate files or folders of them")
    s.add_argument("--blocks", action="store_true", help="show (and report) the distance of every block")
    s.add_argument("--plot", type=Path, default=None, metavar="OUT.png", help="heatmap of blocks x candidates")
    _device(s)
    add_common(s)

    fa = sub.add_parser("family", help="cluster model files into families from all pairwise distances (one pass)")
    fa.add_argument("files", nargs="+", metavar="FILE_OR_DIR")
    fa.add_argument("--cut", type=float, default=None, help="families are clusters closer than this relative distance (default 0.5)")
    fa.add_argument("--plot", type=Path, default=None, metavar="TREE.png", help="draw the dendrogram")
    fa.add_argument("--mermaid", action="store_true", help="print the tree as a Mermaid diagram")
    _device(fa)
    add_common(fa)

    lf = sub.add_parser("lora-fit", help="which checkpoints a LoRA fits: drift from its training base on the layers it touches")
    lf.add_argument("lora", type=Path)
    lf.add_argument("--candidates", nargs="+", required=True, metavar="FILE", help="checkpoints to score")
    lf.add_argument("--trained-on", type=Path, default=None, metavar="FILE", help="the checkpoint the LoRA was trained on")
    lf.add_argument("--models", type=Path, action="append", default=[], help="folder to find the training base in by its recorded hash (repeatable)")
    lf.add_argument("--cache-dir", type=Path, default=None, help="cache whose memo database holds file hashes")
    _device(lf)
    add_common(lf)


def _progress(args: argparse.Namespace) -> Progress:
    return Progress(args.quiet)


@command("fit")
def cmd_fit(args: argparse.Namespace) -> int:
    from mergekit_sd.forensics.fit import fit_model

    out = args.output
    rep = fit_model(args.model, list(args.candidates), blocks=args.blocks, device=args.device, progress=_progress(args),
                    recipe_dir=out.parent if out is not None else None)
    if out is not None:
        from mergekit_sd.forensics.fitrecipe import write_recipe

        write_recipe(out, rep.recipe)
        if not args.quiet:
            print(f"wrote {out}", file=sys.stderr)
    if args.json:
        print(json.dumps(rep.as_json(), indent=2))
        return 0
    print(f"{rep.model}: {rep.verdict}")
    width = max(len(n) for n in rep.candidates)
    print(f"  {'candidate':<{width}}  {'weight':>9}  {'identical':>9}")
    for n in rep.candidates:
        print(f"  {n:<{width}}  {rep.global_fit['weights'][n] + 0.0:>9.4f}  {100 * rep.identical[n]:>8.1f}%")
    print(f"  residual {100 * rep.global_fit['residual']:.3f}% (fp rounding floor {100 * rep.rounding_floor:.3f}%), {rep.tensors} tensors")
    print(f"  recipe: {rep.op}, residual {100 * rep.residual:.3f}%" + (f" (written to {out})" if out is not None else " (-o FILE writes it)"))
    if rep.blocks:
        heads = [Path(n).stem[:9] for n in rep.candidates]
        print(f"  {'block':<6}  " + "  ".join(f"{h:>9}" for h in heads) + "   residual")
        for b, e in rep.blocks.items():
            print(f"  {b:<6}  " + "  ".join(f"{e['weights'][n] + 0.0:>9.4f}" for n in rep.candidates) + f"   {100 * e['residual']:.3f}%")
    for note in rep.notes:
        print(f"  note: {note}")
    return 0


def print_similar(rep: dict, blocks: bool) -> None:
    """The ranking as a table (and per block with --blocks)."""
    print(f"{rep['model']}: {len(rep['ranking'])} candidates, {rep['tensors']} tensors compared")
    width = max(len(e["file"]) for e in rep["ranking"])
    for e in rep["ranking"]:
        print(f"  {e['file']:<{width}}  {100 * e['distance']:>8.3f}%")
    if blocks:
        heads = [Path(e["file"]).stem[:9] for e in rep["ranking"]]
        print(f"  {'block':<6}  " + "  ".join(f"{h:>9}" for h in heads))
        for b in rep["blocks"]:
            print(f"  {b:<6}  " + "  ".join(f"{100 * e['blocks'][b]:>8.3f}%" for e in rep["ranking"]))
    for s in rep["skipped"]:
        print(f"  skipped {s['file']}: {s['why']}")


@command("similar")
def cmd_similar(args: argparse.Namespace) -> int:
    from mergekit_sd.forensics.similar import similar

    rep = similar(args.model, list(args.among), blocks=args.blocks or args.plot is not None, device=args.device,
                  progress=_progress(args))
    if args.plot is not None:
        from mergekit_sd.forensics.plot import similar_heatmap

        similar_heatmap(rep, args.plot)
        if not args.quiet:
            print(f"wrote {args.plot}", file=sys.stderr)
        if not args.blocks:
            rep.pop("blocks", None)
            for e in rep["ranking"]:
                e.pop("blocks", None)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print_similar(rep, args.blocks)
    return 0


@command("family")
def cmd_family(args: argparse.Namespace) -> int:
    from mergekit_sd.forensics.family import family, family_mermaid

    rep = family(list(args.files), cut_at=args.cut, device=args.device, progress=_progress(args))
    if args.plot is not None:
        from mergekit_sd.forensics.plot import family_dendrogram

        family_dendrogram(rep, args.plot)
        if not args.quiet:
            print(f"wrote {args.plot}", file=sys.stderr)
    if args.mermaid:
        rep["mermaid"] = family_mermaid(rep)
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    if args.mermaid:
        sys.stdout.write(rep["mermaid"])
        return 0
    names = [Path(f).name for f in rep["files"]]
    width = max(len(n) for n in names)
    print(f"{'':<{width}}  " + "  ".join(f"{n[:8]:>8}" for n in names))
    for n, row in zip(names, rep["distance"]):
        print(f"{n:<{width}}  " + "  ".join(f"{'-':>8}" if d is None else f"{d:>8.4f}" for d in row))
    print(f"families (cut at {rep['cut']}):")
    for i, fam in enumerate(rep["families"], start=1):
        print(f"  {i}. " + ", ".join(fam))
    for s in rep["skipped"]:
        print(f"  skipped {s['file']}: {s['why']}")
    return 0


@command("lora-fit")
def cmd_lora_fit(args: argparse.Namespace) -> int:
    from mergekit_sd.forensics.lorafit import lora_fit

    rep = lora_fit(args.lora, list(args.candidates), trained_on=args.trained_on, models=list(args.models),
                   cache_dir=cache_dir(args), device=args.device, progress=_progress(args))
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"{rep['lora']}: trained on {rep['trained_on']} ({rep['found_by']}), {rep['modules']} layers")
    width = max(len(e["file"]) for e in rep["ranking"])
    print(f"  {'candidate':<{width}}  {'drift':>9}  {'drift_in':>9}  verdict")
    for e in rep["ranking"]:
        print(f"  {e['file']:<{width}}  {e['drift']:>9.4f}  {e['drift_in']:>9.4f}  {e['verdict']}")
    if rep["skipped_modules"] and not args.quiet:
        print(f"  note: {len(rep['skipped_modules'])} modules map to nothing in the base and were not scored", file=sys.stderr)
    return 0
