"""Bench: vesselnb's inference loop vs a bare ``predict_forward`` loop, and resuming a finished run vs its first run.

Same model object, same frames, same process; the two loops alternate (``--rounds`` times, one torch thread by
default) and the figure is the median of the per-round ratios: each round's two loops run back to back, so a burst
of load from other processes on a shared machine hits both sides of that ratio alike. The ratio of the fastest
rounds is printed too. The bare loop is
what a user would write: open the frame, call ``predict_forward``, keep the answer (thresholded masks: the demo
model, like upstream, returns nothing else). vesselnb's loop adds the logit capture (probability maps are stored
by default: one bilinear resize and a bit-for-bit check per ``[SEG]``), the status logic, the mask/probability PNGs and
the atomic record writes (in the store writer process), plus a fixed cost per run (waiting for the last sample's
write): runs use all 24 demo frames so that cost weighs as little as it does in a real run of hundreds of frames.
The writer process starts once per Python process and is reused; the first round pays its start-up, and its ratio
is printed separately (``first_round_ratio``) so that one-time cost is visible too.

    .venv/bin/python bench/bench_infer.py                       # demo model, demo frames
    .venv/bin/python bench/bench_infer.py --model HF_DIR --images FRAMES_DIR --frames 20

Peak memory is measured too: each side in a fresh process (RSS high-water mark, the store writer child added to
ours), against a bare loop under ``torch.no_grad()`` (upstream guards only ``generate``).

Ends with one JSON line per figure (ratio = ours / reference; lower is better).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from vesselnb.data import list_samples
from vesselnb.infer import infer_stage, load_model, run_inference
from vesselnb.params import DEFAULT_PROMPT, RunParams
from vesselnb.store import PredictionStore


def _demo_paths() -> tuple[Path, Path]:
    from vesselnb.demo import ensure_demo_assets

    assets = ensure_demo_assets(Path(__file__).resolve().parents[1] / "outputs" / "_demo_assets")
    reference = getattr(assets, "reference_hf", None) or {}
    return Path(reference.get("long", assets.base_model)), assets.images_dir


def bare_loop(loaded, samples, prompt: str, kwargs: dict, guarded: bool = True) -> float:
    """The reference: open, predict_forward, keep the output. Seconds. ``guarded=False``: no no_grad (memory probe)."""
    started = time.perf_counter()
    outputs = []
    for sample in samples:
        with Image.open(sample.image_path) as image:
            frame = image.convert("RGB")
        with torch.no_grad() if guarded else contextlib.nullcontext():  # upstream guards only generate()
            outputs.append(loaded.model.predict_forward(image=frame, text=prompt, tokenizer=loaded.tokenizer,
                                                        **kwargs))
    return time.perf_counter() - started


def ours_loop(loaded, samples, prompt: str, want_probability: bool, store_dir: Path) -> float:
    """vesselnb's loop into a fresh store. Seconds."""
    shutil.rmtree(store_dir, ignore_errors=True)
    store = PredictionStore.create_or_open(store_dir, fingerprint="bench", model_dir=loaded.hf_dir, prompt=prompt,
                                           mode="image", probability_maps=want_probability)
    started = time.perf_counter()
    run_inference(loaded, samples, store, prompt, "image", want_probability, set(), progress=False)
    return time.perf_counter() - started


def peak_rss_probe(which: str, model: Path, images: Path, frames: int, threads: int) -> None:
    """Run one loop in this (fresh) process and print its peak RSS in MB (the store writer child's added for ours)."""
    torch.set_num_threads(threads)
    samples = list_samples(images, limit=frames)
    loaded = load_model(model, device="cpu")
    kwargs = dict(loaded.probability.call_kwargs)
    if which in ("bare", "unguarded"):
        bare_loop(loaded, samples, DEFAULT_PROMPT, kwargs, guarded=which == "bare")
    else:
        with tempfile.TemporaryDirectory(prefix="vnb-bench-") as tmp:
            ours_loop(loaded, samples, DEFAULT_PROMPT, loaded.probability.available, Path(tmp) / "predictions")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"peak_rss_mb": round((own + children) / 1024, 1)}))


