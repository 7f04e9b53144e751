"""Plans a build without running it: a key for every node, fresh or stale, and why.

A step's object key = hash(compute key, metadata ingredients). The compute key covers what the tensors depend on
(op, op version, parameters, inputs' content digests), so an upstream step rebuilt to identical tensors leaves its
dependants fresh (early cutoff), and a change that only touches metadata (a card field, a renamed input file)
rewrites the file from the cached tensors instead of recomputing them. Planning reads no model bytes beyond
hashing inputs it has not seen before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_sd import TOOL
from mergekit_sd.engine.inputs import search_folders
from mergekit_sd.engine.keys import compute_key, object_key
from mergekit_sd.engine.memo import digest_file, digest_files
from mergekit_sd.engine.options import Options, model_dirs
from mergekit_sd.engine.progress import Progress
from mergekit_sd.engine.state import file_identity
from mergekit_sd.engine.store import Store
from mergekit_sd.errors import UserError
from mergekit_sd.formats.prefetch import default_workers
from mergekit_sd.formats.digests import canonical
from mergekit_sd.ops import get_op
from mergekit_sd.provenance.record import NodeFacts
from mergekit_sd.recipe.graph import build_graph, build_order
from mergekit_sd.recipe.load import Recipe


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



class Planner:
    """One recipe against one cache: resolves inputs, computes keys, decides what is stale."""

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
        # set by a build: an input never hashed before is hashed by the reads of the first step that uses it
        self.hash_while_reading = False

    # -- inputs ---------------------------------------------------------------------------------------------------

    def declared_path(self, name: str) -> Path | None:
        """Where the recipe says an input is (relative paths are relative to the recipe's folder)."""
        decl = self.recipe.inputs[name]
        if not decl.path:
            return None
        p = Path(decl.path).expanduser()
        return p if p.is_absolute() else self.recipe.dir / p

    def find_input(self, name: str) -> Path | None:
        """The input's file: at its declared path, else by file name or sha256 pin in the model folders."""
        decl = self.recipe.inputs[name]
        declared = self.declared_path(name)
        if declared is not None and declared.is_file():
            return declared
        return search_folders(model_dirs(self.options.models), Path(decl.path).name if decl.path else None,
                              decl.sha256, self.store.db)

    def input_path(self, name: str) -> Path:
        if name in self._paths:
            return self._paths[name]
        decl = self.recipe.inputs[name]
        where = self.recipe.where("inputs", name)
        found = self.find_input(name)
        if found is None:
            if decl.credits.get("url"):
                raise UserError(f"input {name!r}: file {decl.path or '(no path)'!r} not found; `sdbuild fetch "
                                f"{self.recipe.path.name}` downloads it from {decl.credits['url']}", where)
            hint = f" or sha256 {decl.sha256[:12]}…" if decl.sha256 else ""
            raise UserError(f"input {name!r}: file {decl.path or '(no path)'!r} not found{hint}; fix the path or pass --models DIR", where)
        if decl.sha256:
            _, sha = digest_file(found, self.store.db)
            if sha != decl.sha256:
                raise UserError(f"input {name!r}: {found.name} has sha256 {sha}, but the recipe pins {decl.sha256}; "
                                "use the pinned file or update the pin", self.recipe.where("inputs", name, "sha256"))
        self._paths[name] = found
        return found

    def hashed_while_read(self, name: str) -> bool:
        """Whether the build takes this input's digests from its first read instead of hashing it now: a
        safetensors file with no pin and no memoised digest under its path (a known path whose file changed is
        hashed now, so that an unchanged copy or a touched file still reuses what is built)."""
        if not self.hash_while_reading or name in self.facts or self.recipe.inputs[name].sha256:
            return False
        path = self.input_path(name)
        return path.suffix.lower() == ".safetensors" and self.store.db.memo(path.resolve()) is None

    def learn_input(self, name: str, digest: str, sha256: str) -> None:
        """Digests of an input hashed while a step read it: memoised, and its dependants can now be keyed."""
        path = self.input_path(name)
        p = path.resolve()
        self.store.db.remember(p, file_identity(p), digest, sha256)
        decl = self.recipe.inputs[name]
        self.facts[name] = NodeFacts(name=name, kind="input", digest=digest, sha256=sha256, file=path.name, credits=dict(decl.credits))
        self.states[name] = NodeState(name, "input", digest, "input", "input file", digest)

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
        parts: dict[str, Any] = {"tool": TOOL, "node": node, "name": self.recipe.name,
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
            if self.hashed_while_read(name):
                st = NodeState(name, "input", None, "input", "new input file (hashed as it is read)")
                self.states[name] = st
                return st
            f = self.input_facts(name)
            st = NodeState(name, "input", f.digest, "input", "input file", f.digest)
            self.states[name] = st
            return st
        step = self.recipe.steps[name]
        op = get_op(step.op)
        pending = [r for r in step.refs if self.states.get(r) is None or self.states[r].digest is None]
        if pending:
            new = pending[0] in self.recipe.inputs  # a file never hashed: nothing can have been built from it
            st = NodeState(name, step.op, None, "stale", "never built" if new else f"input {pending[0]!r} will be rebuilt")
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
        last = self.store.db.last_build(str(self.recipe.path), name)
        if last is None:
            return "never built"
        _, old_ck, old_params, old_inputs = last
        if old_ck == ck:
            return "metadata changed (tensors reused)"
        if old_params != canonical(step.params):
            return "parameters changed"
        old = dict(zip(step.refs, old_inputs)) if old_inputs else {}
        for r, d in zip(step.refs, digests):
            if old.get(r) != d:
                return f"input {r!r} changed"
        return "op version changed"

    def plan(self, targets: list[str] | None = None) -> list[NodeState]:
        order = build_order(self.recipe, self.graph, targets)
        self.prehash(order)
        return [self.plan_node(n) for n in order]

    def prehash(self, order: list[str]) -> None:
        """Hash the inputs the plan must hash now (not those hashed by a step's reads) side by side, one per
        worker thread; the plan then finds their digests memoised."""
        paths = []
        for n in order:
            try:
                if n not in self.recipe.inputs or n in self.facts or self.hashed_while_read(n):
                    continue
            except UserError:  # not found: plan_node reports it in recipe order
                continue
            declared = self.declared_path(n)
            if declared is not None and declared.is_file():
                paths.append(declared)
        digest_files(paths, self.store.db, self.options.jobs or default_workers())

    def touched_files(self) -> list[Path]:
        """Every file whose change could change this build's result (for the no-op fast path)."""
        files = [self.recipe.path] + list(self._paths.values())
        files += [self.store.object_path(k) for k, _ in self.keys.values()]
        lock = self.recipe.path.with_name(self.recipe.path.name + ".lock")
        files.append(lock)
        for node, rels in self.recipe.outputs.items():
            if node in self.states:
                files += [self.out_dir() / r for r in rels]
                if node in self.recipe.cards:
                    files.append(self.out_dir() / self.recipe.cards[node])
        return files

    # -- outputs --------------------------------------------------------------------------------------------------

    def out_dir(self) -> Path:
        return Path(self.options.out_dir) if self.options.out_dir else self.recipe.dir
