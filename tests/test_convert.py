"""Conversion on small real models: LoRA merge vs peft, layouts, every refusal, resume, fingerprints, diff."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from _convert_fixtures import (
    LORA_TARGETS,
    load_hf,
    make_base_folder,
    make_training_checkpoint,
    write_training_config,
)
from safetensors.torch import load_file

from vesselnb.convert import convert_checkpoint, convert_stage, diff_weights
from vesselnb.convert.coverage import ConversionReport
from vesselnb.convert.hf_folder import declared_dtypes
from vesselnb.convert.training_config import read_training_config
from vesselnb.convert.writer import FREE_BYTES_ENV, KILL_AFTER_ENV
from vesselnb.errors import CheckpointError, ConversionError
from vesselnb.fingerprint import INDEX_NAME, SHARD_HASHES_KEY, file_digest, weights_fingerprint
from vesselnb.params import CheckpointParams, RunParams

SHARD = "20KB"  # several output shards for a ~55 KB model


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("convert")
    base = make_base_folder(root / "base")
    config = write_training_config(root / "sa2va_tiny.py", base)
    ckpt_a = make_training_checkpoint(base, root / "work_dirs" / "tiny" / "iter_10.pth", seed=1)
    ckpt_b = make_training_checkpoint(base, root / "work_dirs" / "tiny" / "iter_20.pth", seed=2)
    (root / "work_dirs" / "tiny" / "last_checkpoint").write_text(str(ckpt_b.path))
    out_a = root / "out_a"
    report_a = convert_checkpoint(ckpt_a.path, base, out_a, training_config=config, shard_size=SHARD)
    return {
        "root": root,
        "base": base,
        "config": config,
        "a": ckpt_a,
        "b": ckpt_b,
        "out_a": out_a,
        "report_a": report_a,
    }


def _assert_state_equal(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    state = load_hf(folder, torch.bfloat16).state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, msg=key)


def test_round_trip_equals_peft_merge_and_loads_with_remote_code(world: dict) -> None:
    from transformers import AutoModel, AutoTokenizer

    out = world["out_a"]
    _, info = AutoModel.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _assert_state_equal(out, world["a"].expected)  # our merge == peft merge_and_unload of the same adapter
    report = world["report_a"]
    n_lora_modules = 2 * len(LORA_TARGETS)  # 2 layers
    assert report.coverage["merged"] == 2 * n_lora_modules
    assert report.coverage["only_in_checkpoint"] == report.coverage["shape_mismatch"] == 0
    assert report.coverage["superseded"] == 2  # embed_tokens / lm_head original_module: the trained copy won
    assert sum(report.coverage.values()) == len(report.fates)
    assert report.lora["scale"] == 2.0
    sources = report.provenance_table.groupby("source").size().to_dict()
    assert sources["lora_merged"] == n_lora_modules and sources["base"] > 0
    assert report.components["vision"]["rel_change"] == 0.0 and report.components["llm"]["rel_change"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["template"] == "qwen_chat"  # from the training config
    assert config["llm_config"]["vocab_size"] == len(AutoTokenizer.from_pretrained(out))
    assert config["torch_dtype"] == "bfloat16"
    assert {p.name for p in world["base"].glob("*.py")} <= {p.name for p in out.glob("*.py")}


def test_index_records_shard_hashes_and_dtype(world: dict) -> None:
    out = world["out_a"]
    index = json.loads((out / INDEX_NAME).read_text())
    hashes = index["metadata"][SHARD_HASHES_KEY]
    assert len(hashes) > 1
    for name, digest in hashes.items():
        assert xxhash.xxh3_128_hexdigest((out / name).read_bytes()) == digest == file_digest(out / name)
        assert all(t.dtype == torch.bfloat16 for t in load_file(out / name).values())
    assert world["report_a"].fingerprint == weights_fingerprint(out)


def test_fp32_on_request(world: dict, tmp_path: Path) -> None:
    report = convert_checkpoint(
        world["a"].path,
        world["base"],
        tmp_path / "fp32",
        training_config=world["config"],
        dtype="fp32",
        shard_size=SHARD,
    )
    tensors = load_file(next((tmp_path / "fp32").glob("model-*.safetensors")))
    assert all(t.dtype == torch.float32 for t in tensors.values())

    def total(folder: Path) -> int:
        return json.loads((folder / INDEX_NAME).read_text())["metadata"]["total_size"]

    assert total(tmp_path / "fp32") == 2 * total(world["out_a"])  # every tensor here is floating point
    assert report.output_bytes > world["report_a"].output_bytes
    # Every place the base's config states a dtype (transformers >= 4.56 writes "dtype" and reads it first) now says
    # float32, so torch_dtype="auto" loads the weights as they are stored, not in the base's bf16.
    base_places = declared_dtypes(json.loads((world["base"] / "config.json").read_text()))
    places = declared_dtypes(json.loads((tmp_path / "fp32" / "config.json").read_text()))
    assert set(base_places) <= set(places) and set(places.values()) == {"float32"}
    assert {p.dtype for p in load_hf(tmp_path / "fp32", "auto").parameters()} == {torch.float32}

    def again() -> ConversionReport:
        return convert_checkpoint(
            world["a"].path, world["base"], tmp_path / "fp32", training_config=world["config"], dtype="fp32",
            shard_size=SHARD,
        )

    assert again().skipped  # same inputs: not redone...
    config = json.loads((tmp_path / "fp32" / "config.json").read_text())
    (tmp_path / "fp32" / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))  # as before the fix
    redone = again()  # ...unless its config states another dtype than its weights: converted again, said so
    assert not redone.skipped and any("converted again" in note for note in redone.notes)
    assert set(declared_dtypes(json.loads((tmp_path / "fp32" / "config.json").read_text())).values()) == {"float32"}


def test_same_checkpoint_twice_same_fingerprint_other_checkpoint_differs(world: dict, tmp_path: Path) -> None:
    again = convert_checkpoint(
        world["a"].path, world["base"], tmp_path / "again", training_config=world["config"], shard_size=SHARD
    )
    other = convert_checkpoint(
        world["b"].path, world["base"], tmp_path / "b", training_config=world["config"], shard_size=SHARD
    )
    assert again.fingerprint == world["report_a"].fingerprint
    assert other.fingerprint != world["report_a"].fingerprint
    diff = diff_weights(tmp_path / "again", world["out_a"])
    assert diff.identical and diff.n_identical == len(diff.tensors)
    diff = diff_weights(world["out_a"], tmp_path / "b")
    assert not diff.identical
    table = diff.component_table.set_index("component")
    assert table.loc["vision", "n_identical"] == table.loc["vision", "n_tensors"]  # frozen part untouched
    assert table.loc["llm", "rel_norm"] > 0


def test_diff_training_checkpoint_vs_hf_folder_on_mapped_names(world: dict) -> None:
    diff = diff_weights(world["a"].path, world["out_a"])
    names = set(diff.tensors["hf_key"])
    assert "mlp1.1.weight" in names and "grounding_encoder.sam2_model.memory_encoder.fuser.layers.0.g_weight" in names
    rows = diff.tensors.set_index("hf_key")
    assert bool(rows.loc["mlp1.1.weight", "identical"])  # copied verbatim in bf16
    assert any(".lora_A" in k for k in diff.only_in_a)  # LoRA factors have no HF counterpart: listed, not hidden


def test_work_dir_last_checkpoint_and_deepspeed_folder(world: dict, tmp_path: Path) -> None:
    via_dir = convert_checkpoint(
        world["root"] / "work_dirs" / "tiny",
        world["base"],
        tmp_path / "wd",
        training_config=world["config"],
        shard_size=SHARD,
    )
    assert via_dir.source["file"] == str(world["b"].path)
    ds_path = tmp_path / "iter_20_ds.pth"
    from _convert_fixtures import _save

    _save(world["b"].state_dict, ds_path, "deepspeed")
    via_ds = convert_checkpoint(
        ds_path, world["base"], tmp_path / "ds", training_config=world["config"], shard_size=SHARD
    )
    assert via_ds.source["layout"] == "deepspeed"
    assert via_ds.fingerprint == via_dir.fingerprint


def test_zero3_partitioned_folder_says_how_to_consolidate(world: dict, tmp_path: Path) -> None:
    folder = tmp_path / "iter_5.pth"
    folder.mkdir()
    torch.save({"optimizer_state_dict": {}}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match="zero_to_fp32"):
        convert_checkpoint(folder, world["base"], tmp_path / "out", training_config=world["config"])
    assert not (tmp_path / "out").exists()


def test_26b_pretrained_into_8b_shape_mismatch_refused(world: dict, tmp_path: Path) -> None:
    big = {
        "text_hidden_fcs.0.weight": torch.zeros(48, 48, dtype=torch.bfloat16),
        "text_hidden_fcs.0.bias": torch.zeros(48, dtype=torch.bfloat16),
        "mllm.model.vision_model.embeddings.weight": torch.ones(16, 16, dtype=torch.bfloat16),  # fits: taken
    }
    pretrained = tmp_path / "sa2va_26b.pth"
    torch.save(big, pretrained)
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"text_hidden_fcs\.0\.weight.*\[48, 48\] vs base \[32, 32\]"):
        convert_checkpoint(
            world["a"].path, world["base"], out, training_config=world["config"], pretrained_pth=pretrained
        )
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    report = convert_checkpoint(
        world["a"].path,
        world["base"],
        out,
        training_config=world["config"],
        pretrained_pth=pretrained,
        allow_shape_mismatch=True,
        shard_size=SHARD,
    )
    assert report.coverage["shape_mismatch"] == 2 and any("shape mismatch" in w for w in report.warnings)
    assert "#b00020" in report._repr_html_()  # red banner
    rows = report.provenance_table.set_index("hf_key")
    assert rows.loc["vision_model.embeddings.weight", "source"] == "pretrained"
    assert rows.loc["text_hidden_fcs.0.weight", "source"] == "checkpoint"  # the checkpoint still wins
    weights = load_hf(out).state_dict()
    assert torch.equal(weights["vision_model.embeddings.weight"], torch.ones(16, 16))


def test_missing_lora_half_and_unknown_key_refused(world: dict, tmp_path: Path) -> None:
    state = dict(world["a"].state_dict)
    dropped = next(k for k in state if k.endswith("layers.1.mlp.down_proj.lora_B.default.weight"))
    del state[dropped]
    state["mllm.model.language_model.base_model.model.model.extra_head.weight"] = torch.zeros(2, 2)
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ConversionError) as info:
        convert_checkpoint(path, world["base"], tmp_path / "out", training_config=world["config"])
    assert "layers.1.mlp.down_proj" in str(info.value) and "extra_head" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_lora_alpha_required_without_config_and_rank_checked(world: dict, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="lora_alpha is unknown"):
        convert_checkpoint(world["a"].path, world["base"], tmp_path / "out")
    with pytest.raises(ConversionError, match="rank 4"):
        convert_checkpoint(world["a"].path, world["base"], tmp_path / "out", lora_r=8, lora_alpha=16)
    report = convert_checkpoint(
        world["a"].path, world["base"], tmp_path / "out", lora_r=4, lora_alpha=8, shard_size=SHARD
    )
    assert report.fingerprint == world["report_a"].fingerprint  # config template differs only in config.json


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # executed by an unsafe unpickler: creates the marker file
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_refused_without_running_it(world: dict, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": dict(world["a"].state_dict), "meta": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="trust-pickle"):
        convert_checkpoint(path, world["base"], tmp_path / "out", training_config=world["config"])
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_truncated_checkpoint_refused(world: dict, tmp_path: Path) -> None:
    data = world["a"].path.read_bytes()
    path = tmp_path / "iter_10.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        convert_checkpoint(path, world["base"], tmp_path / "out", training_config=world["config"])
    assert not (tmp_path / "out").exists()


def test_too_little_disk_refused_with_bytes(world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FREE_BYTES_ENV, "10000")
    with pytest.raises(ConversionError, match=r"needs at most [\d,]+ bytes .* but 10,000 bytes"):
        convert_checkpoint(world["a"].path, world["base"], tmp_path / "out", training_config=world["config"])
    assert not (tmp_path / "out").exists()


def test_unchanged_checkpoint_warns_loudly(world: dict, tmp_path: Path) -> None:
    untrained = make_training_checkpoint(world["base"], tmp_path / "iter_0.pth", seed=3, trained=False)
    report = convert_checkpoint(
        untrained.path, world["base"], tmp_path / "out", training_config=world["config"], shard_size=SHARD
    )
    assert any("CHANGES NOTHING" in w for w in report.warnings)


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vesselnb.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


@pytest.mark.slow  # two `vesselnb` subprocesses (~20 s: the CLI imports every stage)
def test_killed_conversion_leaves_no_folder_and_resumes(world: dict, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    args = [
        "convert",
        str(world["a"].path),
        "--base",
        str(world["base"]),
        "--config",
        str(world["config"]),
        "--out",
        str(out),
        "--shard-size",
        SHARD,
    ]
    killed = _cli(*args, env={KILL_AFTER_ENV: "2"})
    assert killed.returncode == -9
    assert not out.exists()
    partial = list(tmp_path.glob(".hf.partial-*"))
    assert len(partial) == 1 and len(list(partial[0].glob("model-*.safetensors"))) == 2
    resumed = _cli(*args, "--json")
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads(resumed.stdout)
    assert any("resumed: 2 of" in n for n in record["notes"])
    assert record["fingerprint"] == world["report_a"].fingerprint
    assert not list(tmp_path.glob(".hf.partial-*"))


def test_cli_error_is_one_line_and_exit_2(world: dict, tmp_path: Path) -> None:
    result = _cli("convert", str(tmp_path / "nope.pth"), "--base", str(world["base"]), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "checkpoint not found" in result.stderr and "Traceback" not in result.stderr
    result = _cli("diff", str(world["out_a"]), str(world["a"].path))
    assert result.returncode == 0 and "weights differ" in result.stdout


def test_training_config_read_without_importing(tmp_path: Path) -> None:
    config = read_training_config(write_training_config(tmp_path / "c.py", Path("/base"), r=64, alpha=128))
    assert (config.lora_r, config.lora_alpha, config.lora_scale) == (64, 128.0, 2.0)
    assert config.template == "qwen_chat" and config.base_model_path == "/base" and "[SEG]" in config.special_tokens
    assert "xtuner" not in sys.modules


def test_stage_writes_conversion_json_reuses_and_flags_identical_runs(world: dict, tmp_path: Path) -> None:
    def params(path: Path) -> RunParams:
        return RunParams(
            run_name="r",
            checkpoint=CheckpointParams(
                path=path, base_model=world["base"], training_config=world["config"], shard_size=SHARD
            ),
        )

    first = convert_stage(params(world["a"].path), tmp_path / "run_a")
    record = json.loads((tmp_path / "run_a" / "conversion.json").read_text())
    assert record["fingerprint"] == first.fingerprint == world["report_a"].fingerprint
    assert record["source"]["bytes"] == world["a"].path.stat().st_size and record["coverage"]["merged"] > 0
    again = convert_stage(params(world["a"].path), tmp_path / "run_a")
    assert again.skipped and "same inputs" in again.skipped
    # another run whose checkpoint is a copy under another name: same weights -> loud warning naming run_a
    copy = tmp_path / "iter_99.pth"
    copy.write_bytes(world["a"].path.read_bytes())
    twin = convert_stage(params(copy), tmp_path / "run_twin")
    assert any("IDENTICAL WEIGHTS" in w and "run_a" in w for w in twin.warnings)
    given = convert_stage(RunParams(hf_model=world["out_a"]), tmp_path / "run_given")
    assert given.skipped and given.fingerprint == world["report_a"].fingerprint
    html = twin._repr_html_()
    assert "IDENTICAL WEIGHTS" in html and "#b00020" in html
    assert not twin.coverage_table.empty and not twin.component_table.empty


def test_real_small_tmpfs_refused_before_writing(world: dict, tmp_path: Path) -> None:
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); the env-var test covers it")
    try:
        with pytest.raises(ConversionError, match="not enough disk space"):
            convert_checkpoint(world["a"].path, world["base"], mount_point / "hf", training_config=world["config"])
        assert list(mount_point.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_trust_pickle_flag_really_runs_the_pickle(world: dict, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": dict(world["a"].state_dict), "meta": _Payload(marker)}, path)
    report = convert_checkpoint(
        path, world["base"], tmp_path / "out", training_config=world["config"], trust_pickle=True, shard_size=SHARD
    )
    assert marker.exists()  # the risk the flag names
    assert report.fingerprint == world["report_a"].fingerprint


def test_embedding_lora_merge_matches_peft() -> None:
    from peft import LoraConfig, get_peft_model

    from vesselnb.convert.converter import _merge_lora
    from vesselnb.convert.keymap import parse_training_key

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(40, 12)

    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=12, target_modules=["emb"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_embedding" in name:
                param.copy_(torch.randn_like(param))
    state = model.state_dict()
    a_key = next(k for k in state if "lora_embedding_A" in k)
    b_key = next(k for k in state if "lora_embedding_B" in k)
    assert parse_training_key(a_key).role == "lora_embedding_A"
    base = next(v for k, v in state.items() if k.endswith("emb.base_layer.weight")).clone()
    ours = torch.empty_like(base)
    _merge_lora(base, state[a_key], state[b_key], 12 / 4, True, ours)
    merged = model.merge_and_unload().emb.weight.detach()
    torch.testing.assert_close(ours, merged)


@pytest.mark.parametrize("native_bf16", [True, False], ids=["fused_bf16_addmm", "blocked_fp32"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_lora_merge_rounds_once_from_fp32(
    out_dtype: torch.dtype, native_bf16: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both merge routes (fused bf16 addmm where the CPU has bf16 units; fp32 row blocks otherwise) equal the fp32
    merge rounded once, up to one unit in the last place from the order of accumulation, and measure |W|^2 and
    |scale B A|^2."""
    from vesselnb.convert import converter
    from vesselnb.convert.converter import _merge_lora

    if native_bf16 and not converter._native_bf16_matmul():
        pytest.skip("this CPU has no native bf16 matmul; the fused route is never taken here")
    monkeypatch.setattr(converter, "_NATIVE_BF16", native_bf16)
    monkeypatch.setattr(converter, "_BLOCK_ELEMENTS", 96 * 7)  # several row blocks, the last one short

    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(300, 96, generator=generator) * 0.02).bfloat16()
    a = (torch.randn(8, 96, generator=generator) * 0.02).bfloat16()
    b = (torch.randn(300, 8, generator=generator) * 0.02).bfloat16()
    exact = weight.double() + 2.5 * (b.double() @ a.double())
    out = torch.empty(weight.shape, dtype=out_dtype)
    merged = _merge_lora(weight, a, b, 2.5, False, out)
    reference = exact.to(out_dtype)
    if out_dtype == torch.bfloat16:  # fp32 accumulation error is far below a bf16 ulp: at most one ulp off
        ulp = torch.finfo(out_dtype).eps * reference.abs().double()
        assert ((out.double() - reference.double()).abs() <= ulp).all()
        assert (out != reference).float().mean() < 0.01
    else:
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-7)
    assert merged.delta_sq == pytest.approx(float(((exact - weight.double()) ** 2).sum()), rel=1e-5)
    assert merged.weight_sq == pytest.approx(float((weight.double() ** 2).sum()), rel=1e-5)


