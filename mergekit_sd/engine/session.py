"""Plans and runs a build: keys for every node, fresh-or-stale with a reason, stale steps streamed into the store,
outputs materialised atomically.

A step's object key = hash(compute key, metadata ingredients). The compute key covers what the tensors depend on
(op, op version, parameters, inputs' content digests), so an upstream step rebuilt to identical tensors leaves its
dependants fresh (early cutoff), and a change that only touches metadata (a card field, a renamed input file)
rewrites the file from the cached tensors instead of recomputing them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_sd.provenance.a1111 import legacy_hash
from mergekit_sd.errors import StepError, UserError, SdbuildError
from mergekit_sd.recipe.graph import build_graph, build_order
from mergekit_sd.engine.keys import canonical, compute_key, digest_file, object_key
from mergekit_sd.lazy import LazyModel
from mergekit_sd.formats.open import open_model
from mergekit_sd.ops import OpContext, get_op
from mergekit_sd.engine.progress import Progress
from mergekit_sd.provenance.record import NodeFacts, build_metadata, read_provenance
from mergekit_sd.recipe.load import Recipe, load_recipe
from mergekit_sd.engine.store import Store, materialise
from mergekit_sd.formats.safetensors import SafetensorsFile, read_header, write_model

MODEL_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass
class Options:
    cache_dir: Path = Path("cache")
    out_dir: Path | None = None
    models: list[Path] = field(default_factory=list)
    device: str = "cpu"
    quiet: bool = False
    progress: Progress | None = None


@dataclass
class NodeState:
    name: str
    op: str  # "input" for inputs
    key: str | None
    state: str  # "fresh" | "stale" | "input"
    reason: str
    digest: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "key": self.key, "state": "fresh" if self.state == "input" else self.state,
                "reason": self.reason}


@dataclass
class BuildReport:
    built: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"built": self.built, "fresh": self.fresh, "outputs": self.outputs}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SDBUILD_CACHE") or "cache")


def annotate(model: LazyModel) -> LazyModel:
    """Attach the detected architecture (what merge and LoRA ops check inputs against)."""
    try:
        from mergekit_sd.arch.detect import detect
    except ImportError:
        return model
    if "arch" not in model.info:
        arch = detect(model.specs)
        model.info["arch"] = arch
        model.info["architecture"] = getattr(arch, "modelspec", None) or getattr(arch, "architecture", None)
    return model


class Session:
    """One recipe against one cache."""

    def __init__(self, recipe: Recipe, options: Options):
        self.recipe = recipe
        self.options = options
        self.store = Store(options.cache_dir)
        self.progress = options.progress or Progress(options.quiet)
        self.graph = build_graph(recipe)
        self.facts: dict[str, NodeFacts] = {}
        self.states: dict[str, NodeState] = {}
        self.keys: dict[str, tuple[str, str]] = {}  # step -> (object key, compute key)
        self._paths: dict[str, Path] = {}
        self.device = _device(options.device)
        if self.device.type == "cpu" and (os.cpu_count() or 1) > 1:
            # the writer thread hashes and writes while this thread computes: leave it a core
            torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))

    # -- inputs ---------------------------------------------------------------------------------------------------

    def input_path(self, name: str) -> Path:
        if name in self._paths:
            return self._paths[name]
        decl = self.recipe.inputs[name]
        where = self.recipe.where("inputs", name)
        candidates: list[Path] = []
        if decl.path:
            p = Path(decl.path).expanduser()
            candidates.append(p if p.is_absolute() else self.recipe.dir / p)
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            found = self._search_models(decl)
        if found is None:
            hint = f" or sha256 {decl.sha256[:12]}…" if decl.sha256 else ""
            raise UserError(f"input {name!r}: file {decl.path or '(no path)'!r} not found{hint}; fix the path or pass --models DIR", where)
        if decl.sha256:
            _, sha = digest_file(found, self.store.db)
            if sha != decl.sha256:
                raise UserError(f"input {name!r}: {found.name} has sha256 {sha}, but the recipe pins {decl.sha256}; "
                                "use the pinned file or update the pin", self.recipe.where("inputs", name, "sha256"))
        self._paths[name] = found
        return found

    def _search_models(self, decl) -> Path | None:
        dirs = list(self.options.models) + [Path(p) for p in os.environ.get("SDBUILD_MODELS", "").split(os.pathsep) if p]
        want_name = Path(decl.path).name if decl.path else None
        files: list[Path] = []
        for d in dirs:
            if d.is_dir():
                files += sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in MODEL_EXTS)
        if want_name:
            for f in files:
                if f.name == want_name and (not decl.sha256 or digest_file(f, self.store.db)[1] == decl.sha256):
                    return f
        if decl.sha256:
            for f in files:
                if digest_file(f, self.store.db)[1] == decl.sha256:
                    return f
        return None

    def input_facts(self, name: str) -> NodeFacts:
        if name not in self.facts:
            decl = self.recipe.inputs[name]
            path = self.input_path(name)
            digest, sha = digest_file(path, self.store.db)
            self.facts[name] = NodeFacts(name=name, kind="input", digest=digest, sha256=sha, file=path.name, credits=dict(decl.credits))
        return self.facts[name]

    # -- planning -------------------------------------------------------------------------------------------------

    def _ingredients(self, node: str, order: list[str]) -> str:
        """Everything the metadata of `node` is made from, without reading any file."""
        parts: dict[str, Any] = {"tool": __import__("mergekit_sd").TOOL, "node": node, "name": self.recipe.name,
                                 "card": dict(self.recipe.card),
                                 "outputs": {n: list(self.recipe.outputs[n]) for n in order if n in self.recipe.outputs}}
        nodes = {}
        for n in order:
            if n in self.recipe.inputs:
                f = self.facts[n]
                nodes[n] = {"input": f.file, "digest": f.digest, "sha256": f.sha256, "credits": dict(f.credits)}
            else:
                st = self.recipe.steps[n]
                nodes[n] = {"op": st.op, "params": st.params, "object": self.keys[n][0] if n != node else None}
        parts["nodes"] = nodes
        return canonical(parts)

    def plan_node(self, name: str) -> NodeState:
        if name in self.recipe.inputs:
            f = self.input_facts(name)
            st = NodeState(name, "input", f.digest, "input", "input file", f.digest)
            self.states[name] = st
            return st
        step = self.recipe.steps[name]
        op = get_op(step.op)
        pending = [r for r in step.refs if self.states.get(r) is None or self.states[r].digest is None]
        if pending:
            st = NodeState(name, step.op, None, "stale", f"input {pending[0]!r} will be rebuilt")
            self.states[name] = st
            return st
        digests = [self.states[r].digest for r in step.refs]
        ck = compute_key(op.name, op.version, dict(step.params), digests)
        sub = build_order(self.recipe, self.graph, [name])
        for n in sub:
            if n in self.recipe.inputs:
                self.input_facts(n)
        key = object_key(ck, self._ingredients(name, sub))
        self.keys[name] = (key, ck)
        digest, why = self.store.status(key)
        if digest is not None:
            st = NodeState(name, step.op, key, "fresh", "up to date", digest)
        else:
            st = NodeState(name, step.op, key, "stale", self._why(name, key, ck, step, digests, why))
        self.states[name] = st
        return st

    def _why(self, name: str, key: str, ck: str, step, digests: list[str], store_why: str) -> str:
        if store_why != "never built":
            return store_why
        rows = self.store.db.execute("SELECT key, compute_key, params, inputs FROM history WHERE recipe=? AND node=?",
                                     (str(self.recipe.path), name))
        if not rows:
            return "never built"
        _, old_ck, old_params, old_inputs = rows[0]
        if old_ck == ck:
            return "metadata changed (tensors reused)"
        if old_params != canonical(step.params):
            return "parameters changed"
        old = dict(zip(step.refs, __import__("json").loads(old_inputs))) if old_inputs else {}
        for r, d in zip(step.refs, digests):
            if old.get(r) != d:
                return f"input {r!r} changed"
        return "op version changed"

    def plan(self, targets: list[str] | None = None) -> list[NodeState]:
        order = build_order(self.recipe, self.graph, targets)
        return [self.plan_node(n) for n in order]

    # -- running --------------------------------------------------------------------------------------------------

    def open_node(self, name: str) -> LazyModel:
        if name in self.recipe.inputs:
            m = open_model(self.input_path(name))
            m.label = self.input_path(name).name
        else:
            key = self.keys[name][0]
            m = SafetensorsFile(self.store.object_path(key)).lazy()
            m.label = f"step {name!r}"
        return annotate(m)

    def build(self, targets: list[str] | None = None) -> BuildReport:
        report = BuildReport()
        self.store.clean_tmp()
        order = build_order(self.recipe, self.graph, targets)
        steps = [n for n in order if n in self.recipe.steps]
        for i, name in enumerate(order):
            st = self.plan_node(name)
            if st.state == "input":
                continue
            if st.state == "fresh":
                report.fresh.append(name)
                self.progress.line(f"[{steps.index(name) + 1}/{len(steps)}] {name}: fresh")
                continue
            key, ck = self.keys[name]
            with self.store.lock(key):
                digest, _ = self.store.status(key)
                if digest is None:
                    self.progress.line(f"[{steps.index(name) + 1}/{len(steps)}] {name}: building ({st.reason})")
                    digest = self._run_step(name, key, ck, report)
                    report.built.append(name)
                else:
                    report.fresh.append(name)
            self.states[name] = NodeState(name, st.op, key, "fresh", "built", digest)
            step = self.recipe.steps[name]
            self.store.db.execute("INSERT OR REPLACE INTO history VALUES (?,?,?,?,?,?)",
                                  (str(self.recipe.path), name, key, ck, canonical(step.params),
                                   canonical([self.states[r].digest for r in step.refs])))
        self._materialise(order, report)
        return report

    def _step_facts(self, name: str) -> NodeFacts:
        """Facts of an already built step, read from its object (used when a descendant records provenance)."""
        if name not in self.facts:
            key = self.keys[name][0]
            path = self.store.object_path(key)
            _, meta = read_header(path)
            digest, sha = digest_file(path, self.store.db)
            step = self.recipe.steps[name]
            op = get_op(step.op)
            prov = read_provenance(meta) or {}
            self.facts[name] = NodeFacts(name=name, kind="step", digest=digest, sha256=sha, file=f"{name}.safetensors",
                                         op=op.name, version=op.version, params=dict(step.params), refs=step.refs,
                                         compute_key=self.keys[name][1], log=list(prov.get("log", {}).get(name, [])),
                                         facts=dict(prov.get("facts", {}).get(name, {})), metadata=meta,
                                         legacy_hash=legacy_hash(path))
        return self.facts[name]

    def _run_step(self, name: str, key: str, ck: str, report: BuildReport) -> str:
        step = self.recipe.steps[name]
        op = get_op(step.op)
        where = self.recipe.where("steps", name)
        reuse = self.store.find_compute(ck)
        inputs = [self.open_node(r) for r in step.refs]
        kinds = op.kinds(dict(step.params))
        for r, m, want in zip(step.refs, inputs, kinds):
            _check_kind(r, m, want, name, where)
        ctx = OpContext(step=name, device=self.device, input_names=list(step.refs), input_labels=[m.label for m in inputs])
        try:
            model = op.build(inputs, dict(step.params), ctx)
        except UserError as e:
            raise UserError(str(e) if e.where else f"{where}: {e}") from None
        log, facts = list(ctx.log), dict(model.info.get("provenance") or {})
        if reuse is not None:
            model = _restamp_source(self.store.object_path(reuse), model)
        for line in log:
            self.progress.warn(f"{name}: {line}")
            report.warnings.append(f"{name}: {line}")
        sub = build_order(self.recipe, self.graph, [name])
        nodes: list[NodeFacts] = []
        for n in sub:
            if n == name:
                nodes.append(NodeFacts(name=name, kind="step", digest="", op=op.name, version=op.version,
                                       params=dict(step.params), refs=step.refs, compute_key=ck, log=log, facts=facts))
            elif n in self.recipe.inputs:
                f = self.input_facts(n)
                if not f.metadata:
                    f.metadata = read_header(self.input_path(n))[1] if self.input_path(n).suffix == ".safetensors" else {}
                    f.legacy_hash = legacy_hash(self.input_path(n))
                nodes.append(f)
            else:
                nodes.append(self._step_facts(n))
        arch = model.info.get("architecture") or (inputs[0].info.get("architecture") if inputs else None)
        extra = dict(model.metadata) if op.output_kind == "lora" else None
        metadata = build_metadata(self.recipe, name, nodes, arch, op.output_kind, extra)
        total = len(model)
        counter = [0]

        def on_tensor(tname: str) -> None:
            counter[0] += 1
            self.progress.tensor(name, counter[0], total, tname)

        try:
            result = self.store.put(key, ck, lambda tmp: write_model(tmp, model, metadata, on_tensor=on_tensor))
        except SdbuildError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, MemoryError) as e:
            raise StepError(f"step {name!r} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        return result.content_digest

    def touched_files(self) -> list[Path]:
        """Every file whose change could change this build's result (for the no-op fast path)."""
        files = [self.recipe.path] + list(self._paths.values())
        files += [self.store.object_path(k) for k, _ in self.keys.values()]
        lock = self.recipe.path.with_name(self.recipe.path.name + ".lock")
        files.append(lock)
        for node, rels in self.recipe.outputs.items():
            if node in self.states:
                files += [self.out_dir() / r for r in rels]
        return files

    # -- outputs --------------------------------------------------------------------------------------------------

    def out_dir(self) -> Path:
        return Path(self.options.out_dir) if self.options.out_dir else self.recipe.dir

    def _materialise(self, order: list[str], report: BuildReport) -> None:
        base = self.out_dir()
        base.mkdir(parents=True, exist_ok=True)
        real_base = os.path.realpath(base)
        for node, rels in self.recipe.outputs.items():
            if node not in order:
                continue
            src = self.input_path(node) if node in self.recipe.inputs else self.store.object_path(self.keys[node][0])
            for rel in rels:
                target = base / rel
                real = os.path.realpath(target)
                if os.path.commonpath([real_base, real]) != real_base:
                    raise UserError(f"output {rel!r} resolves outside {base} (through a link); refusing to write there",
                                    self.recipe.where("outputs", node))
                materialise(Path(src), target)
                report.outputs[node] = str(target)
                self.progress.line(f"wrote {target}")


