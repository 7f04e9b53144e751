"""Forensics on realistic synthetic families (a base, fine-tunes = base + seeded noise, merges built by sdbuild):
fit recovers merge weights, similar/family find relatives, lora-fit ranks checkpoints, bad inputs exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import write_recipe
from mergekit_sd.cli.main import main
from mergekit_sd.forensics.cluster import average_linkage, cut
from mergekit_sd.forensics.sources import open_checkpoint
from mergekit_sd.forensics.stream import products, rounding_variance, stream
from mergekit_sd.synth.loras import write_synth_lora
from mergekit_sd.synth.models import write_like, write_synth

MBW = [0.1, 0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95,
       0.05, 0.12, 0.22, 0.32, 0.42, 0.52]
BLOCKS = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("family")
    write_synth(d / "base.safetensors", "sd1", 32, "fp16", 1)
    for name, seed in (("a", 11), ("b", 12), ("c", 13)):
        write_like(d / f"{name}.safetensors", d / "base.safetensors", 0.1, seed)
    write_synth(d / "unrelated.safetensors", "sd1", 32, "fp16", 99)
    rec = write_recipe(d, f"""
        sdbuild: 1
        inputs: {{A: a.safetensors, B: b.safetensors, C: c.safetensors, base: base.safetensors}}
        steps:
          ws: {{op: weighted_sum, models: [A, B], alpha: 0.3}}
          ad: {{op: add_difference, models: [A, B, C], alpha: 0.5}}
          ts: {{op: triple_sum, models: [A, B, C], alpha: 0.3, beta: 0.2}}
          near: {{op: weighted_sum, models: [A, B], alpha: 0.05}}
          mbw: {{op: weighted_sum, models: [A, B], alpha: {MBW}}}
          ties: {{op: add_difference_ties, models: [base, A, B, C]}}
        outputs: {{ws: ws.safetensors, ad: ad.safetensors, ts: ts.safetensors, near: near.safetensors, mbw: mbw.safetensors,
                   ties: ties.safetensors}}
        """, "merges.yaml")
    assert main([str(rec), "-q", "--cache-dir", str(d / "cache")]) == 0
    return d


def run_json(sdbuild, *argv):
    r = sdbuild(*argv, "--json", "-q")
    assert r.code == 0, r
    return json.loads(r.out)


def fit(sdbuild, d, model, cands, *extra):
    return run_json(sdbuild, "fit", d / f"{model}.safetensors", "--candidates", *[d / f"{c}.safetensors" for c in cands], *extra)


def w(rep, name):
    return next(v for k, v in rep["global"]["weights"].items() if Path(k).stem == name)


def test_stream_gram_matches_fp64_and_does_not_depend_on_chunking_or_threads(fam):
    """The fp32 block products summed in fp64 agree with fp64 products computed here to 1e-6 of each entry's
    scale; cutting tensors into other chunks changes nothing measurable, and the thread count nothing at all."""
    names = ["ws", "a", "b", "c"]
    members = [open_checkpoint(fam / f"{n}.safetensors") for n in names]
    cpu = torch.device("cpu")
    res = stream(members, reference=1, device=cpu)
    tensors = [load_file(fam / f"{n}.safetensors") for n in names]
    keys = [k for k in tensors[0] if tensors[0][k].is_floating_point() and not k.endswith("position_ids")]
    gram, sq = np.zeros((4, 4)), np.zeros(4)
    for k in keys:
        x = torch.stack([t[k].double().reshape(-1) for t in tensors])
        sq += (x * x).sum(1).numpy()
        d = x - x[1]
        gram += (d @ d.T).numpy()
    total = res.total()
    scale = np.sqrt(np.outer(np.diag(gram), np.diag(gram))) + 1e-30
    assert res.keys == len(keys) and (np.abs(total.gram - gram) <= 1e-6 * scale).all()
    assert np.allclose(total.sq, sq, rtol=1e-6, atol=0)
    small = stream(members, reference=1, device=cpu, chunk=4096, workers=1)  # large tensors in many pieces
    assert (np.abs(small.total().gram - gram) <= 1e-6 * scale).all()
    one = stream(members, reference=1, device=cpu, workers=1)
    assert all(np.array_equal(one.buckets[b].gram, res.buckets[b].gram) for b in res.buckets)
    # the fp64 products a GPU takes, here on the CPU: exact up to fp64 summation
    k = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    rows = [[t[k].reshape(-1)[:37], t[k].reshape(-1)[37:]] for t in tensors]  # two pieces laid end to end
    x = torch.stack([t[k].double().reshape(-1) for t in tensors])
    want = ((x - x[1]) @ (x - x[1]).T).numpy()
    want[1, :] = want[:, 1] = ((x - x[1]) @ x[1]).numpy()
    want[1, 1] = float(x[1] @ x[1])
    assert np.allclose(products(rows, 1, cpu, torch.float64), want, rtol=1e-12, atol=0)


def test_rounding_floor_is_ulp_squared_over_12():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5000, generator=g) * torch.pow(10.0, torch.randint(-8, 4, (5000,), generator=g).float())
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        t = torch.cat([x, torch.zeros(7)]).to(dtype)
        v = np.abs(t.float().numpy()) if dtype == torch.bfloat16 else np.abs(t.numpy())
        if dtype == torch.bfloat16:  # numpy has no bf16: its ulp is 2^16 fp32 ulps
            ulp = np.spacing(v).astype(np.float64) * 65536
        else:
            ulp = np.spacing(v).astype(np.float64)
        want = float((np.where(v == 0, 0.0, ulp) ** 2).sum()) / 12
        assert rounding_variance(t) == pytest.approx(want, rel=1e-9), dtype


def test_fit_recovers_weighted_sum_add_difference_and_triple_sum(fam, sdbuild):
    ws = fit(sdbuild, fam, "ws", "abc")
    assert abs(w(ws, "b") - 0.3) <= 0.01 and abs(w(ws, "a") - 0.7) <= 0.01 and abs(w(ws, "c")) <= 0.01
    assert ws["op"] == "weighted_sum" and ws["verdict"].startswith("weighted sum of a.safetensors and b.safetensors, alpha 0.30")
    ad = fit(sdbuild, fam, "ad", "abc")
    assert abs(w(ad, "a") - 1) <= 0.01 and abs(w(ad, "b") - 0.5) <= 0.01 and abs(w(ad, "c") + 0.5) <= 0.01
    assert ad["op"] == "add_difference"
    ts = fit(sdbuild, fam, "ts", "abc")
    assert [round(w(ts, n), 2) for n in "abc"] == [0.5, 0.3, 0.2] and ts["op"] == "triple_sum"
    for rep in (ws, ad, ts):
        assert rep["kind"] == "linear" and rep["global"]["residual"] < 0.02
        assert set(rep) >= {"model", "candidates", "global", "identical", "verdict", "recipe"}


def test_fit_recovers_26_block_weights(fam, sdbuild):
    rep = fit(sdbuild, fam, "mbw", "ab", "--blocks")
    assert rep["kind"] == "block-linear"
    for block, alpha in zip(BLOCKS, MBW):
        got = rep["blocks"][block]["weights"]
        assert abs(got[str(fam / "b.safetensors")] - alpha) <= 0.01, block
    # without --blocks: not linear as a whole, and the verdict says so
    flat = fit(sdbuild, fam, "mbw", "ab")
    assert flat["kind"] == "block-linear" and "--blocks" in flat["verdict"]


def test_a_five_percent_re_release_is_a_near_copy(fam, sdbuild):
    rep = fit(sdbuild, fam, "near", "abc")
    assert rep["kind"] == "near-copy" and abs(w(rep, "b") - 0.05) <= 0.01
    assert rep["verdict"].startswith("near-copy of a.safetensors: 95.0% a.safetensors, 5.0% b.safetensors")


def test_ties_is_not_called_linear(fam, sdbuild):
    rep = fit(sdbuild, fam, "ties", "abc")
    assert rep["kind"] == "not-linear" and rep["verdict"].startswith("not a linear merge of these candidates")
    assert rep["global"]["residual"] > 0.2
    # the text names the free fit's residual and, apart, the residual of the recipe -o writes
    r = sdbuild("fit", fam / "ties.safetensors", "--candidates", *[fam / f"{c}.safetensors" for c in "abc"])
    assert r.code == 0 and f"recipe: {rep['op']}, residual {100 * rep['residual']:.3f}%" in r.out
    assert f"residual {100 * rep['global']['residual']:.3f}% (fp rounding floor" in r.out


def rebuilt_residual(built: Path, model: Path, first: Path) -> float:
    """|MODEL - rebuilt| / |MODEL - first candidate| over the tensors fit compares, computed here in fp64."""
    a, m, r = load_file(built), load_file(model), load_file(first)
    keys = [k for k in m if m[k].is_floating_point() and not k.endswith("position_ids")]
    num = sum(float(((a[k].double() - m[k].double()) ** 2).sum()) for k in keys)
    den = sum(float(((m[k].double() - r[k].double()) ** 2).sum()) for k in keys)
    return (num / den) ** 0.5


def build_fit_recipe(sdbuild, tmp_path: Path, model: Path, cands: list[Path], *extra) -> tuple[dict, float]:
    """`fit -o`, the recipe built by sdbuild, and the rebuilt model's residual against MODEL."""
    out = tmp_path / "fit" / "recipe.yaml"
    rep = run_json(sdbuild, "fit", model, "--candidates", *cands, *extra, "-o", out)
    assert out.read_text().startswith("# fitted by `sdbuild fit`") and rep["recipe"].startswith("# fitted")
    r = sdbuild("build", out, "-q", "--cache-dir", tmp_path / "cache")
    assert r.code == 0, r
    return rep, rebuilt_residual(out.parent / f"{model.stem}-fit.safetensors", model, cands[0])


