"""The LC benchmark's baseline computes a locally connected layer, and the script runs end to end."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

from bpcnn import LocallyConnected2d

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "lc_layer.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("lc_layer_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_reference_formulation_matches_layer():
    bench = _load_script()
    torch.manual_seed(0)
    shape = bench.LayerShape("tiny", 3, 4, 3, 2, 1, 7, 2)
    reference = bench.UnfoldEinsumLC(shape, torch.device("cpu"), torch.float64)
    layer = LocallyConnected2d(3, 4, 3, 7, stride=2, padding=1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        # (oh, ow, out, in, kh, kw) -> (in, out, oh, ow, kh, kw), the reference's layout
        reference.weight.copy_(layer.weight.permute(3, 2, 0, 1, 4, 5))
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(reference(x), layer(x))


def test_script_runs_and_writes_json(tmp_path):
    bench = _load_script()
    output = tmp_path / "results.json"
    bench.main(["--skip-resnet18", "--skip-network", "--skip-memory", "--batch", "2", "--warmup", "0",
                "--repeats", "1", "--formats", "channels_last", "--json", str(output)])
    results = json.loads(output.read_text())
    assert [row["format"] for row in results["layers"]] == ["channels_last"] * 3
    assert all(row["ms"]["bpcnn"] > 0 for row in results["layers"])
