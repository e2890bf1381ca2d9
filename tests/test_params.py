"""Params files: every mistake a user can make is refused with the key and the file named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vesselnb.errors import ParamsError
from vesselnb.params import DEFAULT_PROMPT, RunParams, load_params, parse_size

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def layout(tmp_path: Path) -> Path:
    """A params folder with an HF folder (config.json) and an image folder holding one frame beside it."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}", encoding="utf-8")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "Chen_Fang_0000103366__1-4_frame_000001.jpg").write_bytes(b"")
    return tmp_path


def write(folder: Path, text: str, name: str = "run.yaml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


VALID = "run_name: r1\nhf_model: hf\ndata:\n  images: images\n"


def test_valid_file_resolves_relative_paths_against_its_folder(layout: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir("/")  # the working directory must not matter (papermill runs from notebooks/)
    params = load_params(write(layout, VALID + "inference:\n  device: cpu\n"))
    assert params.hf_model == (layout / "hf").resolve()
    assert params.data.images == (layout / "images").resolve()
    assert params.inference.device == "cpu"
    assert params.inference.prompt == DEFAULT_PROMPT
    assert params.source_file == (layout / "run.yaml").resolve()


def test_run_name_defaults_to_file_stem(layout: Path) -> None:
    params = load_params(write(layout, "hf_model: hf\ndata:\n  images: images\n", name="iter_900.yaml"))
    assert params.run_name == "iter_900"


def test_to_dict_is_json_plain(layout: Path) -> None:
    import json

    data = load_params(write(layout, VALID)).to_dict()
    assert json.loads(json.dumps(data))["hf_model"] == str((layout / "hf").resolve())


def test_unknown_nested_key_names_key_and_file(layout: Path) -> None:
    path = write(layout, VALID + "inference:\n  promt: '<image>x'\n")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert "'inference.promt'" in message and str(path) in message and "prompt" in message


def test_unknown_top_level_key(layout: Path) -> None:
    path = write(layout, VALID + "checkpoints:\n  path: x\n")
    with pytest.raises(ParamsError, match=r"unknown key 'checkpoints'"):
        load_params(path)


@pytest.mark.parametrize(
    ("snippet", "key", "expected"),
    [
        ("data:\n  images: images\n  limit: ten\n", "data.limit", "integer"),
        ("inference:\n  probability_maps: 'y'\n", "inference.probability_maps", "true or false"),
        ("data:\n  images: images\ninference:\n  device: gpu\n", "inference.device", "one of"),
        ("data:\n  images: images\nanalysis:\n  threshold: high\n", "analysis.threshold", "number"),
        ("data:\n  images: images\nanalysis:\n  width_bins_px: 2\n", "analysis.width_bins_px", "list"),
        ("data: images\n", "data", "mapping"),
        ("data:\n  images: 5\n", "data.images", "path"),
    ],
)
def test_wrong_type_names_key_and_file(layout: Path, snippet: str, key: str, expected: str) -> None:
    path = write(layout, "run_name: r1\nhf_model: hf\n" + snippet)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert f"'{key}'" in message and str(path) in message and expected in message


def test_missing_path_names_key_file_and_path(layout: Path) -> None:
    path = write(layout, "run_name: r1\nhf_model: hf\ndata:\n  images: no_such_folder\n")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert "'data.images'" in message and str(path) in message and "no_such_folder" in message


def test_missing_path_not_checked_when_asked(layout: Path) -> None:
    params = load_params(write(layout, "run_name: r1\nhf_model: nowhere\ndata:\n  images: images\n"),
                         check_paths=False)
    assert params.hf_model == (layout / "nowhere").resolve()


def test_not_yaml(layout: Path) -> None:
    path = write(layout, "run_name: [unclosed\n  data: {\n")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert "not valid YAML" in str(info.value) and str(path) in str(info.value)


def test_empty_file_says_what_is_required(layout: Path) -> None:
    path = write(layout, "")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert str(path) in message and "'checkpoint.path'" in message and "'hf_model'" in message


def test_top_level_list_refused(layout: Path) -> None:
    with pytest.raises(ParamsError, match="mapping"):
        load_params(write(layout, "- a\n- b\n"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


@pytest.mark.parametrize("name", ["has space", "_demo_assets", "compare_a_vs_b", "../escape"])
def test_run_name_must_be_a_plain_folder_name(layout: Path, name: str) -> None:
    path = write(layout, f"run_name: {yaml.safe_dump(name).splitlines()[0]}\nhf_model: hf\ndata:\n  images: images\n")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert "'run_name'" in str(info.value) and str(path) in str(info.value)


def test_example_sa2va_8b_documents_a_real_layout() -> None:
    """The commented example must stay a valid schema (paths are the user's, so they are not checked)."""
    params = load_params(REPO / "params" / "example_sa2va_8b.yaml", check_paths=False)
    assert isinstance(params, RunParams)
    assert params.checkpoint.path is not None and params.checkpoint.path.name.startswith("iter_")
    assert params.checkpoint.training_config is not None and params.checkpoint.base_model is not None
    assert params.data.annotations is not None and params.data.images is not None
    assert params.inference.prompt == "<image>Please segment the blood vessel."
    assert params.checkpoint.dtype == "bf16"


@pytest.mark.parametrize("name", ["demo.yaml", "demo_long.yaml"])
def test_demo_params_schema(tmp_path: Path, name: str) -> None:
    """The demo files parse against the schema (without building the demo: that is the end-to-end test's job)."""
    raw = yaml.safe_load((REPO / "params" / name).read_text(encoding="utf-8"))
    assert raw.pop("demo_root") == "../outputs/_demo_assets"
    params = load_params(write(tmp_path, yaml.safe_dump(raw), name=name), check_paths=False)
    assert params.run_name == Path(name).stem
    assert params.iteration in (50, 400)
    assert params.checkpoint.path is not None and params.checkpoint.path.name == f"iter_{params.iteration}.pth"
    assert params.checkpoint.path.is_relative_to(tmp_path.parent / "outputs" / "_demo_assets")


# --- duplicate keys, sizes, folders and globs (issue 14) -------------------------------------------------------------
def test_duplicate_top_level_key_names_both_lines(layout: Path) -> None:
    path = write(layout, "run_name: r1\nhf_model: hf\ndata:\n  images: images\nrun_name: r2\n")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert str(path) in message and "'run_name'" in message and "lines 1 and 5" in message


def test_duplicate_nested_key_names_both_lines(layout: Path) -> None:
    path = write(layout, "run_name: r1\nhf_model: hf\ndata:\n  images: images\n  limit: 2\n  limit: 3\n")
    with pytest.raises(ParamsError, match=r"'limit' is given twice \(lines 5 and 6\)"):
        load_params(path)


def test_same_key_in_different_mappings_is_fine(layout: Path) -> None:
    text = VALID + "checkpoint:\n  dtype: bf16\ninference:\n  dtype: fp32\n"
    params = load_params(write(layout, text))
    assert params.checkpoint.dtype == "bf16" and params.inference.dtype == "fp32"


@pytest.mark.parametrize(
    ("given", "normalised", "nbytes"),
    [("70GiB", "70GiB", 70 * 2**30), ("80GB", "80GB", 80 * 10**9), ("80gb", "80GB", 80 * 10**9),
     ("1.5 GiB", "1.5GiB", int(1.5 * 2**30)), ("500MB", "500MB", 500 * 10**6)],
)
def test_memory_sizes_parsed_and_normalised(layout: Path, given: str, normalised: str, nbytes: int) -> None:
    params = load_params(write(layout, VALID + f"inference:\n  max_memory_per_gpu: '{given}'\n"))
    assert params.inference.max_memory_per_gpu == normalised
    assert parse_size(normalised) == nbytes
    # the normalised form is one accelerate's max_memory understands, with the same value
    from accelerate.utils import convert_file_size_to_int

    assert convert_file_size_to_int(normalised) == nbytes


@pytest.mark.parametrize(
    ("key", "snippet", "expected"),
    [("inference.max_memory_per_gpu", "inference:\n  max_memory_per_gpu: lots\n", "size such as 70GiB"),
     ("inference.max_memory_per_gpu", "inference:\n  max_memory_per_gpu: 70\n", "missing unit"),
     ("checkpoint.shard_size", "checkpoint:\n  shard_size: 5 gigs\n", "size such as"),
     ("checkpoint.shard_size", "checkpoint:\n  shard_size: true\n", "size such as")],
)
def test_bad_sizes_refused_naming_key_and_file(layout: Path, key: str, snippet: str, expected: str) -> None:
    path = write(layout, VALID + snippet)
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert f"'{key}'" in message and str(path) in message and expected in message


def test_image_glob_matching_nothing_refused_with_the_fix(layout: Path) -> None:
    for index in range(3):
        (layout / "images" / f"p_1__s_frame_{index:06d}.png").write_bytes(b"")
    path = write(layout, VALID + "  image_glob: '*.tif'\n")
    with pytest.raises(ParamsError) as info:
        load_params(path)
    message = str(info.value)
    assert "'data.image_glob'" in message and str(path) in message and "'*.tif'" in message
    assert "3 '*.png' files" in message  # the fix is in the message
    assert load_params(write(layout, VALID + "  image_glob: '*.png'\n")).data.image_glob == "*.png"


def test_empty_image_folder_refused(layout: Path) -> None:
    (layout / "empty").mkdir()
    path = write(layout, "run_name: r1\nhf_model: hf\ndata:\n  images: empty\n")
    with pytest.raises(ParamsError, match=r"matches no file .*holds no files"):
        load_params(path)


def test_images_must_be_a_folder_and_hf_model_an_hf_folder(layout: Path) -> None:
    (layout / "frames.zip").write_bytes(b"")
    with pytest.raises(ParamsError, match=r"'data.images' .* not a folder of frames"):
        load_params(write(layout, "hf_model: hf\ndata:\n  images: frames.zip\n"))
    (layout / "not_hf").mkdir()
    with pytest.raises(ParamsError, match=r"'hf_model' .* not a Hugging Face model folder \(no config.json\)"):
        load_params(write(layout, "hf_model: not_hf\ndata:\n  images: images\n"))


def test_bad_name_regex_refused_at_load(layout: Path) -> None:
    with pytest.raises(ParamsError, match=r"'data.name_regex' is not a valid regular expression"):
        load_params(write(layout, VALID + "  name_regex: '(?P<patient>'\n"))


def test_folder_checks_skipped_without_check_paths(layout: Path) -> None:
    params = load_params(write(layout, VALID + "  image_glob: '*.tif'\n"), check_paths=False)
    assert params.data.image_glob == "*.tif"
