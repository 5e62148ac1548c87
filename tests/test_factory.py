"""The whole factory on the embedded demo (shortened pretraining): every phase runs and hands its
artifact to the next, a second run is all cache hits, and the report renders in headless Chromium."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import run_cli

SHORT = ["--set", "stages.pretrain.train.max_steps=24", "--set", "stages.pretrain.train.eval_steps=12",
         "--set", "stages.pretrain.train.save_steps=12", "--set", "stages.pretrain.train.warmup_steps=4",
         "--set", "stages.pretrain.train.logging_steps=6"]
STAGES = ["tokenizer", "prepare", "pretrain", "collect", "sft", "pairs", "prefer", "rl", "judge", "evaluate",
          "export"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    r = run_cli("run", "examples/tiny-cpu.yaml", "--set", f"run_dir={run_dir}", *SHORT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run_dir


def test_every_phase_runs_and_a_rerun_is_cached(demo_run):
    for stage in STAGES:
        manifest = json.loads((demo_run / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage
    pairs = json.loads((demo_run / "pairs" / "manifest.json").read_text())["metrics"]
    assert pairs["kept"] > 0  # preference pairs made from the teacher and the SFT student
    rl = json.loads((demo_run / "rl" / "manifest.json").read_text())["metrics"]
    assert rl["steps"] == 8 and "reward_language_last" in rl  # GRPO steps with each reward logged on its own
    export = json.loads((demo_run / "export" / "verification.json").read_text())["verification"]["files"]
    assert set(export) == {"f16", "q4_k_m"} and export["f16"]["top1"] > 0.98
    results = json.loads((demo_run / "evaluate" / "results.json").read_text())
    assert results["perplexity"]["ppl"] > 1 and set(results["mtbench"]) == {"mt_bench", "ru_mt_bench"}
    assert results["mtbench"]["mt_bench"]["n"] > 0  # the demo's own judge answered in the [[rating]] format

    r = run_cli("run", "examples/tiny-cpu.yaml", "--set", f"run_dir={demo_run}", *SHORT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("cached (fingerprint") == len(STAGES)
    assert "report:" in r.stdout and (demo_run / "report.md").exists()
    assert (demo_run / "run.log").read_text().count("cached") >= len(STAGES)


def test_report_renders_in_headless_chromium(demo_run, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is needed for this test: `make test` installs it (apt-get install chromium)"
    r = run_cli("report", str(demo_run))
    assert r.returncode == 0, r.stderr
    page_file = demo_run / "report.html"
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu",
                                                                    "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("requestfailed", lambda req: errors.append(f"failed to load {req.url}"))
        page.goto(page_file.as_uri())
        for section in ("pipeline", "data", "training", "evaluation", "gguf", "reproduce"):
            assert page.locator(f"section#{section} h2").is_visible(), section
        text = page.inner_text("body")
        for expected in ("collect", "pairs", "q4_k_m", "Perplexity", "MT-Bench", "published", "transformers"):
            assert expected in text, expected
        images = page.locator("img")
        assert images.count() >= 6  # diagram; pretrain, sft, prefer and judge curves; MT-Bench by category
        for i in range(images.count()):  # every embedded plot decoded and laid out
            assert page.evaluate("(img) => img.complete && img.naturalWidth > 0", images.nth(i).element_handle())
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert not errors, errors
    assert "http" not in page_file.read_text().split("<body>")[0]  # self-contained: nothing fetched
