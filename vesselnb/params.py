"""Run parameters: the schema of ``params/<run>.yaml``, loading and validation.

A params file says where one checkpoint and its data live and how to run each stage. It is validated up front so
that a typo fails in a second with the key and the file named, not an hour into a run.

Relative paths are resolved against the folder holding the params file, so a params file works from any working
directory (papermill runs notebooks from ``notebooks/``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from vesselnb.errors import ParamsError

DEFAULT_PROMPT = "<image>Please segment the blood vessel."
# Users' frame names: Chen_Fang_0000103366__1-4_1_04B2D3CF_frame_000034.jpg -> patient, id, sequence, frame.
DEFAULT_NAME_REGEX = r"^(?P<patient>.+?)_(?P<patient_id>\d+)__(?P<sequence>.+)_frame_(?P<frame>\d+)$"
# run_name becomes a folder under outputs/; "_..." (demo assets) and "compare_..." (comparisons) are reserved there.
RUN_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class LoraParams:
    """LoRA hyper-parameters; not stored in the .pth, so needed when no training config is given."""

    r: int | None = None
    alpha: float | None = None
    target_modules: list[str] | None = None


@dataclass
class CheckpointParams:
    """Stage 01: what to convert and how."""

    path: Path | None = None  # iter_N.pth, a work dir with last_checkpoint, or a DeepSpeed iter_N.pth/ folder
    training_config: Path | None = None  # the xtuner/mmengine config .py used for training
    base_model: Path | None = None  # the HF folder training started from
    pretrained_pth: Path | None = None  # optional flat state dict loaded before the checkpoint
    lora: LoraParams = field(default_factory=LoraParams)
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    shard_size: str = "5GB"
    hf_output: Path | None = None  # default: <run_dir>/hf_model
    allow_shape_mismatch: bool = False
    allow_missing: bool = False
    trust_pickle: bool = False  # load pickles that need classes outside the allow-list: runs arbitrary code
    check_free_space: bool = True
    allow_missing_components: bool = False  # trained parts absent from the checkpoint: take them from the base
    allow_frozen_mismatch: bool = False  # the checkpoint's frozen copies differ from the base given
    allow_other_base: bool = False  # the base given is not the one the training config names
    overwrite: bool = False  # replace an earlier conversion at hf_output


@dataclass
class DataParams:
    """Images and ground truth shared by inference (images only) and analysis (ground truth)."""

    images: Path | None = None
    annotations: Path | None = None
    annotation_format: Literal["auto", "sa2va", "labelme", "coco", "mask_png"] = "auto"
    # "union" = the users' cv2.fillPoly loop (every polygon filled, holes too); "even_odd" = inner polygons are holes.
    polygon_fill: Literal["union", "even_odd"] = "union"
    image_glob: str = "*.jpg"
    name_regex: str = DEFAULT_NAME_REGEX
    limit: int | None = None
    pixel_spacing_mm: float | None = None


@dataclass
class InferenceParams:
    """Stage 02: how to call ``predict_forward``."""

    prompt: str = DEFAULT_PROMPT
    strict_prompt: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    mode: Literal["image", "video"] = "image"
    probability_maps: bool = True
    max_memory_per_gpu: str | None = None
    # How >8-bit frames become 8 bit (vesselnb.frames): "auto" = a DICOM file's window centre/width, else min-max;
    # "minmax" = always min-max. Recorded per sample in the store.
    windowing: Literal["auto", "minmax"] = "auto"
    # Video mode: frames per model call (None = vesselnb.infer.DEFAULT_VIDEO_WINDOW: the most frames whose memory,
    # by the measured memory model in vesselnb.infer, fits 2 GiB in bf16; README "Video mode and memory") and
    # frames shared by consecutive windows.
    video_window: int | None = None
    video_overlap: int = 0


@dataclass
class AnalysisParams:
    """Stage 03: metrics and report settings."""

    threshold: float = 0.5
    nsd_tolerance_px: float = 2.0
    width_bins_px: list[float] = field(default_factory=lambda: [2.0, 5.0])
    gallery_k: int = 6
    bootstrap_samples: int = 1000
    max_error_rate: float = 0.05
    max_no_seg_rate: float = 0.05
    compare_to: list[Path] = field(default_factory=list)  # other run dirs whose predictions must not be identical
    primary_metric: str = "dice"  # the metric stage 04's verdict names first (every other one is still tested)
    min_patients: int = 10  # fewer patients: no confidence interval, per-patient values instead
    paired_test: Literal["wilcoxon", "permutation"] = "wilcoxon"  # on per-patient mean differences (stage 04)
    min_shared_fraction: float = 0.9  # stage 04 flags runs sharing fewer scored frames than this share of either


@dataclass
class ReportParams:
    """How the HTML reports and the index show patients (they get attached to reviews)."""

    pseudonymize: bool = True  # P01, P02, ... instead of names; the mapping stays in outputs/<run>/pseudonyms.csv


@dataclass
class RunParams:
    """One run: a checkpoint (or HF folder), its data, and stage settings."""

    run_name: str = ""
    description: str = ""
    demo_root: Path | None = None  # where `vesselnb demo`/`vesselnb run` build the demo assets (see vesselnb.demo)
    iteration: int | None = None  # training iteration, for curves across checkpoints
    hf_model: Path | None = None  # an already converted HF folder: skips stage 01
    checkpoint: CheckpointParams = field(default_factory=CheckpointParams)
    data: DataParams = field(default_factory=DataParams)
    inference: InferenceParams = field(default_factory=InferenceParams)
    analysis: AnalysisParams = field(default_factory=AnalysisParams)
    report: ReportParams = field(default_factory=ReportParams)
    source_file: Path | None = None  # set by load_params, not read from YAML

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (paths as strings) for manifests and papermill parameters."""
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | Path | None = None) -> RunParams:
        """The inverse of :meth:`to_dict` (e.g. a manifest's ``params``), with a YAML file's checks of keys and types.

        ``source`` names the file the dict came from in errors; paths are not checked for existence (an old run's
        inputs may be gone). Readers get the dataclass defaults, never restate them.
        """
        raw = dict(data)
        source_file = raw.pop("source_file", None)
        where = Path(source or source_file or "<params>").resolve()
        params = _build(cls, raw, prefix="", source=where)
        params.source_file = Path(source_file) if source_file else None
        return params


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# Keys holding a byte size ("70GiB", "80GB", "500MB" or a byte count); validated and normalised by load_params.
_SIZE_KEYS = ("checkpoint.shard_size", "inference.max_memory_per_gpu")

