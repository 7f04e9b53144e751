"""Runs a planned build: stale steps are streamed tensor by tensor into the store, then outputs are materialised
atomically. Ops report back through a typed record (`ModelInfo`): their provenance facts, and log lines the user
sees as warnings and provenance keeps.
"""

from __future__ import annotations

import hashlib
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_sd.arch.detect import ArchInfo, detect, model_kind
from mergekit_sd.engine.memo import digest_file
from mergekit_sd.engine.planner import NodeState, Planner
from mergekit_sd.engine.remote_cache import RemoteCache
from mergekit_sd.engine.reuse import Digests, TensorReuse, file_tensor_digests, record_object, tensor_keys
from mergekit_sd.engine.space import require, same_filesystem
from mergekit_sd.engine.store import materialise
from mergekit_sd.errors import SdbuildError, StepError, UserError
from mergekit_sd.formats.budget import MemoryBudget, for_tensors, return_freed_memory
from mergekit_sd.formats.hashread import HashingReader
from mergekit_sd.formats.digests import canonical, hash_text, legacy_hash
from mergekit_sd.formats.open import as_loaded, open_model
from mergekit_sd.formats.prefetch import default_workers, intra_op_threads
from mergekit_sd.formats.safetensors import SafetensorsFile, header_size, read_header, write_model
from mergekit_sd.lazy import LazyModel
from mergekit_sd.ops import OpContext, get_op, pick_device
from mergekit_sd.ops.check import check_steps
from mergekit_sd.provenance.card import CardSource, input_holders, render_card, write_card_file
from mergekit_sd.provenance.licences import assess
from mergekit_sd.provenance.record import NodeFacts, build_metadata, read_provenance
from mergekit_sd.recipe.graph import build_order
from mergekit_sd.remote.s3 import RemoteStore


@dataclass
class BuildReport:
    built: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)  # per step: where its result came from, ...

    def step(self, name: str, **facts: Any) -> None:
        self.steps.setdefault(name, {}).update(facts)

    def as_json(self) -> dict[str, Any]:
        return {"built": self.built, "fresh": self.fresh, "outputs": self.outputs, "steps": self.steps}



def annotate(model: LazyModel) -> LazyModel:
    """Attach the detected architecture (what merge and LoRA ops check inputs against)."""
    if model.info.arch is None:
        arch = detect(model.specs)
        model.info.arch = arch
        model.info.architecture = model.info.architecture or arch.modelspec
    return model


