"""A real-size pipeline check on a GPU: finetune, step checkpoints, ``--resume``, and merge, in bf16-true.

No weights are downloaded: the base is a litgpt config (default ``phi-1_5``, 1.4B parameters) with random
weights, the tokenizer and the data are make_tiny's (reverse three colour words). A random base learns no
skill, but the loss must fall, every checkpoint must be written, a resumed run must continue where the first
stopped, and the merged model must give the unmerged model's logits on the GPU::

    python scripts/finetune_check.py                       # phi-1_5 ETHER+ preset, 200 + 100 steps, CUDA
    python scripts/finetune_check.py --model pythia-14m --preset config_hub/finetune/tiny/etherplus.yaml \
        --precision 32-true --accelerator cpu --steps 20 --resume_steps 10    # the same on a CPU, in a minute

Prints one JSON line with what was measured and exits 1 if a check fails.
"""

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from make_tiny import make_dataset, write_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmark import random_checkpoint  # noqa: E402

from litgpt_ether.checkpoint import load_model, resolve  # noqa: E402


def finetune(preset: Path, base: Path, data: Path, out_dir: Path, steps: int, args: argparse.Namespace, *extra: str):
    cmd = [sys.executable, "-m", "litgpt_ether", "finetune", "--config", str(preset), str(base), "--out_dir",
           str(out_dir), "--precision", args.precision, "--accelerator", args.accelerator,
           "--data", "JSON", "--data.json_path", str(data), "--data.val_split_fraction", "0.05",
           "--data.num_workers", "0", "--train.global_batch_size", "8", "--train.micro_batch_size", "8",
           "--train.epochs", "1000", "--train.max_steps", str(steps), "--train.lr_warmup_steps", "10",
           "--train.save_interval", str(args.save_interval), "--train.log_interval", "1",
           "--eval.interval", str(args.save_interval), "--eval.max_iters", "2", "--eval.max_new_tokens", "5",
           "--optimizer.lr", str(args.lr), *extra]  # fmt: skip
    t0 = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if result.returncode != 0:
        print(result.stdout[-2000:], result.stderr[-4000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"finetune exited with {result.returncode}")
    return seconds, result.stdout + result.stderr


def losses(out_dir: Path) -> dict[int, float]:
    """step -> training loss, from every CSV metrics file the run(s) wrote."""
    rows = {}
    for path in sorted(out_dir.rglob("metrics.csv")):
        for row in csv.DictReader(path.open()):
            if row.get("loss") and row.get("step"):
                rows[int(float(row["step"]))] = float(row["loss"])
    return rows


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="phi-1_5")
    p.add_argument("--preset", type=Path, default=ROOT / "config_hub/finetune/phi-1_5/etherplus.yaml")
    p.add_argument("--work_dir", type=Path, default=None, help="a new directory (default: a fresh temporary one)")
    p.add_argument("--precision", default="bf16-true")
    p.add_argument("--accelerator", default="cuda")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--resume_steps", type=int, default=100)
    p.add_argument("--save_interval", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-2)
    args = p.parse_args()
    if args.work_dir is None:
        args.work_dir = Path(tempfile.mkdtemp(prefix="finetune_check-"))
    elif args.work_dir.exists() and any(args.work_dir.iterdir()):
        p.error(f"--work_dir {str(args.work_dir)!r} is not empty: name a new directory")
    args.preset = args.preset.resolve()
    device = "cuda" if args.accelerator in ("cuda", "gpu") else "cpu"
    dtype = torch.bfloat16 if args.precision.startswith("bf16") else torch.float32

    t0 = time.perf_counter()
    base = random_checkpoint(args.model, args.work_dir / "base", dtype, device)  # the config's shapes, random weights
    write_tiny_tokenizer(base)
    data = make_dataset(args.work_dir / "reverse.json", n=2000)
    report = {
        "model": args.model,
        "work_dir": str(args.work_dir),
        "precision": args.precision,
        "build_s": round(time.perf_counter() - t0, 1),
    }
    out_dir = args.work_dir / "out"
    report["finetune_s"], _ = finetune(args.preset, base, data, out_dir, args.steps, args)
    total = args.steps + args.resume_steps
    report["resume_s"], log = finetune(args.preset, base, data, out_dir, total, args, "--resume", "auto")

    loss = losses(out_dir)
    first, last = [loss[s] for s in sorted(loss)[:10]], [loss[s] for s in sorted(loss)[-10:]]
    steps = [f"step-{s:06d}" for s in range(args.save_interval, total + 1, args.save_interval)]
    report |= {
        "loss_first10": round(mean(first), 3),
        "loss_last10": round(mean(last), 3),
        "logged_steps": len(loss),
        "step_dirs": [s for s in steps if (out_dir / s / "lit_model.pth.ether").is_file()],
        "final": all((out_dir / "final" / f).is_file() for f in ("lit_model.pth", "lit_model.pth.ether")),
        "resumed_from_step": f"Resuming at step {args.steps}:" in log,
    }

    idx = torch.randint(0, 60, (4, 32), generator=torch.Generator().manual_seed(0)).to(device)
    outputs = {}
    for kind, prefer_adapter in (("unmerged", True), ("merged", False)):
        model = load_model(resolve(out_dir / "final", prefer_adapter=prefer_adapter)).to(device, dtype)
        model.cos, model.sin = model.rope_cache(device=torch.device(device))
        with torch.no_grad():
            outputs[kind] = model(idx).double()
        del model
    a, b = outputs["merged"], outputs["unmerged"]
    report["merge_rel_err"] = ((a - b).norm() / b.norm()).item()
    report["merge_argmax_agree"] = (a.argmax(-1) == b.argmax(-1)).double().mean().item()

    failed = []
    if not report["loss_last10"] < report["loss_first10"]:
        failed.append("loss did not fall")
    if report["step_dirs"] != steps or not report["final"]:
        failed.append("a checkpoint is missing")
    if not report["resumed_from_step"]:
        failed.append("the second run did not resume from the first's last step")
    if not report["merge_rel_err"] < (2e-2 if dtype == torch.bfloat16 else 1e-4):
        failed.append("the merged model's logits differ from the unmerged model's")
    report["failed"] = failed
    print(json.dumps(report), flush=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