@pytest.mark.parametrize("model,cands,extra", [("ws", "abc", ()), ("ad", "abc", ()), ("mbw", "ab", ("--blocks",)),
                                               ("ties", "abc", ()), ("ties", "abc", ("--blocks",))])
def test_output_recipes_build_and_land_within_the_reported_residual(fam, sdbuild, tmp_path, model, cands, extra):
    rep, measured = build_fit_recipe(sdbuild, tmp_path, fam / f"{model}.safetensors", [fam / f"{c}.safetensors" for c in cands], *extra)
    # the rebuilt model is stored in fp16 too: its own rounding may add up to the rounding floor
    assert measured <= rep["residual"] + rep["rounding_floor"] + 1e-6
    if model == "ties":  # far from linear, and the residual reported is the one the recipe gives
        assert rep["residual"] > 0.2 and abs(measured - rep["residual"]) <= rep["rounding_floor"] + 1e-3


def test_a_part_copied_from_a_candidate_outside_the_op_is_rebuilt(fam, sdbuild, tmp_path):
    """weighted sum of a and b, VAE copied from c: the recipe must also take the VAE from c."""
    rec = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{A: {fam}/a.safetensors, B: {fam}/b.safetensors, C: {fam}/c.safetensors}}
        steps:
          ws: {{op: weighted_sum, models: [A, B], alpha: 0.3}}
          m: {{op: weighted_sum, models: [ws, C], alpha: {{default: 0.0, VAE: 1.0}}}}
        outputs: {{m: m.safetensors}}
        """)
    assert sdbuild("build", rec, "-q", "--cache-dir", tmp_path / "cache").code == 0
    cands = [fam / f"{c}.safetensors" for c in "abc"]
    for extra in ((), ("--blocks",)):
        rep, measured = build_fit_recipe(sdbuild, tmp_path, tmp_path / "m.safetensors", cands, *extra)
        assert "VAE bit-identical to c.safetensors" in rep["verdict"] and rep["kind"] == "linear"
        assert rep["residual"] < 0.02 and measured <= rep["residual"] + rep["rounding_floor"] + 1e-6


def test_tensors_copied_inside_a_block_count_in_the_residual(fam, sdbuild, tmp_path):
    """Every attention query weight copied from b, the rest a weighted sum: no op rebuilds those tensors, they are
    left out of the fit, and the residual reported still includes what the recipe leaves there."""
    rec = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{A: {fam}/a.safetensors, B: {fam}/b.safetensors}}
        steps: {{m: {{op: weighted_sum, models: [A, B], alpha: {{default: 0.3, 're:attn1\\.to_q': 1.0}}}}}}
        outputs: {{m: m.safetensors}}
        """)
    assert sdbuild("build", rec, "-q", "--cache-dir", tmp_path / "cache").code == 0
    rep, measured = build_fit_recipe(sdbuild, tmp_path, tmp_path / "m.safetensors", [fam / "a.safetensors", fam / "b.safetensors"])
    assert rep["identical"][str(fam / "b.safetensors")] > 0 and abs(w(rep, "b") - 0.3) <= 0.01
    assert measured <= rep["residual"] + rep["rounding_floor"] + 1e-6
    assert rep["residual"] > 0.05 and abs(measured - rep["residual"]) <= rep["rounding_floor"] + 1e-3