@pytest.mark.parametrize(
    ("direct", "placed"), [(True, False), (True, True), (False, False)], ids=["direct_io", "zero_copy", "page_cache"]
)
def test_written_shard_digest_is_the_files_and_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: bool, placed: bool
) -> None:
    """The digest is taken from the bytes as they are written, in slices: it must be the XXH3-128 of the file on
    disk, through direct I/O (aligned buffers in turn, the last one padded, the file cut to size; or, for memory
    placed by ``aligned_empty``, whole blocks straight from it and only its ends copied) and through the page
    cache, also for tensors spanning several buffers and an empty one."""
    from vesselnb.convert import writer
    from vesselnb.convert.timing import PhaseClock
    from vesselnb.convert.writer import (
        NO_DIRECT_ENV,
        SHARD_METADATA,
        _DirectSink,
        _open_sink,
        aligned_empty,
        data_offsets,
        write_safetensors,
    )

    generator = torch.Generator().manual_seed(0)
    tensors = {
        "first": torch.arange(63, dtype=torch.float32),  # the next tensor starts mid-block
        "empty": torch.zeros(0, 3),
        "big": torch.randn(3 << 16, generator=generator).bfloat16(),  # 384 KB
        "odd": torch.randn(100_001, generator=generator).bfloat16(),  # ends mid-block
        "last": torch.ones(4, 8, dtype=torch.bfloat16),
    }
    path = tmp_path / "shard.safetensors"
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    if placed:  # as the converter's merge outputs are: at their file offset's place within a block
        for (key, tensor), offset in zip(list(tensors.items()), data_offsets(specs, SHARD_METADATA), strict=True):
            memory, _ = aligned_empty(tensor.numel() * tensor.element_size(), offset)
            tensors[key] = memory.view(tensor.dtype).view(tensor.shape).copy_(tensor)
    staged: list[int] = []
    stage = _DirectSink._stage
    monkeypatch.setattr(_DirectSink, "_stage", lambda self, flat: (staged.append(flat.numel()), stage(self, flat)))
    monkeypatch.setattr(writer, "_SLICE", 1 << 15)  # several slices per tensor
    monkeypatch.setattr(writer, "_DIRECT_CHUNK", 1 << 16)  # several buffers per tensor
    monkeypatch.setattr(writer, "_MIN_ZERO_COPY", 1 << 16)  # "big" and "odd" are written from where they are
    if not direct:
        monkeypatch.setenv(NO_DIRECT_ENV, "1")
    sink = _open_sink(tmp_path / "probe", PhaseClock())
    sink.close()
    os.close(sink.fd)
    if direct and not isinstance(sink, _DirectSink):
        pytest.skip("this filesystem refuses O_DIRECT; the page-cache route is the one taken here")
    assert isinstance(sink, _DirectSink) == direct
    digest, keys = write_safetensors(path, specs, iter(tensors.items()), SHARD_METADATA)
    assert digest == xxhash.xxh3_128_hexdigest(path.read_bytes()) == file_digest(path)
    loaded = load_file(path)
    assert all(loaded[k].equal(v) for k, v in tensors.items())
    assert keys["big"] == {"dtype": "bfloat16", "shape": [3 << 16]}
    if direct:  # placed memory is written from where it is: only the ends of "big" and "odd" were copied
        assert (sum(staged) < path.stat().st_size / 4) == placed


