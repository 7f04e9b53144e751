"""Moving a recipe's results and inputs between machines: `push` and `pull` of cached objects (like DVC's), and
`fetch` of inputs that a recipe pins by sha256 and names by URL."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergekit_sd.engine.options import Options
from mergekit_sd.engine.planner import Planner
from mergekit_sd.engine.runner import BuildReport, Runner
from mergekit_sd.errors import StepError, UserError
from mergekit_sd.recipe.graph import build_order
from mergekit_sd.recipe.load import load_recipe
from mergekit_sd.remote.fetch import fetch, name_from_url


def _runner(recipe_path: str | os.PathLike, options: Options, what: str) -> tuple[Planner, Runner]:
    if not options.remote:
        raise UserError(f"{what} needs a remote cache: --remote s3://bucket/prefix (or $SDBUILD_REMOTE)")
    planner = Planner(load_recipe(recipe_path), options)
    return planner, Runner(planner)


def push(recipe_path: str | os.PathLike, options: Options, targets: list[str] | None = None) -> dict[str, Any]:
    """Upload the objects of every step the targets need that is built locally and missing remotely."""
    if options.remote_read_only:
        raise UserError("push writes to the remote; drop --remote-read-only")
    planner, runner = _runner(recipe_path, options, "push")
    states = [s for s in planner.plan(targets) if s.name in planner.recipe.steps]
    fresh = [planner.keys[s.name][0] for s in states if s.state == "fresh"]
    uploaded, nbytes, present = runner.push(fresh)
    assert runner.remote is not None
    if runner.remote.failure:
        raise StepError(f"push to {options.remote} failed: {runner.remote.failure}")
    return {"uploaded": uploaded, "bytes": nbytes, "already_there": present,
            "not_built": [s.name for s in states if s.state != "fresh"]}


def pull(recipe_path: str | os.PathLike, options: Options, targets: list[str] | None = None) -> BuildReport:
    """Download what is stale from the remote and write the outputs; never computes."""
    _, runner = _runner(recipe_path, options, "pull")
    return runner.build(targets, compute=False)


@dataclass
class FetchReport:
    fetched: dict[str, str] = field(default_factory=dict)  # input -> file written
    present: dict[str, str] = field(default_factory=dict)  # input -> file already there

    def as_json(self) -> dict[str, Any]:
        return {"fetched": self.fetched, "present": self.present}


def fetch_inputs(recipe_path: str | os.PathLike, options: Options, targets: list[str] | None = None) -> FetchReport:
    """Download every input the targets need that cannot be found, by its `url`, verified against its sha256.

    Files go into the first `--models` folder when one is given, else to the input's declared path when that lies
    inside the recipe's folder; nothing is written anywhere else.
    """
    planner = Planner(load_recipe(recipe_path), options)
    recipe = planner.recipe
    report = FetchReport()
    for name in build_order(recipe, planner.graph, targets):
        if name not in recipe.inputs:
            continue
        decl = recipe.inputs[name]
        found = planner.find_input(name)
        if found is not None:
            report.present[name] = str(found)
            continue
        where = recipe.where("inputs", name)
        url = decl.credits.get("url")
        if not url:
            raise UserError(f"input {name!r} is missing and has no url to fetch it from; add `url:` or pass --models DIR", where)
        if not decl.sha256:
            raise UserError(f"input {name!r} has a url but no sha256 pin, so a download could not be verified; add `sha256:`", where)
        folder, file_name = _destination(planner, name, url)
        on_bytes = _bytes_progress(planner, name)
        report.fetched[name] = str(fetch(url, folder, file_name, decl.sha256, on_bytes))
        planner.progress.line(f"fetched {name}: {report.fetched[name]}")
    return report


def _destination(planner: Planner, name: str, url: str) -> tuple[Path, str]:
    decl = planner.recipe.inputs[name]
    file_name = Path(decl.path).name if decl.path else name_from_url(url)
    if planner.options.models:
        return Path(planner.options.models[0]), file_name
    declared = planner.declared_path(name)
    base = os.path.realpath(planner.recipe.dir)
    if declared is not None and os.path.commonpath([base, os.path.realpath(declared)]) == base:
        return declared.parent, declared.name
    raise UserError(f"input {name!r}: its path {decl.path!r} is outside the recipe's folder; pass --models DIR to download into",
                    planner.recipe.where("inputs", name))


def _bytes_progress(planner: Planner, name: str):
    cb = planner.progress.bytes_callback(f"fetch {name}")
    last = [0]

    def on_bytes(have: int, total: int | None) -> None:
        cb(have - last[0])
        last[0] = have

    return on_bytes