def test_fit_reports_and_skips_tensors_copied_from_a_candidate(fam, sdbuild, tmp_path):
    rec = write_recipe(tmp_path, f"""
        sdbuild: 1
        inputs: {{A: {fam}/a.safetensors, B: {fam}/b.safetensors}}
        steps: {{m: {{op: weighted_sum, models: [A, B], alpha: {{default: 0.4, VAE: 1.0}}}}}}
        outputs: {{m: m.safetensors}}
        """)
    assert sdbuild("build", rec, "-q").code == 0
    out = tmp_path / "r.yaml"
    rep = run_json(sdbuild, "fit", tmp_path / "m.safetensors", "--candidates", fam / "a.safetensors", fam / "b.safetensors", "-o", out)
    vae = sum(1 for k in load_file(fam / "a.safetensors") if k.startswith("first_stage_model."))
    assert rep["identical"][str(fam / "b.safetensors")] == round(vae / rep["tensors"], 6)
    assert "VAE bit-identical to b.safetensors" in rep["verdict"] and abs(w(rep, "b") - 0.4) <= 0.01
    assert "alpha: {default: 0.4, VAE: 1.0}" in out.read_text()


def test_similar_ranks_parents_first_and_family_groups_relatives(fam, sdbuild, tmp_path):
    rep = run_json(sdbuild, "similar", fam / "ws.safetensors", "--among", fam / "a.safetensors", fam / "b.safetensors",
                   fam / "unrelated.safetensors", fam / "c.safetensors", "--blocks", "--plot", tmp_path / "h.png")
    order = [Path(e["file"]).stem for e in rep["ranking"]]
    assert order[:2] == ["a", "b"] and order[-1] == "unrelated"
    assert set(rep["ranking"][0]["blocks"]) == set(BLOCKS) | {"VAE"}
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the distance is |MODEL - X| / |MODEL| over the compared tensors
    m, a = load_file(fam / "ws.safetensors"), load_file(fam / "a.safetensors")
    keys = [k for k in m if m[k].is_floating_point() and not k.endswith("position_ids")]
    want = (sum(float(((m[k].double() - a[k].double()) ** 2).sum()) for k in keys)
            / sum(float((m[k].double() ** 2).sum()) for k in keys)) ** 0.5
    assert abs(rep["ranking"][0]["distance"] - want) < 1e-5

    files = [fam / f"{n}.safetensors" for n in ("a", "unrelated", "ws", "b", "base")]
    fr = run_json(sdbuild, "family", *files, "--plot", tmp_path / "t.png", "--mermaid")
    fams = [[Path(f).stem for f in g] for g in fr["families"]]
    assert sorted(map(sorted, fams)) == [["a", "b", "base", "ws"], ["unrelated"]]
    d = np.array(fr["distance"])
    assert np.allclose(d, d.T) and (d[1, [0, 2, 3, 4]] > 0.5).all() and d[0, 2] == d[2, 0] < d[0, 3]
    assert fr["mermaid"].startswith("graph LR") and (tmp_path / "t.png").exists()