# Keys whose value must exist on disk once demo assets (if any) are built; None means "not given".
_PATHS_THAT_MUST_EXIST = (
    "hf_model",
    "checkpoint.path",
    "checkpoint.training_config",
    "checkpoint.base_model",
    "checkpoint.pretrained_pth",
    "data.images",
    "data.annotations",
)


def load_params(path: str | Path, check_paths: bool = True) -> RunParams:
    """Read and validate a params YAML file.

    Unknown keys, wrong types and (with ``check_paths``) paths that do not exist raise :class:`ParamsError`
    naming the key and the file. Nothing is built here: with ``demo_root`` set, the caller builds the demo assets
    first (``vesselnb demo``, ``vesselnb run``), and a missing demo path says so.
    """
    source = Path(path).resolve()
    if not source.is_file():
        raise ParamsError(f"{path}: params file not found (pass a YAML file such as params/demo.yaml)")
    try:
        raw = yaml.load(source.read_text(encoding="utf-8"), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except _DuplicateKey as dup:
        raise ParamsError(
            f"{source}: key '{dup.key}' is given twice (lines {dup.first_line} and {dup.second_line}); "
            "YAML would silently keep the last one: delete one of them"
        ) from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{source}: not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamsError(f"{source}: cannot read the params file ({exc}); check its permissions") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    params = _build(RunParams, raw, prefix="", source=source)
    params.source_file = source
    if not params.run_name:
        params.run_name = source.stem
    _check_values(params, source)
    if check_paths:
        _check_paths(params, source)
        _check_folders_and_globs(params, source)
    return params


def _build(cls: type, raw: dict[str, Any], prefix: str, source: Path) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source_file"}
    unknown = sorted(set(raw) - names)
    if unknown:
        key = prefix + unknown[0]
        raise ParamsError(
            f"{source}: unknown key '{key}'. Known keys here: {', '.join(sorted(names))}. "
            "Check the spelling or see params/example_sa2va_8b.yaml."
        )
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, prefix + name, source)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str, source: Path) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key, source)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ParamsError(f"{source}: key '{key}' must be a mapping, got {value!r}")
        return _build(hint, value, prefix=key + ".", source=source)
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{source}: key '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{source}: key '{key}' must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ParamsError(f"{source}: key '{key}' must be a path string, got {value!r}")
        candidate = Path(value).expanduser()
        return candidate if candidate.is_absolute() else (source.parent / candidate).resolve()
    if hint is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{source}: key '{key}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{source}: key '{key}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{source}: key '{key}' must be a number, got {value!r}")
        return float(value)
    if key in _SIZE_KEYS:
        return _size_value(value, key, source)
    if hint is str:
        if not isinstance(value, str):
            raise ParamsError(f"{source}: key '{key}' must be a string, got {value!r}")
        return value
    raise ParamsError(f"{source}: key '{key}' has an unsupported value {value!r}")  # pragma: no cover