def test_writer_is_done_with_a_tensor_before_the_producer_reuses_its_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The producer may be ``WRITE_DEPTH`` tensors ahead of the disk and reuses its output memory in turn
    (``WRITE_DEPTH + 1`` buffers, as the converter's ring): by the time a buffer comes round again, every byte of
    the tensor it held must be on the disk. Each write is slowed down, so a writer that let the producer run further
    ahead would put overwritten bytes into the file (checked: with one buffer fewer, most tensors come out wrong)."""
    from vesselnb.convert.timing import PhaseClock
    from vesselnb.convert.writer import (
        SHARD_METADATA,
        WRITE_DEPTH,
        _DirectSink,
        _open_sink,
        aligned_empty,
        data_offsets,
        write_safetensors,
    )

    probe = _open_sink(tmp_path / "probe", PhaseClock())
    probe.close()
    os.close(probe.fd)
    if not isinstance(probe, _DirectSink):
        pytest.skip("this filesystem refuses O_DIRECT: the page-cache writer copies every tensor before returning")
    real_pwrite = os.pwrite

    def slow_pwrite(fd: int, data: Any, offset: int) -> int:
        time.sleep(0.01)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", slow_pwrite)
    count, elements = 8, 1 << 18  # 512 KB each: written from where they are, not copied
    specs = [(f"t{i}", torch.bfloat16, (elements,)) for i in range(count)]
    ring: list[torch.Tensor | None] = [None] * (WRITE_DEPTH + 1)

    def produced() -> Iterator[tuple[str, torch.Tensor]]:
        for i, offset in enumerate(data_offsets(specs, SHARD_METADATA)):
            memory, ring[i % len(ring)] = aligned_empty(elements * 2, offset, ring[i % len(ring)])
            yield f"t{i}", memory.view(torch.bfloat16).fill_(i)

    path = tmp_path / "shard.safetensors"
    write_safetensors(path, specs, produced(), SHARD_METADATA)
    loaded = load_file(path)
    assert [i for i in range(count) if not loaded[f"t{i}"].eq(i).all()] == []


def test_tensors_made_ahead_on_workers_are_written_before_their_memory_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker threads make tensors ahead into output memory reused in turn, while earlier outputs are still on
    their way to the disk: with every direct write slowed down and every merge output written from where it is,
    the folder must hold the same tensors as a conversion without either (checked: with the ring one slot short,
    tensors come out overwritten). In fp32 every tensor is computed (merged or cast) into that memory."""
    from vesselnb.convert import writer

    base = make_base_folder(tmp_path / "base", hidden=128)  # 64-128 KB fp32 LoRA-merged tensors, 14 of them
    config = write_training_config(tmp_path / "cfg.py", base)
    checkpoint = make_training_checkpoint(base, tmp_path / "iter_5.pth", seed=5).path
    options = {"training_config": config, "shard_size": "1GB", "dtype": "fp32"}
    convert_checkpoint(checkpoint, base, tmp_path / "reference", **options)
    real_pwrite = os.pwrite

    def slow_pwrite(fd: int, data: Any, offset: int) -> int:
        time.sleep(0.005)
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", slow_pwrite)
    monkeypatch.setattr(writer, "_MIN_ZERO_COPY", writer.DIRECT_ALIGN)
    convert_checkpoint(checkpoint, base, tmp_path / "slow", **options)
    reference = load_file(next((tmp_path / "reference").glob("*.safetensors")))
    written = load_file(next((tmp_path / "slow").glob("*.safetensors")))
    assert sorted(key for key in reference if not written[key].equal(reference[key])) == []


def test_fingerprint_equals_a_fresh_recomputation_from_disk(
    world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fingerprint recorded while converting (digests taken as the bytes were written) equals the one computed
    from the finished files alone: a copy of the folder whose index lost the recorded digests is hashed from disk."""
    copy = tmp_path / "copy"
    shutil.copytree(world["out_a"], copy)
    index = json.loads((copy / INDEX_NAME).read_text())
    del index["metadata"][SHARD_HASHES_KEY]
    (copy / INDEX_NAME).write_text(json.dumps(index))
    monkeypatch.setenv("VESSELNB_CACHE_DIR", str(tmp_path / "cache"))  # no digest remembered from an earlier run
    assert weights_fingerprint(copy) == world["report_a"].fingerprint == weights_fingerprint(world["out_a"])


def test_writer_refuses_a_tensor_out_of_plan(tmp_path: Path) -> None:
    from vesselnb.convert.writer import write_safetensors

    specs = [("w", torch.float32, (2, 2))]
    with pytest.raises(ConversionError, match="planned"):
        write_safetensors(tmp_path / "s.safetensors", specs, iter([("w", torch.zeros(3, 2))]), {})


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_weights_refused_before_writing(world: dict, tmp_path: Path, bad_value: float) -> None:
    from vesselnb.convert.checkpoint import load_training_state_dict

    state, _ = load_training_state_dict(world["a"].path)
    state = {key: tensor.clone() for key, tensor in state.items()}
    lora_key = next(key for key in state if "lora_B" in key)
    state[lora_key].view(-1)[3] = bad_value
    path = tmp_path / "iter_99.pth"
    torch.save({"state_dict": state, "meta": {"iter": 99}}, path)
    with pytest.raises(ConversionError, match=rf"iter_99\.pth: 1 tensors hold NaN or inf values \({lora_key}\)"):
        convert_checkpoint(path, world["base"], tmp_path / "out", training_config=world["config"])
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_stage_report_sections_show_what_training_changed_lora_tokenizer_and_every_tensor(
    world: dict, tmp_path: Path
) -> None:
    """Notebook 01's sections, read as a reviewer would: nothing only in conversion.json, no name cut short."""
    from bs4 import BeautifulSoup
    from transformers import AutoTokenizer

    from vesselnb import htmlrepr as hr

    params = RunParams(run_name="r", checkpoint=CheckpointParams(
        path=world["a"].path, base_model=world["base"], training_config=world["config"], shard_size=SHARD))
    report = convert_stage(params, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "conversion.json").read_text())

    def text(page: str) -> str:
        return BeautifulSoup(page, "html.parser").get_text(" ")

    # the banner: the folder's size in a unit that keeps it readable, never "0.000 GB"
    banner = text(report._repr_html_())
    assert hr.size(report.output_bytes) in banner and "0.000 GB" not in banner and report.output_bytes < 1e6

    # LoRA: r, alpha and scale = alpha / r as the training config says; the merge count from coverage
    config = read_training_config(world["config"])
    cells = {row.th.get_text(strip=True): row.td.get_text(" ", strip=True)
             for row in BeautifulSoup(report.lora_tokenizer_html(), "html.parser").find_all("tr") if row.th}
    assert cells["r (rank)"] == str(config.lora_r) and cells["alpha"] == f"{config.lora_alpha:g}"
    assert cells["scale"].split()[0] == f"{config.lora_alpha / config.lora_r:g}"
    assert cells["pairs merged"].startswith(str(report.coverage["merged"] // 2))
    # tokenizer: [SEG]'s id and length as transformers reads the output folder; every added token with its id
    tokenizer = AutoTokenizer.from_pretrained(report.output_dir)
    assert cells["[SEG] token id"] == str(tokenizer.convert_tokens_to_ids("[SEG]"))
    assert cells["len(tokenizer)"] == str(len(tokenizer))
    for token, token_id in tokenizer.get_added_vocab().items():
        assert f"{token} {token_id}" in cells["added tokens (id)"]
    assert cells["special tokens of the training config"].endswith("all in the tokenizer")
    assert record["tokenizer"]["seg_id"] == tokenizer.convert_tokens_to_ids("[SEG]")

    # per component: what the config trained (LoRA r on the LLM, SAM2's decoder), checked against the checkpoint
    components = BeautifulSoup(report.components_html(), "html.parser")
    rows = {tr.find_all("td")[0].get_text(strip=True): [td.get_text(" ", strip=True) for td in tr.find_all("td")]
            for tr in components.find_all("tr") if tr.find_all("td")}
    llm = next(v for k, v in rows.items() if k.startswith("language model"))
    assert f"LoRA r={config.lora_r}" in llm[1] and llm[-1] == "✓ trained"
    sam2 = next(v for k, v in rows.items() if k.startswith("SAM2"))
    assert "mask decoder trained" in sam2[1] and sam2[-1] == "✓ trained"
    assert "unchanged from the base N" in components.get_text() and str(world["config"]) in components.get_text()
    assert record["expected_training"]["components"]["projector"]["trained"] is True

    # provenance: every output tensor named in full (in the <details> list), every one in exactly one group
    page = report.provenance_html()
    soup = BeautifulSoup(page, "html.parser")
    details = soup.find("details")
    listed = [tr.find_all("td")[0].get_text(strip=True) for tr in details.find_all("tr") if tr.find_all("td")]
    assert sorted(listed) == sorted(report.provenance_table["hf_key"]) and len(listed) > 10
    assert "…" not in page and "..." not in page
    grouped = soup.find_all("table")[0]
    counts = [int(tr.find_all("td")[2].get_text()) for tr in grouped.find_all("tr") if tr.find_all("td")]
    assert sum(counts) == len(listed) and len(counts) < len(listed)


def test_components_section_flags_a_part_the_config_froze_but_the_checkpoint_holds(world: dict, tmp_path: Path) -> None:
    """The config says SAM2's decoder was frozen, yet the checkpoint carries it: the report says they disagree."""
    from bs4 import BeautifulSoup

    config = tmp_path / "frozen_decoder.py"
    text = world["config"].read_text()
    config.write_text(text.replace("pretrained_pth=pretrained_pth,", "pretrained_pth=pretrained_pth,\n"
                                   "    frozen_sam2_decoder=True,"))
    assert read_training_config(config).frozen_sam2_decoder
    params = RunParams(run_name="r", checkpoint=CheckpointParams(
        path=world["a"].path, base_model=world["base"], training_config=config, shard_size=SHARD))
    report = convert_stage(params, tmp_path / "run")
    soup = BeautifulSoup(report.components_html(), "html.parser")
    rows = [[td.get_text(" ", strip=True) for td in tr.find_all("td")] for tr in soup.find_all("tr")]
    sam2 = next(row for row in rows if row and row[0].startswith("SAM2"))
    held = report.components["sam2"]["sources"]["checkpoint"]
    assert held > 0 and "frozen_sam2_decoder=True" in sam2[1]
    assert sam2[-1] == f"! frozen in the config, yet the checkpoint holds {held} of its tensors"


def test_hf_folder_doctests() -> None:
    import doctest

    from vesselnb.convert import hf_folder

    result = doctest.testmod(hf_folder)
    assert result.attempted > 0 and result.failed == 0
