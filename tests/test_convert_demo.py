"""The demo's training checkpoints convert to what direct training saved (reference_hf), and notebook 01 runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vesselnb.convert import convert_checkpoint, diff_weights
from vesselnb.fingerprint import INDEX_NAME, SINGLE_NAME


@pytest.fixture(scope="module")
def demo(demo_assets):
    """The session's small demo build (tests/conftest.py), shared with the other stages' tests."""
    return demo_assets


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF folder (sharded with an index, or a single model.safetensors)."""
    index = folder / INDEX_NAME
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [SINGLE_NAME]
    out = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as handle:
            out.update({k: handle.get_tensor(k) for k in handle.keys()})
    return out


def test_demo_long_checkpoint_reproduces_reference_and_loads(demo, tmp_path: Path) -> None:
    from transformers import AutoModel

    out = tmp_path / "iter_400"
    report = convert_checkpoint(demo.checkpoints["long"], demo.base_model, out, training_config=demo.training_config)
    assert not report.warnings, report.warnings
    assert report.coverage["merged"] > 0 and report.coverage["shape_mismatch"] == 0
    ours, reference = _tensors(out), _tensors(demo.reference_hf["long"])
    assert set(ours) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(ours[key].float(), value.float(), rtol=1.6e-2, atol=1e-3, msg=key)
    model = AutoModel.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    loaded = model.state_dict()
    for key, value in ours.items():
        assert torch.equal(loaded[key].to(value.dtype), value), key


def test_demo_short_vs_long_differ_same_twice_identical(demo, tmp_path: Path) -> None:
    config = demo.training_config
    short = convert_checkpoint(demo.checkpoints["short"], demo.base_model, tmp_path / "s", training_config=config)
    long_a = convert_checkpoint(demo.checkpoints["long"], demo.base_model, tmp_path / "a", training_config=config)
    long_b = convert_checkpoint(demo.checkpoints["long"], demo.base_model, tmp_path / "b", training_config=config)
    assert short.fingerprint != long_a.fingerprint
    assert long_a.fingerprint == long_b.fingerprint
    diff = diff_weights(tmp_path / "s", tmp_path / "a")
    assert not diff.identical and diff.n_identical < len(diff.tensors)


def test_notebook_01_runs_with_papermill(demo, tmp_path: Path) -> None:
    import papermill
    import yaml

    params_path = tmp_path / "demo_convert.yaml"
    params_path.write_text(
        yaml.safe_dump(
            {
                "run_name": "nb01",
                "checkpoint": {
                    "path": str(demo.checkpoints["long"]),
                    "training_config": str(demo.training_config),
                    "base_model": str(demo.base_model),
                },
                "data": {"images": str(demo.images_dir), "annotations": str(demo.annotations)},
            }
        )
    )
    run_dir = tmp_path / "outputs" / "nb01"
    notebook = Path(__file__).resolve().parents[1] / "notebooks" / "01_convert.ipynb"
    executed = tmp_path / "01_convert.ipynb"
    papermill.execute_notebook(
        str(notebook),
        str(executed),
        cwd=str(notebook.parent),
        kernel_name="python3",
        parameters={"params_path": str(params_path), "run_dir": str(run_dir)},
        progress_bar=False,
    )
    record = json.loads((run_dir / "conversion.json").read_text())
    assert record["fingerprint"] and record["coverage"]["merged"] > 0 and (run_dir / "hf_model" / INDEX_NAME).is_file()
    text = executed.read_text()
    assert record["fingerprint"] in text and "Coverage" in text
    assert record["config_fingerprint"] in text and "train/loss" in text  # identity and meta/message_hub shown
    assert "Model folder check: OK" in text  # the doctor section
    # every section a reviewer needs is in the page itself, not only in conversion.json
    n_tensors = sum(c["n_tensors"] for c in record["components"].values())
    assert f"All {n_tensors} output tensors" in text and "LoRA merge" in text and "[SEG] token id" in text
    assert "training config" in text and "unchanged from the base N" in text
    assert "0.000 GB" not in text and "0.00 GB" not in text  # a 340 kB folder is stated in kB