def _lookup(params: RunParams, dotted: str) -> Any:
    value: Any = params
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _check_paths(params: RunParams, source: Path) -> None:
    for key in _PATHS_THAT_MUST_EXIST:
        value = _lookup(params, key)
        if value is not None and not Path(value).exists():
            fix = (f"Build the demo assets under {params.demo_root} first (`vesselnb demo`)"
                   if params.demo_root is not None and Path(value).is_relative_to(params.demo_root) else "Fix the path")
            raise ParamsError(f"{source}: key '{key}' points to {value}, which does not exist. {fix}.")
    if params.hf_model is None and params.checkpoint.path is None:
        raise ParamsError(f"{source}: give either 'checkpoint.path' (a training checkpoint) or 'hf_model'.")
    if params.data.images is None:
        raise ParamsError(f"{source}: key 'data.images' is required (the folder of frames to segment).")


def _check_values(params: RunParams, source: Path) -> None:
    if not RUN_NAME_PATTERN.match(params.run_name) or params.run_name.startswith("compare_"):
        raise ParamsError(
            f"{source}: key 'run_name' must be a plain folder name (letters, digits, '.', '_', '-', not starting "
            f"with '_' or 'compare_'), got {params.run_name!r}"
        )
    if "<image>" not in params.inference.prompt and params.inference.strict_prompt:
        raise ParamsError(
            f"{source}: key 'inference.prompt' has no '<image>' and strict_prompt is on; "
            f"Sa2VA needs it, e.g. {DEFAULT_PROMPT!r}"
        )
    if not 0.0 < params.analysis.threshold < 1.0:
        raise ParamsError(f"{source}: key 'analysis.threshold' must be between 0 and 1")
    if params.data.limit is not None and params.data.limit <= 0:
        raise ParamsError(f"{source}: key 'data.limit' must be a positive integer or null")
    try:
        re.compile(params.data.name_regex)
    except re.error as exc:
        raise ParamsError(f"{source}: key 'data.name_regex' is not a valid regular expression: {exc}") from None


# --- YAML with duplicate keys refused ------------------------------------------------------------------------------
class _DuplicateKey(yaml.YAMLError):
    """Raised while parsing: the same key twice in one mapping (plain YAML keeps the last one silently)."""

    def __init__(self, key: Any, first_line: int, second_line: int) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first_line, self.second_line = key, first_line, second_line


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping, with both line numbers."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor" may be overridden by explicit keys
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise _DuplicateKey(key, seen[key], line)
            if isinstance(key, (str, int, float, bool)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


# --- byte sizes ------------------------------------------------------------------------------------------------------
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1}
for _i, _prefix in enumerate("kmgt", start=1):
    _SIZE_UNITS[_prefix] = _SIZE_UNITS[_prefix + "b"] = 1000**_i
    _SIZE_UNITS[_prefix + "ib"] = 1024**_i
# Below this a size is surely a missing unit ("70" meant "70GiB"): no GPU or shard is a few hundred kilobytes.
_MIN_SIZE_BYTES = 2**20