def test_family_never_groups_architectures(sdbuild, tmp_path, model_dir):
    rep = run_json(sdbuild, "family", model_dir / "a.safetensors", model_dir / "b.safetensors", model_dir / "xl.safetensors",
                   "--cut", "10")
    assert [[Path(f).stem for f in g] for g in rep["families"]] == [["a", "b"], ["xl"]]
    assert rep["distance"][0][2] is None and rep["distance"][2][2] == 0.0


def test_average_linkage_against_a_hand_computed_tree():
    d = np.array([[0, 1, 5, 6], [1, 0, 4, 7], [5, 4, 0, 2], [6, 7, 2, 0]], dtype=float)
    links = average_linkage(d)
    assert links[0][:3] == (0, 1, 1.0) and links[1][:3] == (2, 3, 2.0)
    assert links[2][2] == pytest.approx((5 + 6 + 4 + 7) / 4)
    assert cut(links, 4, 3.0) == [[0, 1], [2, 3]]


def test_lora_fit_ranks_fine_tunes_by_their_noise(fam, sdbuild, tmp_path):
    base = fam / "a.safetensors"
    tunes = {}
    for noise in (0.2, 0.01, 0.05):
        tunes[noise] = write_like(tmp_path / f"t{noise}.safetensors", base, noise, 5)
    lora = write_synth_lora(tmp_path / "lora.safetensors", "sd1", "lora", 32, rank=4, seed=3, trained_on=base)
    cands = [tunes[0.2], fam / "unrelated.safetensors", tunes[0.01], tunes[0.05]]
    rep = run_json(sdbuild, "lora-fit", lora, "--candidates", *cands, "--models", fam)
    assert Path(rep["trained_on"]).resolve() == base.resolve() and "ss_new_sd_model_hash" in rep["found_by"]
    assert [Path(e["file"]).stem for e in rep["ranking"]] == ["t0.01", "t0.05", "t0.2", "unrelated"]
    assert rep["ranking"][0]["verdict"] == "fits" and rep["ranking"][-1]["verdict"] == "different family"
    drifts = [e["drift"] for e in rep["ranking"][:3]]
    assert drifts[1] / drifts[0] == pytest.approx(5, rel=0.05) and drifts[2] / drifts[0] == pytest.approx(20, rel=0.05)
    # every bakeable format is read
    for fmt in ("locon", "loha", "lokr", "peft", "diffusers_old", "dora_out", "full", "ia3"):
        other = write_synth_lora(tmp_path / f"{fmt}.safetensors", "sd1", fmt, 32, seed=4)
        r = run_json(sdbuild, "lora-fit", other, "--trained-on", base, "--candidates", tunes[0.05], tunes[0.01], fam / "unrelated.safetensors")
        assert [Path(e["file"]).stem for e in r["ranking"]] == ["t0.01", "t0.05", "unrelated"], fmt