def peak_rss_mb(which: str, args: argparse.Namespace) -> float:
    """Peak RSS of one loop, each side in a fresh interpreter so neither inherits the other's high-water mark."""
    command = [sys.executable, __file__, "--probe", which, "--model", str(args.model), "--images", str(args.images),
               "--frames", str(args.frames), "--threads", str(args.threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(json.loads(output.strip().splitlines()[-1])["peak_rss_mb"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="HF folder (default: the demo reference model)")
    parser.add_argument("--images", type=Path, default=None, help="frames folder (default: the demo frames)")
    parser.add_argument("--frames", type=int, default=24, help="all 24 demo frames by default")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both loops")
    parser.add_argument("--probe", choices=["bare", "ours", "unguarded"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None or args.images is None:
        demo_model, demo_images = _demo_paths()
        args.model = args.model or demo_model
        args.images = args.images or demo_images
    if args.probe:
        peak_rss_probe(args.probe, args.model, args.images, args.frames, args.threads)
        return

    torch.set_num_threads(args.threads)
    samples = list_samples(args.images, limit=args.frames)
    loaded = load_model(args.model, device="cpu")
    want_probability = loaded.probability.available
    kwargs = dict(loaded.probability.call_kwargs)
    print(f"model {args.model}, {len(samples)} frames, probability maps: {want_probability}")
    bare_loop(loaded, samples[:2], DEFAULT_PROMPT, kwargs)  # warm-up (first-call setup, caches)

    figures = []
    with tempfile.TemporaryDirectory(prefix="vnb-bench-") as tmp:
        store_dir = Path(tmp) / "predictions"
        # The first pair: ours also captures and stores probability maps (the default); the second: masks only.
        variants = [("infer_loop_vs_bare_predict_forward", want_probability, kwargs),
                    ("infer_loop_vs_bare_predict_forward_masks_only", False, {})]
        for name, with_probability, call_kwargs in variants:
            bare, ours = [], []
            for round_index in range(args.rounds):
                bare.append(bare_loop(loaded, samples, DEFAULT_PROMPT, call_kwargs))
                ours.append(ours_loop(loaded, samples, DEFAULT_PROMPT, with_probability, store_dir))
                print(f"{name} round {round_index}: bare {bare[-1]:.3f} s, vesselnb {ours[-1]:.3f} s")
            figures.append({
                "bench": name, "ratio": round(statistics.median(o / b for o, b in zip(ours, bare, strict=True)), 4),
                "target": 1.05, "min_ratio": round(min(ours) / min(bare), 4),
                "first_round_ratio": round(ours[0] / bare[0], 4),
                "statistic": "median of paired round ratios (wall)", "probability_maps_stored": with_probability,
                "ms_per_frame_bare": round(1000 * statistics.median(bare) / len(samples), 2),
                "ms_per_frame_ours": round(1000 * statistics.median(ours) / len(samples), 2), "frames": len(samples),
            })

        params = RunParams(run_name="bench", hf_model=args.model)
        params.data.images = args.images
        params.data.limit = args.frames
        params.inference.device = "cpu"
        run_dir = Path(tmp) / "run"
        started = time.perf_counter()
        infer_stage(params, run_dir, progress=False)
        first = time.perf_counter() - started
        started = time.perf_counter()
        resumed = infer_stage(params, run_dir, progress=False)
        again = time.perf_counter() - started
        assert resumed.stats.n_run == 0, "a finished run must predict nothing when resumed"
        print(f"infer_stage first run {first:.2f} s (incl. model load), resume of the finished run {again:.3f} s")
    figures.append({"bench": "infer_resume_finished_vs_first_run", "ratio": round(again / first, 4),
                    "target": 0.02, "resume_s": round(again, 3), "first_s": round(first, 3)})
    # Peak memory: a bare no-grad loop vs ours, interleaved, each in a fresh process; the smaller of 2 per side.
    bare_mb, ours_mb = [], []
    for _ in range(2):
        bare_mb.append(peak_rss_mb("bare", args))
        ours_mb.append(peak_rss_mb("ours", args))
    unguarded_mb = peak_rss_mb("unguarded", args)  # context: the same bare loop without no_grad
    print(f"peak RSS: bare no-grad loop {bare_mb} MB, vesselnb loop {ours_mb} MB, unguarded bare {unguarded_mb} MB")
    figures.append({"bench": "infer_peak_rss_vs_bare_no_grad", "ratio": round(min(ours_mb) / min(bare_mb), 4),
                    "target": 1.10, "bare_mb": min(bare_mb), "ours_mb": min(ours_mb), "frames": len(samples),
                    "unguarded_bare_mb": unguarded_mb,
                    "statistic": "min over 2 fresh processes per side (ru_maxrss; the store writer child, still "
                                 "running, is not counted)"})
    for figure in figures:
        print(json.dumps(figure))


if __name__ == "__main__":
    main()
