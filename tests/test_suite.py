"""The evidence suite, CI-sized: a tiny random Llama, two tiny synthetic domains, every protocol.
Checks the JSON's structure, CIs on every point, provenance, incremental writing, the per-token
sidecar and the plot; and that the repository's suite configs load."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_llama

from kvsplice import texts
from kvsplice.cli import main
from kvsplice.errors import KVSpliceError
from kvsplice.evaluate.suite import SuiteError, run_suite
from kvsplice.evaluate.suite_config import SuiteConfig, SuiteConfigError

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the cache keeps keys and values of every token so that later queries can read them again".split()


def _cli_toml(folder, domains: list[str]) -> str:
    """A tiny suite config for the CLI tests: one int4 peer on the byte-level tiny model."""
    return f"""
name = "ci"
model = "{folder}"
domains = {json.dumps(domains)}
calibration_domain = "alpha"
draws = 1
tokens = 96
tf_window = 64
prefill = 32
continue_tokens = 16
chunk = 4
batch_size = 2
block = 8
resamples = 200
topk = 8
[calibration]
samples = 400
max_batches = 2
seq_len = 64
[[methods]]
name = "uniform-int"
kind = "peer"
sweep = {{ bits = [4] }}
params = {{ peer = "uniform-int" }}
"""


def _fake_domain(name: str, seed: int) -> texts.Domain:
    rng = random.Random(seed)

    def load():
        docs = {f"{name}-{i:02d}": " ".join(rng.choice(WORDS) for _ in range(60)) for i in range(40)}
        return docs, {"source": "synthetic", "package": "tests", "version": "0", "files": "0", "files_sha256": "0" * 64}

    return texts.Domain(name, f"synthetic {name}", "CC0", load)


@pytest.fixture
def tiny_domains(monkeypatch):
    monkeypatch.setattr(texts, "DOMAINS", {"alpha": _fake_domain("alpha", 0), "beta": _fake_domain("beta", 1)})
    texts._loaded.cache_clear()
    yield
    texts._loaded.cache_clear()


def _cfg(model: str = "unused", **over) -> SuiteConfig:
    d = {"name": "ci", "model": model, "domains": ["alpha", "beta"], "calibration_domain": "alpha", "draws": 2, "tokens": 96,
         "tf_window": 64, "prefill": 32, "continue_tokens": 16, "chunk": 4, "batch_size": 2, "block": 8, "resamples": 200,
         "topk": 8, "deployment_tokens": 256, "deployment_sequences": [1, 4], "headline": ["pca-q"],
         "calibration": {"samples": 400, "max_batches": 2, "seq_len": 64},
         "methods": [
             {"name": "pca-q", "kind": "codec", "sweep": {"bits": [2.0, 4.0]}, "params": {"codec": "pca-q", "target": "kv", "joint_heads": True, "sink": 1}},
             {"name": "uniform-int", "kind": "peer", "sweep": {"bits": [4]}, "params": {"peer": "uniform-int"}},
             {"name": "kivi", "kind": "peer", "sweep": {"bits": [2]}, "params": {"peer": "kivi", "group": 4, "residual": 8, "v_group": 4}},
             {"name": "streamingllm", "kind": "peer", "sweep": {"budget": [0.5]}, "params": {"peer": "streamingllm", "sinks": 2}},
         ]}
    d.update(over)
    return SuiteConfig.from_dict(d)


def test_suite_on_tiny_model(tmp_path, tiny_domains):
    folder = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    cfg_path = tmp_path / "suite.toml"
    out_json, out_png = tmp_path / "s.json", tmp_path / "s.png"
    seen = []  # (points on disk, status) each time the runner logs a point: incremental writing

    def log(msg: str) -> None:
        if out_json.exists():
            d = json.loads(out_json.read_text())
            seen.append((len(d["points"]), d["status"]))

    from kvsplice.loading import load_model

    model, tok = load_model(str(folder))
    cfg = _cfg(str(folder))
    r = run_suite(cfg, "test", out_json, model=model, tokenizer=tok, log=log)
    d = json.loads(out_json.read_text())
    assert d["status"] == "complete" and d["split"] == "test" and d["kind"] == "kvsplice-suite"
    assert "commit" in d and d["config"]["draws"] == 2
    # what decides a run's bits besides the code (a rerun on another CPU differs in the last bits)
    plat = d["run"]["platform"]
    assert plat["torch"] == torch.__version__ and plat["threads"] == torch.get_num_threads() and isinstance(plat["blas_mkl"], bool)
    assert Path("/proc/cpuinfo").is_file() <= (plat["cpu"] is not None)
    # incremental: the file grew one point at a time while the run was "running"
    counts = [n for n, s in seen if s == "running"]
    assert counts == sorted(counts) and len(set(counts)) >= 10
    assert set(d["domains"]) == {"alpha", "beta"}
    for dom in d["domains"].values():
        assert dom["provenance"]["licence"] == "CC0" and dom["part"]["part"] == "test" and dom["part"]["documents"]
        assert set(dom["baseline"]) == {"teacher-forced", "prefill-continue"}
    assert d["calibration"]["domain"] == "alpha" and len(d["calibration"]["draws"]) == 2
    per_domain = {}
    for q in d["points"]:
        per_domain.setdefault(q["domain"], []).append(q)
        assert q["tokens"] >= cfg.tokens
        lo, hi = q["ci95"]
        assert lo <= q["delta_pct"] <= hi and q["verdict"] in ("win", "loss", "tie")
        b = q["bits_per_value"]
        assert set(b) == {"payload", "amortised_1x256", "amortised_4x256"}
        assert q["ratio_vs_16bit"]["payload"] == pytest.approx(b["payload"] / 16)
        if q["family"] == "ours":
            assert q["geometry_bytes"] > 0 and b["amortised_1x256"] > b["amortised_4x256"] > b["payload"]
            assert q["protocol"] == "teacher-forced" and q["draw"] in (0, 1)
        else:
            assert q["geometry_bytes"] == 0 and b["amortised_1x256"] == b["payload"]
        if q["method"] != "baseline":
            assert 0.0 <= q["kl"] and 0.0 <= q["top1"] <= 1.0
    for qs in per_domain.values():  # 2 baselines + 2 settings x 2 draws + 3 peers
        assert len(qs) == 2 + 4 + 3
        assert {q["protocol"] for q in qs if q["method"] in ("kivi", "streamingllm")} == {"prefill-continue"}
    assert {(s["method"], s["draws"]) for s in d["summary"]} >= {("pca-q", 2), ("kivi", 1)}
    assert d["comparisons"] and all(c["protocol"] == "teacher-forced" for c in d["comparisons"])  # ours vs int4, same tokens
    from safetensors.torch import load_file

    tok_file = load_file(out_json.with_suffix(".tokens.safetensors"))
    assert tok_file[f"{len(d['points']) - 1}.nll"].numel() == d["points"][-1]["tokens"]
    from kvsplice.evaluate.frontier_plot import plot_suite_json

    plot_suite_json(out_png, r)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suite_cli_and_refusals(tmp_path, tiny_domains, capsys):
    folder = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    cfg_path = tmp_path / "suite.toml"
    cfg_path.write_text(_cli_toml(folder, ["alpha", "beta"]), encoding="utf-8")
    out = tmp_path / "cli.json"
    assert main(["frontier", "--suite-config", str(cfg_path), "--split", "dev", "--json", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["split"] == "dev" and out.with_suffix(".png").is_file()
    assert "uniform-int" in capsys.readouterr().out
    from kvsplice.loading import load_model

    model, tok = load_model(str(folder))
    with pytest.raises(SuiteError, match="tokens"):
        run_suite(_cfg(str(folder), tokens=5000), "test", tmp_path / "x.json", model=model, tokenizer=tok, log=lambda m: None)
    with pytest.raises(SuiteError, match="split"):
        run_suite(_cfg(str(folder)), "train", tmp_path / "x.json", model=model, tokenizer=tok)
    with pytest.raises(SuiteConfigError, match="domains"):
        _cfg(domains=["nope"])
    with pytest.raises(SuiteConfigError, match="seed"):
        _cfg(calibration={"seed": 3})


@pytest.mark.parametrize("name", ["quick", "full"])
def test_repository_suite_configs_load(name):
    cfg = SuiteConfig.named(name)
    assert cfg.tokens >= 4096 and cfg.draws >= (3 if name == "full" else 2) and len(cfg.domains) >= 3
    assert (cfg.tf_window - 1) * cfg.tf_windows >= cfg.tokens and cfg.continue_tokens * cfg.segments >= cfg.tokens


def test_held_bits_is_the_rate_against_an_uncompressed_cache_holding_the_same_rows():
    from types import SimpleNamespace

    from kvsplice.evaluate.suite import held_bits

    # a hybrid model's sliding layers drop rows for every cache alike: only the compression rate counts
    assert held_bits(SimpleNamespace(kv_reduction_pct=87.5), "float32") == 4.0
    assert held_bits(SimpleNamespace(kv_reduction_pct=75.0), "bfloat16") == 4.0
    assert held_bits(SimpleNamespace(kv_reduction_pct=0.0), "float32") == 32.0


def test_protocol_param_forces_prefill_continue_and_windows_use_it(tmp_path, tiny_domains):
    """Equal-terms comparisons (issue 13 lever 4): a windowed coder can only be measured
    prefill-continue, so its no-window twin can be forced there too; a bad value is refused."""
    folder = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    from kvsplice.loading import load_model

    model, tok = load_model(str(folder))
    base = {"codec": "pca-q", "target": "kv", "joint_heads": True, "sink": 1}
    cfg = _cfg(str(folder), domains=["alpha"], draws=1, headline=["pc"], methods=[
        {"name": "pc", "kind": "codec", "sweep": {"bits": [4.0]}, "params": {**base, "protocol": "prefill-continue"}},
        {"name": "tf", "kind": "codec", "sweep": {"bits": [4.0]}, "params": base},
        {"name": "win", "kind": "codec", "sweep": {"bits": [4.0]}, "params": {**base, "window": 4}},
    ])
    run_suite(cfg, "dev", tmp_path / "s.json", model=model, tokenizer=tok, log=lambda m: None)
    d = json.loads((tmp_path / "s.json").read_text())
    proto = {q["method"]: q["protocol"] for q in d["points"] if q["method"] != "baseline"}
    assert proto == {"pc": "prefill-continue", "tf": "teacher-forced", "win": "prefill-continue"}
    with pytest.raises(KVSpliceError, match="params.protocol"):
        _cfg(headline=["x"], methods=[{"name": "x", "kind": "codec", "sweep": {"bits": [4.0]}, "params": {**base, "protocol": "teacher"}}])


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("suite-*.toml")), ids=lambda p: p.stem)
def test_every_suite_config_in_the_repo_loads(path):
    cfg = SuiteConfig.from_toml(path)
    assert cfg.tokens >= 4096 and len(cfg.domains) >= 3  # the evidence suite's floor, levers included


def test_bf16_suite_with_float32_accumulation_runs_and_restores_the_model(tmp_path, tiny_domains):
    """Issue 9 item 7 at float32 speed: a bfloat16 model, its linears accumulated in float32 for the
    run (kvsplice/evaluate/bf16.py), peers holding their rows in bf16; the model is unchanged after."""
    folder = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    import torch

    from kvsplice.loading import load_model

    model, tok = load_model(str(folder), dtype=torch.bfloat16)
    cfg = _cfg(str(folder), domains=["alpha"], draws=1, dtype="bfloat16", matmul="fp32-accumulate")
    r = run_suite(cfg, "test", tmp_path / "b.json", model=model, tokenizer=tok, log=lambda m: None)
    base = next(q for q in r["points"] if q["method"] == "baseline")
    assert "bfloat16" in base["setting"] and r["config"]["matmul"] == "fp32-accumulate"
    assert all(q["ppl"] > 1.0 for q in r["points"]) and {q["method"] for q in r["points"]} >= {"kivi", "pca-q", "streamingllm"}
    assert not any("forward" in vars(m) for m in model.modules())  # the class forwards are back


def test_mix_calibration_domain_interleaves_every_part_and_rotates_per_draw(tmp_path, tiny_domains, monkeypatch):
    """calibration_domain = "mix": the default calibration text (texts.mix_text) of every MIX_DOMAINS
    part, each rotated by draw / draws of its documents; provenance of every part recorded."""
    from kvsplice.evaluate.suite import DrawCalibration

    monkeypatch.setattr(texts, "MIX_DOMAINS", ("alpha", "beta"))
    folder = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    from kvsplice.loading import load_model

    model, tok = load_model(str(folder))
    cfg = _cfg(str(folder), domains=["alpha"], calibration_domain="mix", methods=_cfg().to_dict()["methods"][:1])
    d0, d1 = (DrawCalibration(cfg, d, model, tok, lambda m: None) for d in (0, 1))
    assert d0.text == texts.mix_text(("alpha", "beta"))[0] and d1.text != d0.text and d1.rotate == 0.5
    assert texts.part_text("beta", "calibration")[:200] in d0.text  # both parts are in the mix
    assert texts.part_text("beta", "calibration")[:100] in d0.probe_text[:1200]  # the probe's first tokens see both
    r = run_suite(cfg, "test", tmp_path / "m.json", model=model, tokenizer=tok, log=lambda m: None)
    assert [p["domain"] for p in r["calibration"]["provenance"]] == ["alpha", "beta"]
    assert [x["rotate_fraction"] for x in r["calibration"]["draws"]] == [0.0, 0.5]
    with pytest.raises(KVSpliceError, match="rotate must be"):
        texts.mix_text(("alpha",), rotate=1.0)


def test_full_suite_runs_its_long_context_part_on_the_same_split(tmp_path, tiny_domains, capsys, monkeypatch):
    """[longctx]: after the frontier points, retrieval + perplexity after a prefill on the longctx domain's
    part of the suite's split, codecs from the suite's draw 0, in the same JSON (rewritten per cell); the
    CLI prints its table and writes <png>-longctx.png; a split too short is refused before any point."""
    folder = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    from kvsplice.loading import load_model

    model, tok = load_model(str(folder))
    lc = {"domain": "beta", "tasks": ["multikey"], "lengths": [256], "depths": [0.5], "trials": 2, "keep": 0.0,
          "methods": ["baseline", "pca-q-2", "int-2", "streamingllm-2"], "ppl_prefill": 128, "ppl_tokens": 32}
    cfg = _cfg(str(folder), draws=1, methods=_cfg().to_dict()["methods"][:1], longctx=lc)
    out = tmp_path / "lc.json"
    cells_seen, statuses, fits = [], set(), []
    real_part_text = texts.part_text
    asked = []

    def spy(name, part, rotate=0):
        asked.append((name, part))
        return real_part_text(name, part, rotate)

    monkeypatch.setattr(texts, "part_text", spy)

    def log(msg: str) -> None:
        fits.extend([msg] if msg.startswith("fitted") else [])
        if out.exists():
            on_disk = json.loads(out.read_text())
            cells_seen.append(len((on_disk.get("longctx") or {}).get("cells", [])))
            statuses.add(on_disk["status"])

    r = run_suite(cfg, "test", out, model=model, tokenizer=tok, log=log)
    monkeypatch.setattr(texts, "part_text", real_part_text)
    assert statuses == {"running"}  # never "complete" while the long-context part ran
    assert ("beta", "test") in asked and not any(part == "dev" for _, part in asked)  # the haystack comes from the split
    assert len(fits) == 4, fits  # pca-q 2 / 4 bits, K and V: the longctx codecs reuse draw 0's geometry
    d = json.loads(out.read_text())
    assert d["status"] == "complete" and d["longctx"] == json.loads(json.dumps(r["longctx"]))
    L = d["longctx"]
    assert L["filler"]["domain"] == "beta" and L["filler"]["split"] == "test" and L["filler"]["part"]["part"] == "test"
    assert L["filler"]["part"]["sha256"] == texts.part_info("beta", "test")["sha256"]
    assert {c["method"] for c in L["cells"]} == {"baseline", "pca-q-2", "int-2", "streamingllm-2"}  # keep 0: every cell runs
    assert {p["method"] for p in L["ppl"]["points"]} == {"baseline", "pca-q-2", "int-2", "streamingllm-2"}
    assert L["calibration"]["seed"] == 0 and len(d["calibration"]["draws"]) == 1  # the suite's draw 0, not a second fit
    assert max(cells_seen) == len(L["cells"]) and 0 in cells_seen  # written while it ran
    assert all(0.0 <= c["accuracy"] <= 1.0 and c["kv_bits_per_value"] > 0 for c in L["cells"])
    grid_geo = {q["setting"]: q["geometry_bytes"] for q in d["points"] if q["method"] == "pca-q"}
    assert L["geometry_bytes"] == {"pca-q-2": grid_geo["bits=2.0 KV joint sink=1"]} and L["geometry_bytes"]["pca-q-2"] > 0
    assert L["methods"]["pca-q-2"].startswith("pca-q bits=2.0")
    # a failure in the long-context part keeps the grid's points and says so in the file
    bad = tmp_path / "bad.json"
    with pytest.raises(KVSpliceError, match="v_group"):  # KIVI's V groups of 32 do not divide this model's head_dim 8
        run_suite(_cfg(str(folder), draws=1, headline=[], methods=_cfg().to_dict()["methods"][1:2], longctx={**lc, "methods": ["kivi-2"]}),
                  "test", bad, model=model, tokenizer=tok, log=lambda m: None)
    on_disk = json.loads(bad.read_text())
    assert on_disk["status"] == "grid complete, longctx failed" and len(on_disk["points"]) == 2 * (2 + 1)
    # the CLI: its table and the second plot
    cfg_toml = tmp_path / "lc.toml"
    cfg_toml.write_text(_cli_toml(folder, ["alpha"]) + f"""[longctx]