def test_lora_fit_without_a_known_base_names_what_the_lora_records(fam, sdbuild, tmp_path):
    lora = write_synth_lora(tmp_path / "l.safetensors", "sd1", "lora", 32, trained_on=fam / "a.safetensors")
    r = sdbuild("lora-fit", lora, "--candidates", fam / "b.safetensors")
    assert r.code == 2 and "a.safetensors" in r.err and "sha256" in r.err and "--trained-on" in r.err
    plain = write_synth_lora(tmp_path / "p.safetensors", "sd1", "lora", 32)
    r = sdbuild("lora-fit", plain, "--candidates", fam / "b.safetensors")
    assert r.code == 2 and "records no training base" in r.err


def test_bad_inputs_exit_2_with_one_line(fam, sdbuild, tmp_path, model_dir):
    data = (fam / "b.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "evil.ckpt").write_bytes(b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR.")
    cases = [
        ("fit", fam / "ws.safetensors", "--candidates", fam / "a.safetensors", tmp_path / "trunc.safetensors"),
        ("fit", fam / "ws.safetensors", "--candidates", fam / "a.safetensors", tmp_path / "evil.ckpt"),
        ("fit", fam / "ws.safetensors", "--candidates", fam / "a.safetensors"),
        ("fit", fam / "ws.safetensors", "--candidates", fam / "a.safetensors", tmp_path / "missing.safetensors"),
        ("fit", fam / "ws.safetensors", "--candidates", fam / "a.safetensors", model_dir / "xl.safetensors"),
        ("similar", fam / "ws.safetensors", "--among", tmp_path / "trunc.safetensors"),
        ("family", fam / "a.safetensors", tmp_path / "evil.ckpt"),
        ("lora-fit", tmp_path / "trunc.safetensors", "--trained-on", fam / "a.safetensors", "--candidates", fam / "b.safetensors"),
    ]
    if not torch.cuda.is_available():
        cases.append(("fit", fam / "ws.safetensors", "--candidates", fam / "a.safetensors", fam / "b.safetensors", "--device", "cuda"))
    for argv in cases:
        r = sdbuild(*argv)
        assert r.code == 2, (argv, r)
        assert r.err.count("\n") == 1 and r.err.startswith("sdbuild: error: ") and "Traceback" not in r.err, r.err


