"""Bench: conversion of a synthetic few-GB Sa2VA-layout checkpoint vs ``cp`` + ``sync`` of the same bytes.

Builds a bf16 base HF folder shaped like a small Sa2VA (LLM layers, embeddings, vision, SAM2 decoder, mlp1,
text_hidden_fcs; 2.8 GB) and a training checkpoint with LoRA pairs on every LLM projection and ``modules_to_save``
copies (0.42 GB), in a temp folder under --workdir (default the repo root, a real disk; removed after) or in --data
(kept, reused next time). Then --rounds interleaved rounds (order alternating), each timed run in its own process:

- reference: ``cp -r base`` + ``cp ckpt`` + ``sync`` (the same input bytes read and written, made durable);
- ours: ``convert_checkpoint`` (bf16), timed around the call (imports excluded), with its CPU seconds per phase.

Ours is CPU-bound and ``cp`` is not, so a CPU probe (one thread's GFLOPS in the merge's kernel) is printed before
and after the rounds: the ratio follows it. Every timed run starts from the same state (see bench/README.md): inputs
in the page cache (read once before), and an untimed copy of them deleted just before the start, so both sides find
the same just-freed memory. Prints every round (seconds and CPU seconds) and ours' CPU seconds per phase, then one
JSON line per figure: ``ratio`` = ours / reference (lower is better), of the minima over the rounds (the medians
beside them).
Run: ``.venv/bin/python bench/bench_convert.py [--rounds 3] [--data DIR] [--settle S] [--fp32]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

R, ALPHA, VOCAB = 64, 128, 32000
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LIMIT_BASE = 2 * 10**9  # the RSS target: 2 GB + the largest tensor


def _shapes(hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, hidden),
        "v_proj": (hidden, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }


def build(root: Path, layers: int, hidden: int) -> tuple[Path, Path]:
    """Base folder (bf16 shards of <= 1 GB) and an mmengine-style training checkpoint.

    Values are slices of one pool of N(0, 0.02) numbers at random offsets: generating 1.6 G normal numbers would
    take longer than the bench itself, and the conversion's cost does not depend on the values.
    """
    inter = int(hidden * 2.75)
    gen = torch.Generator().manual_seed(0)
    pool = (torch.randn(VOCAB * hidden + (1 << 20), generator=gen) * 0.02).to(torch.bfloat16)

    def rnd(*shape: int) -> torch.Tensor:
        count = 1
        for dim in shape:
            count *= dim
        start = int(torch.randint(0, pool.numel() - count + 1, (1,), generator=gen))
        return pool[start : start + count].clone().view(shape)

    base = root / "base"
    base.mkdir()
    tensors: dict[str, torch.Tensor] = {
        "language_model.model.embed_tokens.weight": rnd(VOCAB, hidden),
        "language_model.lm_head.weight": rnd(VOCAB, hidden),
        "language_model.model.norm.weight": rnd(hidden),
        "vision_model.embeddings.patch_embedding.weight": rnd(1024, 588),
        "mlp1.0.weight": rnd(4096),
        "mlp1.1.weight": rnd(hidden, 4096),
        "mlp1.3.weight": rnd(hidden, hidden),
        "text_hidden_fcs.0.weight": rnd(hidden, hidden),
        "text_hidden_fcs.2.weight": rnd(256, hidden),
    }
    for i in range(4):
        tensors[f"grounding_encoder.sam2_model.sam_mask_decoder.layers.{i}.weight"] = rnd(256, 2048)
        tensors[f"vision_model.encoder.layers.{i}.mlp.fc1.weight"] = rnd(4096, 1024)
    for layer in range(layers):
        for name, shape in _shapes(hidden, inter).items():
            group = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            tensors[f"language_model.model.layers.{layer}.{group}.{name}.weight"] = rnd(*shape)
    weight_map, shard, shard_bytes, index = {}, {}, 0, 0
    names = sorted(tensors)

    def flush() -> None:
        nonlocal shard, shard_bytes, index
        index += 1
        file = f"model-{index:05d}.safetensors"
        save_file(shard, str(base / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        shard, shard_bytes = {}, 0

    for name in names:
        shard[name] = tensors[name]
        shard_bytes += tensors[name].numel() * 2
        if shard_bytes > 1 << 30:
            flush()
    if shard:
        flush()
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (base / "config.json").write_text(json.dumps({"model_type": "bench", "auto_map": {"AutoModel": "modeling_b.M"}}))
    (base / "modeling_b.py").write_text("M = None\n")

    state: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        for name, (out_f, in_f) in _shapes(hidden, inter).items():
            group = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"mllm.model.language_model.base_model.model.model.layers.{layer}.{group}.{name}"
            state[f"{prefix}.lora_A.default.weight"] = rnd(R, in_f)
            state[f"{prefix}.lora_B.default.weight"] = rnd(out_f, R)
    state["mllm.model.language_model.base_model.model.model.embed_tokens.modules_to_save.default.weight"] = rnd(
        VOCAB, hidden
    )
    state["mllm.model.language_model.base_model.model.lm_head.modules_to_save.default.weight"] = rnd(VOCAB, hidden)
    for key in ("mlp1.0.weight", "mlp1.1.weight", "mlp1.3.weight"):
        state["mllm.model." + key] = rnd(*tensors[key].shape)
    for key in [k for k in tensors if k.startswith(("text_hidden_fcs", "grounding_encoder"))]:
        state[key] = rnd(*tensors[key].shape)
    del tensors
    ckpt = root / "iter_1000.pth"
    torch.save({"state_dict": state, "meta": {"iter": 1000, "torch_version": torch.__version__}}, ckpt)
    (root / "cfg.py").write_text(f"model = dict(mllm=dict(llm_lora=dict(r={R}, lora_alpha={ALPHA})))\n")
    (root / "built.json").write_text(json.dumps({"layers": layers, "hidden": hidden}))
    return base, ckpt


def cpu_probe(seconds: float = 1.0) -> float:
    """GFLOPS of one thread in the merge's own kernel (fp32 ``mm`` of a row block by a rank-64 ``A``).

    Ours is CPU-bound and ``cp`` is not, so the ratio follows the speed the host gives this VM, which varies by
    ~1.5x over minutes on shared machines (measured here: 103-157 GFLOPS within an hour). Printed before and after
    the rounds so two runs of the bench can be compared with it.
    """
    torch.set_num_threads(1)
    left, right = torch.randn(128, R), torch.randn(R, 2048)
    out = torch.empty(128, 2048)
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(100):
            torch.mm(left, right, out=out)
        calls += 100
    return 2 * 128 * R * 2048 * calls / elapsed / 1e9


def _vm_hwm() -> int:
    """This process's peak resident set since its exec (``ru_maxrss`` would carry the forking parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_anon(stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            if line.startswith("RssFile:"):
                peak[1] = max(peak[1], int(line.split()[1]) * 1024)
        time.sleep(0.02)


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _copy(base: Path, ckpt: Path, to: list[Path]) -> None:
    subprocess.run(["cp", "-r", str(base), str(to[0])], check=True)
    subprocess.run(["cp", str(ckpt), str(to[1])], check=True)
    subprocess.run(["sync"], check=True)