domain = "beta"
tasks = ["multikey"]
lengths = [256]
depths = [0.5]
trials = 1
keep = 0.0
methods = ["baseline", "int-2"]
ppl_prefill = 0
""", encoding="utf-8")
    out2 = tmp_path / "cli.json"
    assert main(["frontier", "--suite-config", str(cfg_toml), "--split", "dev", "--json", str(out2), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "long context (beta dev text)" in text and "multikey@256" in text and "int-2" in text
    assert (tmp_path / "cli-longctx.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # refusals, before any work: lengths past the model's positions; a part shorter than the haystack
    with pytest.raises(SuiteError, match="positions"):
        run_suite(_cfg(str(folder), longctx={**lc, "lengths": [512]}), "test", tmp_path / "y.json", model=model, tokenizer=tok)
    with pytest.raises(SuiteError, match="chat template"):  # the tokenizer's refusals come before any point, too
        run_suite(_cfg(str(folder), longctx={**lc, "prompt": "chat"}), "test", tmp_path / "c.json", model=model, tokenizer=tok)
    assert not (tmp_path / "c.json").exists()
    real = texts.part_text
    monkeypatch.setattr(texts, "part_text", lambda name, part, rotate=0: real(name, part, rotate)[:100] if name == "beta" else real(name, part, rotate))
    with pytest.raises(SuiteError, match="'beta' test part has"):
        run_suite(_cfg(str(folder), longctx={**lc, "ppl_prefill": 0}), "test", tmp_path / "z.json", model=model, tokenizer=tok)
    assert not (tmp_path / "y.json").exists() and not (tmp_path / "z.json").exists()
    with pytest.raises(SuiteConfigError, match="longctx.*methods"):
        _cfg(longctx={**lc, "methods": ["baseline", "nope"]})
    with pytest.raises(SuiteConfigError, match="longctx.*keep"):
        _cfg(longctx={**lc, "keep": 2})
    with pytest.raises(SuiteConfigError, match="longctx"):
        _cfg(longctx={**lc, "lengths": [50]})
    with pytest.raises(SuiteConfigError, match="unknown key"):
        _cfg(longctx={**lc, "tokens": 5})
    with pytest.raises(SuiteConfigError, match="lengths must be a list"):
        _cfg(longctx={**lc, "lengths": 256})
