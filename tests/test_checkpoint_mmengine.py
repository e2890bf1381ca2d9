"""Checkpoints written by mmengine itself (its ``save_checkpoint`` and a live ``MessageHub``) load by default, running
no code from the pickle; a pickle that uses ``getattr`` for anything else is refused and its payload never runs."""

from __future__ import annotations

import pickle
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from vesselnb.convert.checkpoint import HistoryBuffer, StatisticMethod, load_training_state_dict
from vesselnb.errors import CheckpointError

mmengine_checkpoint = pytest.importorskip("mmengine.runner.checkpoint")
mmengine_logging = pytest.importorskip("mmengine.logging")


def _write_mmengine_checkpoint(path: Path, losses: list[float]) -> dict[str, torch.Tensor]:
    """What mmengine's runner saves at iter N: meta, state_dict, a live MessageHub's state, param_schedulers."""
    hub = mmengine_logging.MessageHub.get_instance(f"vesselnb-test-{uuid.uuid4().hex}")
    for loss in losses:
        hub.update_scalar("train/loss", loss)
    hub.update_scalar("train/lr", 2e-5)
    hub.update_info("iter", len(losses))
    state_dict = {"mllm.model.mlp1.1.weight": torch.randn(4, 4), "text_hidden_fcs.0.0.bias": torch.randn(4)}
    checkpoint = {
        "meta": {"epoch": 0, "iter": len(losses), "time": time.strftime("%Y%m%d_%H%M%S"), "seed": 42},
        "state_dict": state_dict,
        "message_hub": hub.state_dict(),
        "param_schedulers": [{"base_values": [np.float64(2e-5)], "last_step": len(losses), "by_epoch": False,
                              "_get_lr_called_within_step": False}],
    }
    mmengine_checkpoint.save_checkpoint(checkpoint, str(path))
    return state_dict


def test_mmengine_written_checkpoint_loads_by_default(tmp_path) -> None:
    path = tmp_path / "iter_7.pth"
    written = _write_mmengine_checkpoint(path, [1.0 / (i + 1) for i in range(7)])
    assert "builtins.getattr" in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))  # the real format

    state_dict, source = load_training_state_dict(path)
    assert source.layout == "mmengine"
    assert set(state_dict) == set(written)
    for key, tensor in written.items():
        assert torch.equal(state_dict[key], tensor)


def test_history_buffer_statistics_come_back_as_names_only(tmp_path) -> None:
    path = tmp_path / "iter_3.pth"
    _write_mmengine_checkpoint(path, [0.9, 0.5, 0.25])
    from vesselnb.convert.checkpoint import _allowed_globals  # the loader's own allow-list, not a copy of it

    with torch.serialization.safe_globals(_allowed_globals()):
        raw = torch.load(path, map_location="cpu", weights_only=True)
    buffer = raw["message_hub"]["log_scalars"]["train/loss"]
    assert isinstance(buffer, HistoryBuffer)
    state = buffer._state
    assert list(np.asarray(state["_log_history"])) == [0.9, 0.5, 0.25]
    methods = state["statistics_methods"]
    assert {name: type(method) for name, method in methods.items()} == dict.fromkeys(methods, StatisticMethod)
    assert not any(callable(method) for method in methods.values())


class _FileWriter:
    """Pickles as ``getattr(numpy_array, "tofile")``: loading it with a plain unpickler yields a live method."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __call__(self, *args):  # the pickler only checks that the reduce callable is callable
        raise AssertionError("never called while pickling")

    def __reduce__(self):
        return getattr, (np.zeros(1), "tofile")


class _Gadget:
    """Pickles as ``getattr(array, "tofile")(path)``: a plain unpickler would write ``path``."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return _FileWriter(self.target), (str(self.target),)


def test_getattr_gadget_is_refused_and_never_runs(tmp_path) -> None:
    target = tmp_path / "payload-ran"
    path = tmp_path / "iter_1.pth"
    torch.save({"state_dict": {"w": torch.ones(1)}, "meta": {"evil": _Gadget(target)}}, path)
    with open(path, "rb") as handle:  # the gadget is real: a plain torch.load would run it
        assert b"tofile" in handle.read()

    with pytest.raises(CheckpointError, match=r"refused to load.*getattr"):
        load_training_state_dict(path)
    assert not target.exists()

    pickle.loads(pickle.dumps(_Gadget(target)))  # control: without our loader the payload does run
    assert target.exists()


@pytest.mark.parametrize("trust_pickle", [False, True])
def test_legacy_non_zip_checkpoint_loads(tmp_path, trust_pickle) -> None:
    path = tmp_path / "iter_2.pth"
    written = {"mllm.model.mlp1.1.weight": torch.randn(3, 3)}
    torch.save({"state_dict": written, "meta": {"iter": 2}}, path, _use_new_zipfile_serialization=False)
    state_dict, _ = load_training_state_dict(path, trust_pickle=trust_pickle)
    assert torch.equal(state_dict["mllm.model.mlp1.1.weight"], written["mllm.model.mlp1.1.weight"])


def test_truncated_checkpoint_is_one_clear_error(tmp_path) -> None:
    path = tmp_path / "iter_4.pth"
    _write_mmengine_checkpoint(path, [1.0, 0.5])
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"iter_4\.pth: cannot read this checkpoint.*truncated"):
        load_training_state_dict(path)