def prepare(base: Path, ckpt: Path, outputs: list[Path], scratch: list[Path]) -> None:
    """Untimed, before every timed run: the previous output removed, the inputs in the page cache (they are read
    once), then an untimed ``cp`` of the inputs to ``scratch``, synced: :func:`go` frees its page cache just before
    the timer starts.

    Why: on this VM memory freed by a process goes back to the host within seconds (free page reporting) and
    touching it again costs ~2 s of CPU per GB, so a run that writes 3 GB into the page cache is 2-4x slower when
    it does not find memory freed a moment ago. Which side ran before, and how much of its output it left cached,
    would decide the figure; with this, every timed run starts with the same 3.2 GB just freed (the fast case).
    """
    _remove(outputs)
    for file in [*sorted(base.iterdir()), ckpt]:
        with open(file, "rb", buffering=0) as handle:
            while handle.read(16 << 20):
                pass
    _copy(base, ckpt, scratch)


def go(scratch: list[Path], settle: float) -> None:
    """Right before the timer (in the timed process itself, after its imports): free the scratch copy's memory."""
    _remove(scratch)
    if settle:
        time.sleep(settle)


def child(args: argparse.Namespace) -> None:
    """Runs one conversion in this fresh process and prints its figures as JSON (RSS is this process's own)."""
    from vesselnb.convert import convert_checkpoint
    from vesselnb.convert.timing import PhaseClock

    go([Path(p) for p in args.scratch], args.settle)
    stop, peak = threading.Event(), [0, 0]
    sampler = threading.Thread(target=_peak_anon, args=(stop, peak), daemon=True)
    sampler.start()
    clock = PhaseClock()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    report = convert_checkpoint(
        args.ckpt, args.base, args.out, training_config=args.config, dtype=args.dtype, shard_size="2GB", clock=clock
    )
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    stop.set()
    sampler.join()
    total = json.loads((Path(args.out) / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu": cpu,
                "sys": after.ru_stime - before.ru_stime,
                "peak_rss": _vm_hwm(),
                "peak_anon": peak[0],
                "peak_file_mapped": peak[1],
                "weight_bytes": total,
                "phases": clock.as_dict(),
                "fingerprint": report.fingerprint,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--workdir", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--data", help="keep the generated inputs in this folder and reuse them next time")
    parser.add_argument("--rounds", type=int, default=3, help="cp / convert pairs, order alternating")
    parser.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds idle between freeing the scratch copy and the timed start (default 0: see bench/README.md)",
    )
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--base"), parser.add_argument("--ckpt"), parser.add_argument("--config")
    parser.add_argument("--out"), parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--scratch", nargs="*", default=[])
    parser.add_argument("--fp32", action="store_true", help="also convert to fp32 once (output bytes only)")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    started = time.perf_counter()
    load_before = os.getloadavg()
    if args.data:
        root = Path(args.data)
        built = root / "built.json"
        if not built.is_file() or json.loads(built.read_text()) != {"layers": args.layers, "hidden": args.hidden}:
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            build(root, args.layers, args.hidden)
        work = Path(tempfile.mkdtemp(prefix=".bench_convert_out_", dir=root))
    else:
        root = Path(tempfile.mkdtemp(prefix=".bench_convert_", dir=args.workdir))
        build(root, args.layers, args.hidden)
        work = root
    base, ckpt, config = root / "base", root / "iter_1000.pth", root / "cfg.py"
    inputs = [*sorted(base.iterdir()), ckpt]
    try:
        input_bytes = sum(f.stat().st_size for f in inputs)
        built_seconds = time.perf_counter() - started
        cp_out = [work / "cp_base", work / "cp_ckpt.pth"]
        ours_out = work / "out_bf16"

        scratch = [work / "scratch_base", work / "scratch_ckpt.pth"]
        outputs = [*cp_out, ours_out]

        def run_cp() -> dict:
            prepare(base, ckpt, outputs, scratch)
            go(scratch, args.settle)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            _copy(base, ckpt, cp_out)
            seconds = time.perf_counter() - start
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            return {"seconds": seconds, "cpu": cpu}

        def run_ours(dtype: str = "bf16") -> dict:
            command = [sys.executable, __file__, "--child", "--base", str(base), "--ckpt", str(ckpt)]
            command += ["--config", str(config), "--out", str(ours_out), "--dtype", dtype, "--settle", str(args.settle)]
            command += ["--scratch", *map(str, scratch)]
            prepare(base, ckpt, outputs, scratch)
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise SystemExit(f"conversion failed:\n{result.stderr[-3000:]}")
            return json.loads(result.stdout.strip().splitlines()[-1])

        cp_runs: list[dict] = []
        ours_runs: list[dict] = []
        probe_before = cpu_probe()
        print(
            f"inputs: {input_bytes / 1e9:.2f} GB (built/reused in {built_seconds:.0f} s); "
            f"load average {load_before[0]:.2f}; CPU probe {probe_before:.0f} GFLOPS (one thread, fp32 mm)",
            flush=True,
        )
        for round_index in range(args.rounds):
            order = ("cp", "ours") if round_index % 2 == 0 else ("ours", "cp")
            for side in order:
                if side == "cp":
                    cp_runs.append(run_cp())
                else:
                    ours_runs.append(run_ours())
            c, o = cp_runs[-1], ours_runs[-1]
            print(
                f"round {round_index + 1} ({order[0]} first): cp+sync {c['seconds']:5.2f} s (cpu {c['cpu']:4.2f} s)"
                f" | ours {o['seconds']:5.2f} s (cpu {o['cpu']:4.2f} s, sys {o['sys']:4.2f} s)"
                f" | ratio {o['seconds'] / c['seconds']:.2f} | load {os.getloadavg()[0]:.2f}",
                flush=True,
            )
        fastest = min(ours_runs, key=lambda r: r["seconds"])
        print("ours, CPU seconds per phase (summed over threads) in the fastest run; wall per phase overlaps:")
        for phase, spent in fastest["phases"].items():
            print(f"  {phase:44s} cpu {spent['cpu']:6.2f}  wall {spent['wall']:6.2f}")
        attributed = sum(spent["cpu"] for spent in fastest["phases"].values())
        print(f"  {'(not attributed: imports, bookkeeping)':44s} cpu {fastest['cpu'] - attributed:6.2f}")
        fp32 = run_ours("fp32") if args.fp32 else None  # output bytes only

        cp_s = [r["seconds"] for r in cp_runs]
        ours_s = [r["seconds"] for r in ours_runs]
        largest = max(VOCAB * args.hidden * 2, int(args.hidden * 2.75) * args.hidden * 2)
        peak_rss = max(r["peak_rss"] for r in ours_runs)
        load_after = os.getloadavg()
        probe_after = cpu_probe()
        print(f"CPU probe after the rounds: {probe_after:.0f} GFLOPS")
        print(
            json.dumps(
                {
                    "bench": "convert_inputs",
                    "input_bytes": input_bytes,
                    "largest_tensor_bytes": largest,
                    "state": "inputs in page cache; an untimed cp of the inputs deleted just before each start"
                    + (f", then {args.settle:g} s idle" if args.settle else ""),
                    "cp_seconds": [round(x, 2) for x in cp_s],
                    "convert_seconds": [round(x, 2) for x in ours_s],
                    "cp_cpu": [round(r["cpu"], 2) for r in cp_runs],
                    "convert_cpu": [round(r["cpu"], 2) for r in ours_runs],
                    "load_average": [round(load_before[0], 2), round(load_after[0], 2)],
                    "cpu_probe_gflops": [round(probe_before), round(probe_after)],
                    "bench_seconds": round(time.perf_counter() - started, 1),
                }
            )
        )
        print(
            json.dumps(
                {
                    "bench": "convert_vs_cp",
                    "ratio": round(min(ours_s) / min(cp_s), 3),
                    "target": 1.3,
                    "of": "min over interleaved rounds",
                    "ours_seconds": round(min(ours_s), 2),
                    "cp_seconds": round(min(cp_s), 2),
                    "median_ratio": round(statistics.median(ours_s) / statistics.median(cp_s), 3),
                }
            )
        )
        print(
            json.dumps(
                {
                    "bench": "convert_peak_rss_vs_limit",
                    "ratio": round(peak_rss / (LIMIT_BASE + largest), 3),
                    "target": 1.0,
                    "peak_rss": peak_rss,
                    "limit": LIMIT_BASE + largest,
                    "peak_anon": max(r["peak_anon"] for r in ours_runs),
                    "peak_file_mapped": max(r["peak_file_mapped"] for r in ours_runs),
                }
            )
        )
        if fp32 is not None:
            print(
                json.dumps(
                    {
                        "bench": "convert_output_bf16_vs_fp32",
                        "ratio": round(fastest["weight_bytes"] / fp32["weight_bytes"], 3),
                        "bf16_bytes": fastest["weight_bytes"],
                        "fp32_bytes": fp32["weight_bytes"],
                    }
                )
            )
    finally:
        shutil.rmtree(work if args.data else root, ignore_errors=True)


if __name__ == "__main__":
    main()
