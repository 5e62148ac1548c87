"""The metrics table a stage command prints: numbers, one row each, nested metrics as `a.b` rows."""

from __future__ import annotations

import yaml
from helpers import REPO, run_fabrika, scripted_server


def test_collect_metrics_print_as_numbers(tmp_path):
    with scripted_server(lambda messages: "A helpful answer, written in full.") as url:
        cfg = tmp_path / "collect.yaml"
        cfg.write_text(yaml.safe_dump({
            "source": str(REPO / "data" / "samples" / "tagengo_sample.parquet"), "quota": {"ru": 2, "en": 2},
            "teacher": f"openai:teacher@{url}", "max_tokens": 8, "filters": ["empty"],
            "client": {"concurrency": 2, "max_retries": 0}}), encoding="utf-8")
        r = run_fabrika("collect", "--config", str(cfg), "--out", str(tmp_path / "out"), env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    table = r.stdout[r.stdout.index("collect:"):]
    assert "{" not in table  # no dict printed raw
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in table.splitlines()
            if line.count("│") == 3}
    assert rows["kept"] == "4" and rows["by_language.ru.kept"] == "2" and rows["by_language.en.answered"] == "2"
