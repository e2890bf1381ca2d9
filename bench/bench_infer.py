"""Bench: vesselnb's inference loop vs a bare ``predict_forward`` loop, and resuming a finished run vs its first run.

Same model object, same frames, same process; the two loops alternate (``--rounds`` times) and the fastest round of
each is compared (the minimum is the figure least disturbed by other load on a shared machine). Wall time with
one torch thread (``--threads``): on a shared 2-core machine the minimum over rounds is the least disturbed figure;
medians are printed too. The bare loop is
what a user would write: open the frame, call ``predict_forward`` (asking for probability maps too, since vesselnb
stores them by default), keep the answer. vesselnb's loop adds the status logic, the mask/probability PNGs and
the atomic record writes.

    .venv/bin/python bench/bench_infer.py                       # demo model, demo frames
    .venv/bin/python bench/bench_infer.py --model HF_DIR --images FRAMES_DIR --frames 20

Ends with one JSON line per figure (ratio = ours / reference; lower is better).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

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


def bare_loop(loaded, samples, prompt: str, kwargs: dict) -> float:
    """The reference: open, predict_forward, keep the output. Seconds."""
    started = time.perf_counter()
    outputs = []
    for sample in samples:
        with Image.open(sample.image_path) as image:
            frame = image.convert("RGB")
        outputs.append(loaded.model.predict_forward(image=frame, text=prompt, tokenizer=loaded.tokenizer, **kwargs))
    return time.perf_counter() - started


def ours_loop(loaded, samples, prompt: str, want_probability: bool, store_dir: Path) -> float:
    """vesselnb's loop into a fresh store. Seconds."""
    shutil.rmtree(store_dir, ignore_errors=True)
    store = PredictionStore.create_or_open(store_dir, fingerprint="bench", model_dir=loaded.hf_dir, prompt=prompt,
                                           mode="image", probability_maps=want_probability)
    started = time.perf_counter()
    run_inference(loaded, samples, store, prompt, "image", want_probability, set(), progress=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="HF folder (default: the demo reference model)")
    parser.add_argument("--images", type=Path, default=None, help="frames folder (default: the demo frames)")
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU time is summed over threads)")
    args = parser.parse_args()
    if args.model is None or args.images is None:
        demo_model, demo_images = _demo_paths()
        args.model = args.model or demo_model
        args.images = args.images or demo_images

    import torch

    torch.set_num_threads(args.threads)
    samples = list_samples(args.images, limit=args.frames)
    loaded = load_model(args.model, device="cpu")
    want_probability = loaded.probability.available
    kwargs = dict(loaded.probability.call_kwargs)
    print(f"model {args.model}, {len(samples)} frames, probability maps: {want_probability}")
    bare_loop(loaded, samples[:2], DEFAULT_PROMPT, kwargs)  # warm-up (first-call setup, caches)

    with tempfile.TemporaryDirectory(prefix="vnb-bench-") as tmp:
        store_dir = Path(tmp) / "predictions"
        bare, ours = [], []
        for round_index in range(args.rounds):
            bare.append(bare_loop(loaded, samples, DEFAULT_PROMPT, kwargs))
            ours.append(ours_loop(loaded, samples, DEFAULT_PROMPT, want_probability, store_dir))
            print(f"round {round_index}: bare {bare[-1]:.2f} s, vesselnb {ours[-1]:.2f} s ")
        loop_ratio = min(ours) / min(bare)

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

    print(json.dumps({"bench": "infer_loop_vs_bare_predict_forward", "ratio": round(loop_ratio, 4), "target": 1.05,
                      "ours_s": round(min(ours), 3), "bare_s": round(min(bare), 3),
                      "clock": "wall, min of rounds", "ours_median_s": round(statistics.median(ours), 3),
                      "bare_median_s": round(statistics.median(bare), 3),
                      "frames": len(samples)}))
    print(json.dumps({"bench": "infer_resume_finished_vs_first_run", "ratio": round(again / first, 4),
                      "target": 0.02, "resume_s": round(again, 3), "first_s": round(first, 3)}))


if __name__ == "__main__":
    main()