def _restamp_source(obj: Path, fresh: LazyModel) -> LazyModel:
    """Serve tensors from an existing object with the same compute key (only metadata changed)."""
    cached = SafetensorsFile(obj).lazy()
    return LazyModel(cached.specs, cached.get, fresh.metadata, fresh.label, fresh.info)


def _check_kind(ref: str, model: LazyModel, want: str, step: str, where: str) -> None:
    if want == "any":
        return
    try:
        from mergekit_sd.arch.detect import model_kind
    except ImportError:
        return
    got = model_kind(model.specs)
    if got != want and not (want == "checkpoint" and got == "unknown"):
        looks = "an unrecognised file" if got == "unknown" else f"a {got}"
        raise UserError(f"step {step!r} needs a {want} for {ref!r}, but {model.label} looks like {looks}", where)


def _device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu or cuda") from None


def gc(recipes: list[Path], options: Options, dry_run: bool = False) -> tuple[int, int]:
    """Keep the objects every given recipe's current plan points at (whether built or not); drop the rest."""
    from mergekit_sd.engine import stamp
    from mergekit_sd.engine.store import collect_garbage

    keep: set[str] = set()
    for r in recipes:
        session = Session(load_recipe(r), options)
        session.plan(list(session.recipe.node_names()))
        keep |= {k for k, _ in session.keys.values()}
    store = Store(options.cache_dir)
    if dry_run:
        paths = [p for p in (store.root / "objects").glob("*/*.safetensors") if p.name[: -len(".safetensors")] not in keep]
        return len(paths), sum(p.stat().st_size for p in paths)
    stamp.forget(options.cache_dir)
    return collect_garbage(store, keep)


def plan(recipe_path: str | Path, options: Options, targets: list[str] | None = None) -> list[NodeState]:
    return Session(load_recipe(recipe_path), options).plan(targets)


def build(recipe_path: str | Path, options: Options, targets: list[str] | None = None) -> BuildReport:
    return Session(load_recipe(recipe_path), options).build(targets)
