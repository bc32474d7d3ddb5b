import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_speed_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("speed", ROOT / "benchmarks" / "speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "speed.json"
    mod.main(["--repeats", "1", "--limit", "256", "--results", str(out)])
    res = json.loads(out.read_text())
    assert set(res["samples_per_second"]) == set(mod.MODES)
    assert res["store_bytes_per_sample_top8_of_100"] <= 40