class Runner:
    """Builds what a planner found stale; one runner per build."""

    def __init__(self, planner: Planner):
        self.planner = planner
        self.recipe = planner.recipe
        self.store = planner.store
        self.progress = planner.progress
        self.graph = planner.graph
        self.facts = planner.facts
        self.states = planner.states
        self.keys = planner.keys
        self.device = pick_device(planner.options.device)
        self.workers = planner.options.jobs or default_workers()
        return_freed_memory()
        self.tensor_budget = for_tensors(planner.options.max_memory, self.workers)  # the limit less torch's own baseline
        planner.hash_while_reading = True
        self._hashing: dict[str, HashingReader] = {}  # inputs the running step hashes as it reads them
        self._pending: dict[str, NodeFacts] = {}  # their facts until the digests are known
        self._as_stored: dict[str, bool] = {}  # inputs whose ops see the tensors exactly as stored in the file
        if self.device.type == "cpu":
            # tensors are computed on `workers` threads at once: each gets a share of the cores, not all of them
            torch.set_num_threads(intra_op_threads(self.workers))
            if self.workers == 1:
                _one_interop_thread()
        opts = planner.options
        self.remote = RemoteCache(RemoteStore(opts.remote, opts.remote_endpoint, opts.remote_read_only), self.progress) \
            if opts.remote else None

    def input_path(self, name: str) -> Path:
        return self.planner.input_path(name)

    def input_facts(self, name: str) -> NodeFacts:
        return self.planner.input_facts(name)

    def open_node(self, name: str) -> LazyModel:
        if name in self.recipe.inputs and self.planner.hashed_while_read(name):
            if name not in self._hashing:
                self._hashing[name] = HashingReader(SafetensorsFile(self.input_path(name)), inline=self.workers <= 1)
            raw = self._hashing[name].lazy()
            m = as_loaded(raw)
            self._as_stored[name] = m is raw
            m.label = self.input_path(name).name
        elif name in self.recipe.inputs and self.input_path(name).suffix.lower() == ".safetensors":
            raw = SafetensorsFile(self.input_path(name)).lazy()
            m = as_loaded(raw)
            self._as_stored[name] = m is raw  # names and bytes as in the file: its tensor digests describe them
            m.label = self.input_path(name).name
        elif name in self.recipe.inputs:
            m = open_model(self.input_path(name))
            m.label = self.input_path(name).name
        else:
            key = self.keys[name][0]
            m = SafetensorsFile(self.store.object_path(key)).lazy()
            m.label = f"step {name!r}"
        return annotate(m)

    def _input_arch(self, name: str) -> ArchInfo | None:
        """An input's architecture from its safetensors header (other containers are known only once opened)."""
        path = self.input_path(name)
        if path.suffix.lower() != ".safetensors":
            return None
        return detect(read_header(path)[0])

    def build(self, targets: list[str] | None = None, compute: bool = True) -> BuildReport:
        """Bring every target up to date; with `compute=False` (pull) stale steps may only come from the remote."""
        report = BuildReport()
        # keys must be known before the remote can be asked, so with one (and in a pull) inputs are hashed first
        self.planner.hash_while_reading = compute and self.remote is None
        self.store.clean_tmp()
        order = build_order(self.recipe, self.graph, targets)
        steps = [n for n in order if n in self.recipe.steps]
        if self.planner.options.strict:
            self._check_licences(order)
        if any(self.planner.plan_node(n).state not in ("input", "fresh") for n in order):  # a no-op build reads nothing
            check_steps(self.recipe.steps, order, self._input_arch, self.recipe.where,
                        lambda n: self.input_path(n).name if n in self.recipe.inputs else n)
        for i, name in enumerate(order):
            st = self.planner.plan_node(name)
            if st.state == "input":
                continue
            if st.state == "fresh":
                self._fresh(name, report, f"[{steps.index(name) + 1}/{len(steps)}]")
                continue
            if st.key is None:  # an input is new: the step's keys follow from the digests its reads compute
                new = sorted({r for r in self.recipe.steps[name].refs if r in self.recipe.inputs})
                with ExitStack() as held:
                    for r in new:  # another build hashing the same file waits here, then finds its digests
                        held.enter_context(self.store.lock(hash_text("input", str(self.input_path(r).resolve()))))
                    for r in new:
                        self.planner.plan_node(r)
                    st = self.planner.plan_node(name)
                    if st.key is None:
                        self.progress.line(f"[{steps.index(name) + 1}/{len(steps)}] {name}: building ({st.reason})")
                        digest = self._run_step(name, None, None, report)
                        report.built.append(name)
                        report.step(name, source="computed")
                        key, ck = self.keys[name]
                        self._record(name, st.op, key, ck, digest)
                        continue
                if st.state == "fresh":
                    self._fresh(name, report, f"[{steps.index(name) + 1}/{len(steps)}]")
                    continue
            key, ck = self.keys[name]
            with self.store.lock(key):
                digest, _ = self.store.status(key)
                started = time.monotonic()
                fetched = self.remote.fetch(self.store, name, key, ck) if digest is None and self.remote else None
                if digest is not None:
                    report.fresh.append(name)
                    report.step(name, source="local")
                elif fetched is not None:
                    digest = fetched
                    report.step(name, computed=0, reused=0, seconds=round(time.monotonic() - started, 3))
                    self.progress.line(f"[{steps.index(name) + 1}/{len(steps)}] {name}: downloaded from {self.remote.remote.url}")
                    report.built.append(name)
                    report.step(name, source="remote")
                elif not compute:
                    where = self.remote.remote.url if self.remote else "the remote (none given)"
                    raise StepError(f"step {name!r} is not in {where}; build it with `sdbuild build` (pull never computes)")
                else:
                    source = "local" if self.store.find_compute(ck) else "computed"
                    self.progress.line(f"[{steps.index(name) + 1}/{len(steps)}] {name}: building ({st.reason})")
                    digest = self._run_step(name, key, ck, report)
                    report.built.append(name)
                    report.step(name, source=source)
            self._record(name, st.op, key, ck, digest)
        self._materialise(order, report)
        if self.remote is not None:
            self.push([self.keys[n][0] for n in order if n in self.recipe.steps])
            report.warnings += self.remote.warnings
        return report

    def push(self, keys: list[str]) -> tuple[int, int, int]:
        """Upload the objects the remote lacks; says what moved."""
        assert self.remote is not None
        uploaded, nbytes, present = self.remote.push(self.store, keys)
        if uploaded:
            self.progress.line(f"uploaded {uploaded} object(s), {nbytes / 2**20:.1f} MiB, to {self.remote.remote.url}")
        return uploaded, nbytes, present

    def _fresh(self, name: str, report: BuildReport, counter: str) -> None:
        report.fresh.append(name)
        report.step(name, source="local")
        self.progress.line(f"{counter} {name}: fresh")

    def _record(self, name: str, op: str, key: str, ck: str, digest: str) -> None:
        self.states[name] = NodeState(name, op, key, "fresh", "built", digest)
        step = self.recipe.steps[name]
        self.store.db.record_build(str(self.recipe.path), name, key, ck, canonical(step.params),
                                   canonical([self.states[r].digest for r in step.refs]))

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

    def _ref_digests(self, ref: str) -> Digests | None:
        """Per-tensor digests of what a step reads from `ref` (None: not known yet, or not usable for keys)."""
        st = self.states.get(ref)
        if st is None or st.digest is None:
            return None
        if ref in self.recipe.inputs:
            if not self._as_stored.get(ref):  # renamed or dequantised on load, or a pickle: not what the op reads
                return None
            return file_tensor_digests(self.store.db, self.input_path(ref), st.digest)
        return file_tensor_digests(self.store.db, self.store.object_path(self.keys[ref][0]), st.digest)

    def _run_step(self, name: str, key: str | None, ck: str | None, report: BuildReport) -> str:
        """Build one step into the store, copying the tensors stored objects already hold (engine.reuse); says
        in the report and on the progress line how many tensors were computed and how many reused."""
        started = time.monotonic()
        op = get_op(self.recipe.steps[name].op)
        reuse: list[TensorReuse] = []
        try:
            digest = self._write_step(name, key, ck, report, reuse)
            tensors = reuse[0]
            keys = tensors.keys
            if not tensors.complete:  # inputs hashed by this step's reads: their digests are known now
                keys = tensor_keys(tensors.base, op.name, op.version, self.device.type,
                                   [self._ref_digests(r) for r in self.recipe.steps[name].refs])
            obj = self.keys[name][0]
            assert tensors.result is not None
            record_object(self.store.db, obj, self.store.object_path(obj), tensors.base, tensors.result, keys)
        finally:
            for r in reuse:
                r.close()
        if tensors.damaged:
            self.progress.warn(f"{name}: {len(tensors.damaged)} stored tensor(s) failed their digest check and were "
                               f"not used (damaged cache object?), e.g. {sorted(tensors.damaged)[0]}")
        seconds = time.monotonic() - started
        report.step(name, computed=tensors.computed, reused=tensors.reused, seconds=round(seconds, 3))
        self.progress.step_done(name, tensors.computed, tensors.reused)
        return digest

    def _write_step(self, name: str, key: str | None, ck: str | None, report: BuildReport,
                    reuse: list[TensorReuse]) -> str:
        """Write one step's object. Without keys, some inputs are new: they are hashed by this step's reads,
        the metadata is settled after the last tensor, and the object is stored under the keys found then."""
        step = self.recipe.steps[name]
        op = get_op(step.op)
        where = self.recipe.where("steps", name)
        restamp = self.store.find_compute(ck) if ck else None
        self._hashing = {}
        budget = MemoryBudget(self.tensor_budget, warn=lambda msg: self.progress.warn(f"{name}: {msg}"))
        try:
            inputs = [self.open_node(r) for r in step.refs]
            for reader in self._hashing.values():  # tensors waiting for the input hashers count too
                reader.budget = budget
                reader.hold_limit = min(reader.hold_limit, budget.limit // 8)
            kinds = op.kinds(dict(step.params))
            for r, m, want in zip(step.refs, inputs, kinds):
                _check_kind(r, m, want, name, where)
            ctx = OpContext(step=name, device=self.device, input_names=list(step.refs), input_labels=[m.label for m in inputs])
            try:
                model = op.build(inputs, dict(step.params), ctx)
            except UserError as e:
                raise UserError(str(e) if e.where else f"{where}: {e}") from None
            # what the step reports: the op's own lines, then what reading its inputs reported (a .ckpt's dropped state)
            log = list(ctx.log) + list(model.info.log) + [line for m in inputs for line in m.info.log]
            facts = dict(model.info.provenance)
            if restamp is not None:
                tensors = TensorReuse(self.store, _restamp_source(self.store.object_path(restamp), model), {})
                tensors.reused = len(model)  # every tensor comes from the object with the same compute key
            else:
                digests = [self._ref_digests(r) for r in step.refs]
                tensors = TensorReuse(self.store, model, tensor_keys(model, op.name, op.version, self.device.type, digests))
                tensors.complete = all(d is not None for d in digests)
            reuse.append(tensors)
            model = tensors.model
            for line in log:
                self.progress.warn(f"{name}: {line}")
                report.warnings.append(f"{name}: {line}")
            arch = model.info.architecture or (inputs[0].info.architecture if inputs else None)
            extra = dict(model.metadata) if op.output_kind == "lora" else None

            def metadata_with(compute: str | None) -> dict[str, str]:
                nodes = self._subgraph_facts(name, op, step, compute, log, facts)
                return build_metadata(self.recipe, name, nodes, arch, op.output_kind, extra)

            hashing = dict(self._hashing)

            def settled() -> dict[str, str]:
                """After the last tensor: the inputs' digests are known, so are the step's keys and metadata."""
                for n, reader in hashing.items():
                    self.planner.learn_input(n, *reader.finish())
                    self.store.db.put_tensor_digests(self.states[n].digest, {t: d.hex() for t, d in reader.digests.items()})
                self.planner.plan_node(name)
                return metadata_with(self.keys[name][1])

            metadata = metadata_with(ck)  # with placeholders of the same width for what is not known yet
            total = len(model)
            total_bytes = model.nbytes()
            counter = [0]

            def on_tensor(tname: str) -> None:
                counter[0] += 1
                self.progress.tensor(name, counter[0], total, tname, model.specs[tname].nbytes, total_bytes)

            self._require_space(name, header_size(model, metadata))

            report.step(name, device=self.device.type)

            def write(tmp: Path):
                return write_model(tmp, model, metadata, on_tensor=on_tensor, workers=self.workers, budget=budget,
                                   final_metadata=settled if key is None else None, known_digest=tensors.known_digest)

            try:
                if key is None:
                    result = self.store.put_late(write, lambda: self.keys[name])
                else:
                    result = self.store.put(key, ck, write)
            except SdbuildError:
                raise
            except (RuntimeError, ValueError, TypeError, IndexError, MemoryError) as e:
                raise StepError(f"step {name!r} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
            tensors.result = result
            return result.content_digest
        finally:
            for reader in self._hashing.values():
                reader.close()
            self._hashing = {}

    def _subgraph_facts(self, name: str, op, step, compute: str | None, log: list[str], facts: dict) -> list[NodeFacts]:
        """Facts of every node that made `name`; an input still being hashed stands in with placeholder digests."""
        nodes: list[NodeFacts] = []
        for n in build_order(self.recipe, self.graph, [name]):
            if n == name:
                nodes.append(NodeFacts(name=name, kind="step", digest="", op=op.name, version=op.version,
                                       params=dict(step.params), refs=step.refs, compute_key=compute or _PENDING_KEY,
                                       log=log, facts=facts))
            elif n in self.recipe.inputs:
                path = self.input_path(n)
                if n in self._hashing and n not in self.facts:
                    f = self._pending.setdefault(n, _pending_input(self.planner, n))
                else:
                    f = self.input_facts(n)
                    if n in self._pending and not f.metadata:  # hashed by this step: its header was read already
                        f.metadata, f.legacy_hash = self._pending[n].metadata, self._pending[n].legacy_hash
                if not f.metadata:
                    f.metadata = read_header(path)[1] if path.suffix == ".safetensors" else {}
                    f.legacy_hash = legacy_hash(path)
                nodes.append(f)
            else:
                nodes.append(self._step_facts(n))
        return nodes

    def _require_space(self, name: str, size: int) -> None:
        """Before a step writes: room for its object in the cache, and for its outputs where they must be copies."""
        needs = {self.store.root / "tmp": size}
        rels = self.recipe.outputs.get(name, [])
        if rels and not same_filesystem(self.store.root, self.planner.out_dir()):
            needs[self.planner.out_dir()] = size * len(rels)
        require(needs, f"step {name!r}")

    def _materialise(self, order: list[str], report: BuildReport) -> None:
        base = self.planner.out_dir()
        copies = 0
        for node, rels in self.recipe.outputs.items():
            if node in order:
                src = self.input_path(node) if node in self.recipe.inputs else self.store.object_path(self.keys[node][0])
                if not same_filesystem(src.parent, base):
                    copies += src.stat().st_size * len(rels)
        if copies:
            require({base: copies}, "copying the outputs")
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
                materialise(Path(src), target, sync=self.store.must_fsync)
                report.outputs[node] = str(target)
                self.progress.line(f"wrote {target}")
            if node in self.recipe.cards:
                self._write_card(node, base / rels[0], base / self.recipe.cards[node], report)

    def _check_licences(self, order: list[str]) -> None:
        """--strict: a card licence that contradicts an ingredient's stops the build before anything runs."""
        for node in self.recipe.cards:
            if node not in order:
                continue
            holders = []
            for n in build_order(self.recipe, self.graph, [node]):
                if n in self.recipe.inputs:
                    f = self.input_facts(n)
                    path = self.input_path(n)
                    meta = read_header(path)[1] if path.suffix.lower() == ".safetensors" else {}
                    holders += input_holders(f.file or n, f.credits.get("license") or meta.get("modelspec.license"), meta)
            verdict = assess(self.recipe.card.get("license"), holders)
            if verdict.warnings:
                raise UserError(f"licence: {verdict.warnings[0]} (--strict)", self.recipe.where("outputs", node, "card"))

    def _write_card(self, node: str, model: Path, target: Path, report: BuildReport) -> None:
        """The output's model card, rebuilt with the file (and only rewritten when it changes)."""
        base = self.planner.out_dir()
        real_base = os.path.realpath(base)
        if os.path.commonpath([real_base, os.path.realpath(target)]) != real_base:
            raise UserError(f"card {self.recipe.cards[node]!r} resolves outside {base} (through a link); refusing to write there",
                            self.recipe.where("outputs", node, "card"))
        _, meta = read_header(model)
        digest, sha = digest_file(model, self.store.db)
        text, verdict = render_card(CardSource(model.name, meta, sha, digest))
        for w in verdict.warnings:
            if self.planner.options.strict:
                raise UserError(f"licence: {w} (the card was not written; --strict)", self.recipe.where("outputs", node, "card"))
            self.progress.warn(f"{node}: licence: {w}")
            report.warnings.append(f"{node}: licence: {w}")
        if write_card_file(target, text):
            self.progress.line(f"wrote {target}")



def _one_interop_thread() -> None:
    """`-j 1`: torch's inter-op pool gets one thread too (possible only before torch first used it)."""
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass


_PENDING_KEY = "f" * 32  # same width as a real key, so the header keeps its length when the real one replaces it


def _pending_input(planner: Planner, name: str) -> NodeFacts:
    """An input being hashed by the running step: placeholder digests of the real widths, distinct per input
    (records keyed by sha256 must keep one entry per input, or the header would change length)."""
    path = planner.input_path(name)
    return NodeFacts(name=name, kind="input", digest=hash_text("pending digest", name),
                     sha256=hashlib.sha256(f"pending sha256 {name}".encode()).hexdigest(), file=path.name,
                     credits=dict(planner.recipe.inputs[name].credits))


def _restamp_source(obj: Path, fresh: LazyModel) -> LazyModel:
    """Serve tensors from an existing object with the same compute key (only metadata changed)."""
    cached = SafetensorsFile(obj).lazy()
    return LazyModel(cached.specs, cached.get, fresh.metadata, fresh.label, fresh.info, key_inputs=fresh.key_inputs)


def _check_kind(ref: str, model: LazyModel, want: str, step: str, where: str) -> None:
    if want == "any":
        return
    got = model_kind(model.specs)
    if got != want and not (want == "checkpoint" and got == "unknown"):
        looks = "an unrecognised file" if got == "unknown" else f"a {got}"
        raise UserError(f"step {step!r} needs a {want} for {ref!r}, but {model.label} looks like {looks}", where)
