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

``--side-by-side`` is the end-to-end figure on any HF folder (issue 13's bar: ≤ 1.10× memory, ≤ 1.05× time): the
real ``vesselnb infer`` command against a bare script that loads the folder with ``AutoModel.from_pretrained`` and
calls ``predict_forward`` under ``torch.no_grad()`` (image mode: once per frame; video mode: one ``video=[...]`` call
over the frames), each a fresh process, interleaved, both with one torch thread and ``OMP_NUM_THREADS=1``. Memory is
the process tree's RSS sampled every 0.1 s (ours: the inference process + its store writer) and the main process's
own high-water mark; time is the whole command (imports, model load, frames) per frame:

    .venv/bin/python bench/bench_infer.py --side-by-side --model HF_DIR --images FRAMES_DIR --frames 2 --rounds 2
    .venv/bin/python bench/bench_infer.py --side-by-side --modes video --window-sweep 1,2,4,8 ...   # memory model

Ends with one JSON line per figure (ratio = ours / reference; lower is better).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vesselnb.data import list_samples
from vesselnb.device import code_assumes_cuda, cuda_shim, maybe_cuda_shim
from vesselnb.infer import infer_stage, load_model, run_inference
from vesselnb.params import DEFAULT_PROMPT, RunParams
from vesselnb.store import PredictionStore


def _demo_paths() -> tuple[Path, Path]:
    from vesselnb.demo import ensure_demo_assets

    assets = ensure_demo_assets(Path(__file__).resolve().parents[1] / "outputs" / "_demo_assets")
    reference = getattr(assets, "reference_hf", None) or {}
    return Path(reference.get("long", assets.base_model)), assets.images_dir


CLOCK = time.perf_counter  # --clock cpu: time.process_time (this process's CPU; robust to other load)


def bare_loop(loaded, samples, prompt: str, kwargs: dict, guarded: bool = True) -> float:
    """The reference: open, predict_forward, keep the output. Seconds. ``guarded=False``: no no_grad (memory probe).
    Upstream-shaped code on the CPU runs inside the CUDA shim, as it must (both loops pay it)."""
    started = CLOCK()
    outputs = []
    for sample in samples:
        with Image.open(sample.image_path) as image:
            frame = image.convert("RGB")
        with maybe_cuda_shim(loaded.plan), torch.no_grad() if guarded else contextlib.nullcontext():
            outputs.append(loaded.model.predict_forward(image=frame, text=prompt, tokenizer=loaded.tokenizer,
                                                        **kwargs))
    return CLOCK() - started


def ours_loop(loaded, samples, prompt: str, want_probability: bool, store_dir: Path) -> float:
    """vesselnb's loop into a fresh store. Seconds."""
    shutil.rmtree(store_dir, ignore_errors=True)
    store = PredictionStore.create_or_open(store_dir, fingerprint="bench", model_dir=loaded.hf_dir, prompt=prompt,
                                           mode="image", probability_maps=want_probability)
    started = CLOCK()
    run_inference(loaded, samples, store, prompt, "image", want_probability, set(), progress=False)
    return CLOCK() - started


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


def bare_probe(model: Path, images: Path, frames: int, mode: str, save: Path | None = None) -> None:
    """What a user writes, in this fresh process: ``from_pretrained`` (fp32 on the CPU), then ``predict_forward``
    under ``torch.no_grad()`` (upstream's code also needs the CPU shim: vesselnb's, the least a user can do). Prints
    load and call seconds and this process's RSS high-water mark."""
    from transformers import AutoModel, AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(model), trust_remote_code=True)
    net = AutoModel.from_pretrained(str(model), trust_remote_code=True, dtype=torch.float32).eval()
    shim = cuda_shim(None) if code_assumes_cuda(model) else contextlib.nullcontext()
    with shim:
        net.preparing_for_generation(tokenizer, torch_dtype=torch.float32)
    loaded = time.perf_counter()
    samples = list_samples(images, limit=frames)
    pictures = []
    for sample in samples:
        with Image.open(sample.image_path) as image:
            pictures.append(image.convert("RGB"))
    calls = [{"image": p} for p in pictures] if mode == "image" else [{"video": pictures}]
    outputs = []
    for call in calls:
        with cuda_shim(None) if code_assumes_cuda(model) else contextlib.nullcontext(), torch.no_grad():
            outputs.append(net.predict_forward(text=DEFAULT_PROMPT, tokenizer=tokenizer, **call))
    done = time.perf_counter()
    if save is not None:  # each frame's OR of its [SEG] masks, to compare with vesselnb's store bit for bit
        masks = {}
        for index, sample in enumerate(samples):
            output = outputs[index] if mode == "image" else outputs[0]
            frame = 0 if mode == "image" else index
            stacks = [np.asarray(m)[frame] for m in output["prediction_masks"]]
            if stacks:
                masks[sample.sample_id] = np.logical_or.reduce(stacks)
        np.savez_compressed(save, **masks)
    print(json.dumps({"load_s": round(loaded - started, 2), "frames_s": round(done - loaded, 2),
                      "vmhwm_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def measured(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run ``command``; wall seconds, peak RSS of its whole process tree (sampled every 0.1 s with psutil) and the
    main process's own high-water mark (``wait4``). The probe's last stdout line (JSON) is merged in when present."""
    import psutil

    with tempfile.TemporaryFile("w+") as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.DEVNULL, text=True)
        root = psutil.Process(process.pid)
        tree_peak = 0
        while True:
            try:
                members = [root, *root.children(recursive=True)]
                total = 0
                for member in members:
                    with contextlib.suppress(psutil.Error):
                        total += member.memory_info().rss
                tree_peak = max(tree_peak, total)
            except psutil.Error:
                pass
            waited = os.wait4(process.pid, os.WNOHANG)
            if waited[0] == process.pid:
                break
            time.sleep(0.1)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(waited[1])
        if process.returncode:
            raise SystemExit(f"{' '.join(command)} exited {process.returncode}")
        out.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("{")]
    usage = waited[2]  # the process and its reaped children (ours: the store writer)
    figure = {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
              "tree_peak_mb": round(tree_peak / 2**20, 1), "main_peak_mb": round(usage.ru_maxrss / 1024, 1)}
    if lines:
        figure.update(json.loads(lines[-1]))
    return figure


def _params_file(folder: Path, args: argparse.Namespace, mode: str, frames: int, window: int) -> Path:
    path = folder / f"bench_{mode}_{frames}.yaml"
    lines = [f"run_name: bench_{mode}", f"hf_model: {args.model}", "data:", f"  images: {args.images}",
             f"  limit: {frames}", "inference:", "  device: cpu", f"  mode: {mode}", f"  video_window: {window}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def side_by_side(args: argparse.Namespace) -> list[dict]:
    """``vesselnb infer`` vs the bare no-grad script, fresh processes, interleaved (order alternating by round)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    vesselnb_cli = [sys.executable, "-m", "vesselnb.cli"]
    figures = []
    with tempfile.TemporaryDirectory(prefix="vnb-bench-sbs-") as tmp:
        folder = Path(tmp)
        for mode in args.modes.split(","):
            params = _params_file(folder, args, mode, args.frames, max(args.frames, 1))
            bare_cmd = [sys.executable, __file__, "--probe", "bare-" + mode, "--model", str(args.model),
                        "--images", str(args.images), "--frames", str(args.frames), "--save", str(folder / "bare.npz")]
            bare, ours = [], []
            for round_index in range(args.rounds):
                run_dir = folder / f"run_{mode}_{round_index}"
                ours_cmd = [*vesselnb_cli, "infer", str(params), "--run-dir", str(run_dir), "--no-progress"]
                order = [("bare", bare_cmd), ("ours", ours_cmd)]
                for side, command in order if round_index % 2 == 0 else order[::-1]:
                    (bare if side == "bare" else ours).append(measured(command, env))
                    print(f"{mode} round {round_index} {side}: {json.dumps((bare if side == 'bare' else ours)[-1])}",
                          flush=True)
            store = PredictionStore(folder / f"run_{mode}_0" / "predictions")
            with np.load(folder / "bare.npz") as reference:
                same = [bool(np.array_equal(store.mask(key), reference[key])) for key in reference.files]
                maps = [bool(np.array_equal(store.probability(key) > 127.5, reference[key])) for key in reference.files
                        if store.probability(key) is not None]
            print(f"{mode}: stored masks equal to the bare call's: {sum(same)}/{len(same)}; stored maps > 0.5 equal "
                  f"to them: {sum(maps)}/{len(maps)}", flush=True)
            tree = min(o["tree_peak_mb"] for o in ours) / min(b["tree_peak_mb"] for b in bare)
            main_ratio = min(o["main_peak_mb"] for o in ours) / min(b["main_peak_mb"] for b in bare)
            wall = statistics.median(o["wall_s"] / b["wall_s"] for o, b in zip(ours, bare, strict=True))
            cpu = statistics.median(o["cpu_s"] / b["cpu_s"] for o, b in zip(ours, bare, strict=True))
            figures.append({"bench": f"vesselnb_infer_vs_bare_no_grad_{mode}", "frames": args.frames,
                            "rounds": args.rounds, "masks_equal_bare": f"{sum(same)}/{len(same)}",
                            "maps_threshold_equal_bare": f"{sum(maps)}/{len(maps)}",
                            "memory_ratio": round(tree, 4), "memory_target": 1.10,
                            "main_process_memory_ratio": round(main_ratio, 4), "ratio": round(wall, 4),
                            "cpu_ratio": round(cpu, 4),
                            "target": 1.05, "statistic": "memory: min over rounds of the sampled tree peak; time: "
                            "median of paired round ratios of whole-command wall (cpu_ratio: CPU) time",
                            "s_per_frame_bare": round(statistics.median(b["wall_s"] for b in bare) / args.frames, 2),
                            "s_per_frame_ours": round(statistics.median(o["wall_s"] for o in ours) / args.frames, 2),
                            "bare": bare, "ours": ours})
        for frames in [int(n) for n in args.window_sweep.split(",")] if args.window_sweep else []:
            probe = measured([sys.executable, __file__, "--probe", "bare-video", "--model", str(args.model),
                              "--images", str(args.images), "--frames", str(frames)], env)
            print(f"window sweep {frames} frames: {json.dumps(probe)}", flush=True)
            figures.append({"bench": "video_window_memory", "frames": frames, **probe})
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="HF folder (default: the demo reference model)")
    parser.add_argument("--images", type=Path, default=None, help="frames folder (default: the demo frames)")
    parser.add_argument("--frames", type=int, default=24, help="all 24 demo frames by default")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both loops")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="in-process loops: wall (perf_counter) or this process's CPU time (process_time; the "
                             "store writer's CPU is not counted)")
    parser.add_argument("--loop-only", action="store_true",
                        help="in-process loops with probability maps only (no masks-only pair, resume or RSS probes)")
    parser.add_argument("--side-by-side", action="store_true",
                        help="`vesselnb infer` vs a bare no-grad script, fresh processes (see the module docstring)")
    parser.add_argument("--modes", default="image,video", help="side-by-side: image,video")
    parser.add_argument("--window-sweep", default="", help="side-by-side: peak memory of bare video calls of "
                                                          "these frame counts, e.g. 1,2,4,8")
    parser.add_argument("--save", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--probe", choices=["bare", "ours", "unguarded", "bare-image", "bare-video"], default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.model is None or args.images is None:
        demo_model, demo_images = _demo_paths()
        args.model = args.model or demo_model
        args.images = args.images or demo_images
    if args.probe in ("bare-image", "bare-video"):
        torch.set_num_threads(args.threads)
        bare_probe(args.model, args.images, args.frames, args.probe.split("-")[1], args.save)
        return
    if args.side_by_side:
        for figure in side_by_side(args):
            print(json.dumps(figure))
        return
    if args.probe:
        peak_rss_probe(args.probe, args.model, args.images, args.frames, args.threads)
        return

    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    samples = list_samples(args.images, limit=args.frames)
    loaded = load_model(args.model, device="cpu")
    want_probability = loaded.probability.available
    kwargs = dict(loaded.probability.call_kwargs)
    print(f"model {args.model}, {len(samples)} frames, probability maps: {want_probability}")
    bare_loop(loaded, samples[:1 if args.loop_only else 2], DEFAULT_PROMPT, kwargs)  # warm-up (first-call setup)

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
                "statistic": f"median of paired round ratios ({args.clock})",
                "probability_maps_stored": with_probability,
                "ms_per_frame_bare": round(1000 * statistics.median(bare) / len(samples), 2),
                "ms_per_frame_ours": round(1000 * statistics.median(ours) / len(samples), 2), "frames": len(samples),
                "clock": args.clock,
            })
            if args.loop_only:
                break
        if args.loop_only:
            for figure in figures:
                print(json.dumps(figure))
            return

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