def parse_size(text: str | int) -> int:
    """``"70GiB"`` -> 75161927680, ``"80GB"`` -> 80000000000 (GB = 10^9, GiB = 2^30, as transformers/accelerate).

    Units are case-insensitive and always bytes (``80Gb`` is 80 gigabytes: nobody sizes GPU memory in bits).
    Raises ``ValueError`` for anything else.
    """
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not a size")
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(str(text))
    if match is None:
        raise ValueError(f"{text!r} is not a size")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])


def _size_value(value: Any, key: str, source: Path) -> str:
    """A size key's value, checked and normalised to a form accelerate's ``max_memory`` also reads (``70GiB``)."""
    try:
        nbytes = parse_size(value)
    except ValueError:
        raise ParamsError(
            f"{source}: key '{key}' must be a size such as 70GiB, 80GB or 500MB, got {value!r}"
        ) from None
    if nbytes < _MIN_SIZE_BYTES:
        raise ParamsError(
            f"{source}: key '{key}' is {nbytes} bytes, surely a missing unit: write e.g. '{value}GiB' or '{value}GB'"
        )
    match = _SIZE_RE.match(str(value))
    unit = (match.group(2) or "").lower() if match and isinstance(value, str) else ""
    if unit in ("kib", "mib", "gib"):
        return f"{match.group(1)}{unit[0].upper()}iB"
    if unit in ("k", "kb", "m", "mb", "g", "gb"):
        return f"{match.group(1)}{unit[0].upper()}B"
    return f"{nbytes / 2**20:.6g}MiB" if nbytes % 2**20 else f"{nbytes // 2**20}MiB"


# --- folders and globs, checked before any stage runs -----------------------------------------------------------
def _check_folders_and_globs(params: RunParams, source: Path) -> None:
    """What a stage would otherwise find out an hour later: the frames folder holds frames, HF folders are HF."""
    images = params.data.images
    if images is not None:
        if not images.is_dir():
            raise ParamsError(f"{source}: key 'data.images' points to {images}, which is a file, not a folder of "
                              "frames. Point it at the folder holding the images.")
        if _first_match(images, params.data.image_glob) is None:
            raise ParamsError(f"{source}: key 'data.image_glob' {params.data.image_glob!r} matches no file in "
                              f"{images}{_glob_hint(images)}")
    for key in ("hf_model", "checkpoint.base_model"):
        folder = _lookup(params, key)
        if folder is not None and not (Path(folder) / "config.json").is_file():
            raise ParamsError(f"{source}: key '{key}' points to {folder}, which is not a Hugging Face model folder "
                              "(no config.json). Point it at the folder holding config.json and the safetensors.")
    config = params.checkpoint.training_config
    if config is not None and not config.is_file():
        raise ParamsError(f"{source}: key 'checkpoint.training_config' points to {config}, which is not a file "
                          "(give the training config .py)")
    for index, run_dir in enumerate(params.analysis.compare_to):
        if not Path(run_dir).is_dir():
            raise ParamsError(f"{source}: key 'analysis.compare_to[{index}]' points to {run_dir}, which is not a "
                              "run folder. Fix the path or remove the entry.")


def _first_match(folder: Path, pattern: str) -> Path | None:
    """The first file matching ``pattern``; stops at the first hit, so a folder of 100k frames costs nothing."""
    try:
        return next((p for p in folder.glob(pattern) if p.is_file()), None)
    except (OSError, ValueError):
        return None


def _glob_hint(folder: Path) -> str:
    """What the folder does hold, so the fix is in the message (e.g. the frames are .png, not .jpg)."""
    suffixes: dict[str, int] = {}
    for count, entry in enumerate(folder.iterdir()):
        if count >= 10000:
            break
        if entry.is_file() and entry.suffix:
            suffixes[entry.suffix] = suffixes.get(entry.suffix, 0) + 1
    if not suffixes:
        return " (the folder holds no files). Fix 'data.images'."
    common = max(suffixes, key=lambda s: suffixes[s])
    return f" (it holds {suffixes[common]} '*{common}' files). Set 'data.image_glob: \"*{common}\"'."