def test_synth_like_is_base_plus_seeded_noise(fam, sdbuild, tmp_path):
    assert sdbuild("synth", tmp_path / "t.safetensors", "--like", fam / "base.safetensors", "--noise", "0.1", "--seed", "11", "-q").code == 0
    assert load_file(tmp_path / "t.safetensors").keys() == load_file(fam / "a.safetensors").keys()
    t, base = load_file(tmp_path / "t.safetensors"), load_file(fam / "base.safetensors")
    k = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    diff = (t[k].float() - base[k].float())
    rms = float(base[k].float().square().mean().sqrt())
    assert 0.08 < float(diff.std()) / rms < 0.12
    assert torch.equal(t["cond_stage_model.transformer.text_model.embeddings.position_ids"],
                       base["cond_stage_model.transformer.text_model.embeddings.position_ids"])


def test_inspect_flags_tensors_that_no_longer_match_the_recorded_digests_and_ranks_a_folder(fam, sdbuild, tmp_path):
    r = sdbuild("inspect", fam / "ws.safetensors", "--json")
    assert r.code == 0 and json.loads(r.out)["integrity"] == []
    data = bytearray((fam / "ws.safetensors").read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor
    (tmp_path / "edited.safetensors").write_bytes(bytes(data))
    r = sdbuild("inspect", tmp_path / "edited.safetensors")
    assert r.code == 0
    lines = [x for x in r.out.splitlines() if x.startswith("MISMATCH")]
    assert len(lines) == 2 and "content digest" in lines[0] and "modelspec.hash_sha256" in lines[1]
    r = sdbuild("inspect", fam / "ws.safetensors", "--against", fam, "--json", "--no-scan")
    stems = [Path(e["file"]).stem for e in json.loads(r.out)["similar"]["ranking"] if "cache" not in Path(e["file"]).parts]
    assert stems[stems.index("a")] == "a" and stems.index("a") < stems.index("b") < stems.index("unrelated") == len(stems) - 1
