"""The paper's learning-rate robustness claim, at the demo's scale: ETHER, ETHER+ and litgpt's LoRA trained on
the demo over a log grid of learning rates with the same steps; held-out exact match and final training loss
go to a CSV and a PNG.

    python scripts/lr_sweep.py --out_dir out/lr_sweep      # needs matplotlib (pip install -e ".[demo]")

ETHER and ETHER+ run through ``litgpt_ether finetune`` with the demo presets; LoRA through ``litgpt
finetune_lora`` with the same data, targets, steps and batch (r=8, alpha=16). Every run's merged output is
scored by the same greedy exact match that ``litgpt_ether finetune`` reports.
"""

import csv
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
from litgpt.args import EvalArgs
from litgpt.prompts import Alpaca
from litgpt.tokenizer import Tokenizer

from litgpt_ether.checkpoint import load_model, resolve
from litgpt_ether.finetune import exact_match, load_test_rows

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "demo"


def train_command(method: str, lr: float, steps: int, out_dir: Path) -> list[str]:
    common = [f"--train.max_steps={steps}", f"--out_dir={out_dir}", "--eval.initial_validation=false",
              "--eval.final_validation=false", f"--eval.interval={steps}"]  # fmt: skip
    if method in ("ether", "etherplus"):
        preset = ROOT / "config_hub" / "finetune" / "demo" / f"{method}.yaml"
        return [
            "litgpt_ether",
            "finetune",
            "--config",
            str(preset),
            f"--optimizer.lr={lr}",
            "--test_data=null",
            "--overwrite=true",  # a rerun of the sweep replaces its runs
            *common,
        ]
    # litgpt's LoRA on the same targets, data and schedule as the ETHER presets
    return [
        "litgpt", "finetune_lora", str(DEMO / "base"), "--precision=32-true", "--lora_r=8", "--lora_alpha=16",
        "--lora_dropout=0", "--lora_query=true", "--lora_key=true", "--lora_value=true", "--lora_projection=true",
        "--lora_mlp=true", "--data=JSON", f"--data.json_path={DEMO / 'data'}", "--data.mask_prompt=true",
        "--data.num_workers=0", "--train.global_batch_size=16", "--train.micro_batch_size=16", "--train.epochs=100",
        "--train.lr_warmup_steps=10", "--train.save_interval=100000", "--train.log_interval=10",
        "--eval.max_iters=3", "--eval.max_new_tokens=8",
        f'--optimizer={{"class_path": "torch.optim.AdamW", "init_args": {{"lr": {lr}, "weight_decay": 0.0}}}}',
        *common,
    ]  # fmt: skip


def final_loss(log: Path) -> float:
    """The last running training loss the run printed (litgpt's and this package's loops print the same line)."""
    return float(re.findall(r"loss train: ([0-9.]+|nan|inf)", log.read_text())[-1])


def score(checkpoint_dir: Path, rows: list[dict]) -> float:
    fabric = L.Fabric(devices=1, precision="32-true", accelerator="cpu")
    model = fabric.setup_module(load_model(resolve(checkpoint_dir)))
    return exact_match(fabric, model, Tokenizer(checkpoint_dir), Alpaca(), rows, EvalArgs(max_new_tokens=8))


def main(
    out_dir: Path = Path("out/lr_sweep"),
    methods: tuple[str, ...] = ("ether", "etherplus", "lora"),
    lrs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1),
    steps: int = 250,
) -> None:
    """Train every method at every learning rate; write ``results.csv`` and ``lr_sweep.png`` to ``out_dir``.

    Arguments:
        out_dir: Where the runs, the CSV and the plot go.
        methods: Any of "ether", "etherplus", "lora".
        lrs: The learning-rate grid.
        steps: Optimizer steps per run (the same for every run).
    """
    rows = load_test_rows(DEMO / "data" / "test.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for method in methods:
        for lr in lrs:
            run_dir = out_dir / f"{method}-lr{lr:g}"
            log = out_dir / f"{run_dir.name}.log"
            with open(log, "w") as f:
                done = subprocess.run(train_command(method, lr, steps, run_dir), stdout=f, stderr=subprocess.STDOUT)
            ok = done.returncode == 0 and (run_dir / "final" / "lit_model.pth").is_file()
            em = score(run_dir / "final", rows) if ok else float("nan")
            loss = final_loss(log) if ok else float("nan")
            results.append({"method": method, "lr": lr, "steps": steps, "exact_match": em, "final_loss": loss})
            print(f"{method:9s} lr {lr:<7g} exact match {em:6.1%}  final loss {loss:.3f}", flush=True)
            with open(out_dir / "results.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(results[0]))
                writer.writeheader()
                writer.writerows(results)
    plot(results, out_dir / "lr_sweep.png")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]
        lrs = [r["lr"] for r in runs]
        axes[0].plot(lrs, [100 * r["exact_match"] for r in runs], marker="o", label=method)
        axes[1].plot(lrs, [r["final_loss"] for r in runs], marker="o", label=method)
    for ax, label in zip(axes, ["held-out exact match (%)", "final training loss"]):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Demo: {results[0]['steps']} steps per run")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"Wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli(main)
