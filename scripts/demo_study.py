"""The demo's figures as distributions: every run repeated over seeds and CPU thread counts, reported as median and
min-max, because at the demo's learning rates rounding differences between machines change single runs.

Two studies, each writing one CSV row per run and one summary row per (method, learning rate):

    python scripts/demo_study.py table     # the README's demo table
    python scripts/demo_study.py sweep     # the learning-rate study (needs the demo extra, for its plot)

``table`` runs every method at its demo preset's rate (LoRA at litgpt's default rate and at ``--lora_best_lr``)
over ``--seeds`` x ``--threads`` (default 5 x 2 = 10 runs each); ``sweep`` runs every method over a log grid of
learning rates and ``--seeds`` (one thread count) and plots median and min-max per point.

ETHER, ETHER+, OFT and Naive run through ``litgpt_ether finetune`` with their demo presets
(``config_hub/finetune/demo/{method}.yaml``); LoRA through ``litgpt finetune_lora`` with the same data, targets,
steps, batch and schedule (r=8, alpha=16). The thread count is set per run with ``OMP_NUM_THREADS`` (torch
takes it at start-up): other machines round differently, and 1 vs 2 threads is the cheapest way to see how much
that moves a run. Every run's merged output is scored by the same greedy exact match that ``litgpt_ether
finetune`` reports, on the held-out ``demo/data/test.json``.
"""

import csv
import os
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning as L
import yaml
from litgpt.args import EvalArgs
from litgpt.prompts import Alpaca
from litgpt.tokenizer import Tokenizer

from litgpt_ether.checkpoint import load_model, resolve
from litgpt_ether.finetune import exact_match, load_test_rows

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "demo"
PRESETS = ROOT / "config_hub" / "finetune" / "demo"
LORA_DEFAULT_LR = 1e-3  # litgpt finetune_lora's default AdamW rate


def preset(method: str) -> dict:
    return yaml.safe_load((PRESETS / f"{method}.yaml").read_text())


def train_command(method: str, lr: float, seed: int, out_dir: Path) -> list[str]:
    """The run's command line: the demo preset itself, or litgpt's LoRA on the ETHER+ preset's data and schedule."""
    if method != "lora":
        return ["litgpt_ether", "finetune", "--config", str(PRESETS / f"{method}.yaml"), f"--optimizer.lr={lr}",
                f"--seed={seed}", f"--out_dir={out_dir}", "--test_data=null", "--overwrite=true",
                "--eval.initial_validation=false", "--eval.final_validation=false"]  # fmt: skip
    p = preset("etherplus")
    train = p["train"]
    return [
        "litgpt", "finetune_lora", str(ROOT / p["checkpoint_dir"]), "--precision=32-true", "--lora_r=8",
        "--lora_alpha=16", "--lora_dropout=0", *(f"--lora_{t}={str(p[f'ether_{t}']).lower()}" for t in TARGETS),
        "--data=JSON", f"--data.json_path={DEMO / 'data'}", "--data.mask_prompt=true", "--data.num_workers=0",
        *(f"--train.{k}={train[k]}" for k in ("global_batch_size", "micro_batch_size", "epochs", "max_steps",
                                             "lr_warmup_steps")),
        "--train.save_interval=100000", "--train.log_interval=10", f"--eval.interval={train['max_steps']}",
        "--eval.max_iters=3", "--eval.max_new_tokens=8", "--eval.initial_validation=false",
        "--eval.final_validation=false", f"--seed={seed}", f"--out_dir={out_dir}",
        f'--optimizer={{"class_path": "torch.optim.AdamW", "init_args": {{"lr": {lr}, "weight_decay": 0.0}}}}',
    ]  # fmt: skip


TARGETS = ("query", "key", "value", "projection", "mlp", "head")


def final_loss(log: Path) -> float:
    """The last running training loss the run printed (litgpt's and this package's loops print the same line)."""
    found = re.findall(r"loss train: ([0-9.]+|nan|inf)", log.read_text())
    return float(found[-1]) if found else float("nan")


def score(checkpoint_dir: Path) -> float:
    """Held-out exact match of a merged checkpoint (printed, for the subprocess ``run`` starts)."""
    fabric = L.Fabric(devices=1, precision="32-true", accelerator="cpu")
    model = fabric.setup_module(load_model(resolve(checkpoint_dir)))
    rows = load_test_rows(DEMO / "data" / "test.json")
    em = exact_match(fabric, model, Tokenizer(checkpoint_dir), Alpaca(), rows, EvalArgs(max_new_tokens=8))
    print(em)
    return em


def run(method: str, lr: float, seed: int, threads: int, out_dir: Path) -> dict:
    """Train one run in a fresh process with ``threads`` CPU threads, then score its merged output in another.

    A run is deterministic given its settings, so one already scored in ``out_dir`` (by the other study, say) is
    read back instead of trained again.
    """
    run_dir = out_dir / f"{method}-lr{lr:g}-seed{seed}-t{threads}"
    log, scored = out_dir / f"{run_dir.name}.log", run_dir / "exact_match.txt"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if not scored.is_file():
        with open(log, "w") as f:
            done = subprocess.run(train_command(method, lr, seed, run_dir), stdout=f, stderr=subprocess.STDOUT,
                                  env=env)  # fmt: skip
        if done.returncode == 0 and (run_dir / "final" / "lit_model.pth").is_file():
            cmd = [sys.executable, __file__, "score", str(run_dir / "final")]
            score_run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            scored.write_text(score_run.stdout.split()[-1])
    ok = scored.is_file()
    em = float(scored.read_text()) if ok else float("nan")
    result = {"method": method, "lr": lr, "seed": seed, "threads": threads, "exact_match": em,
              "final_loss": final_loss(log) if ok else float("nan")}  # fmt: skip
    print(f"{method:9s} lr {lr:<7g} seed {seed} threads {threads}: exact match {em:6.1%}"
          f"  final loss {result['final_loss']:.3f}", flush=True)  # fmt: skip
    return result


def summarize(results: list[dict]) -> list[dict]:
    """Median, min and max exact match (and median final loss) per (method, learning rate), in order of appearance.

    A diverged run (NaN loss) scores what its merged output scores; a failed run (no output) counts as 0.
    """
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["lr"]), []).append(r)
    summary = []
    for (method, lr), runs in groups.items():
        em = [0.0 if r["exact_match"] != r["exact_match"] else r["exact_match"] for r in runs]
        losses = [r["final_loss"] for r in runs]
        summary.append({"method": method, "lr": lr, "runs": len(runs), "median": statistics.median(em),
                        "min": min(em), "max": max(em), "median_final_loss": statistics.median(losses)})  # fmt: skip
    return summary


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def study(name: str, out_dir: Path, plan: list[tuple[str, float, int, int]], jobs: int) -> list[dict]:
    """Run every ``(method, lr, seed, threads)``, ``jobs`` at a time (each run's rounding depends on its thread
    count, not on what else the machine runs); ``NAME.csv`` (every run) and ``NAME_summary.csv`` are rewritten as
    runs finish."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for result in pool.map(lambda p: run(*p, out_dir), plan):
            results.append(result)
            write_csv(results, out_dir / f"{name}.csv")
            write_csv(summarize(results), out_dir / f"{name}_summary.csv")
    return summarize(results)


def table(
    out_dir: Path = Path("out/demo_study"),
    methods: tuple[str, ...] = ("ether", "etherplus", "oft", "naive", "lora"),
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5),
    threads: tuple[int, ...] = (1, 2),
    lora_best_lr: float | None = None,
    jobs: int = 1,
    name: str = "table",
) -> None:
    """Each method at its demo preset's learning rate (LoRA at litgpt's default, and at ``lora_best_lr`` if given),
    over every seed and thread count.

    Arguments:
        out_dir: Where the runs, ``table.csv`` and ``table_summary.csv`` go.
        methods: Demo presets by name, and "lora".
        seeds: Training seeds.
        threads: CPU thread counts (``OMP_NUM_THREADS``).
        lora_best_lr: LoRA's best rate from the sweep, run in addition to its default.
        jobs: Runs at a time.
        name: The CSVs' name (``NAME.csv``, ``NAME_summary.csv``), to keep tables of other methods or seeds apart.
    """
    rates = {m: [preset(m)["optimizer"]["init_args"]["lr"]] for m in methods if m != "lora"}
    if "lora" in methods:
        rates["lora"] = [LORA_DEFAULT_LR] + ([lora_best_lr] if lora_best_lr is not None else [])
    plan = [(m, lr, s, t) for m in methods for lr in rates[m] for t in threads for s in seeds]
    print("| method | learning rate | runs | median | min - max |\n|---|---|---|---|---|")
    for r in study(name, out_dir, plan, jobs):
        print(f"| {r['method']} | {r['lr']:g} | {r['runs']} | {r['median']:.1%} | {r['min']:.1%} - {r['max']:.1%} |")


def sweep(
    out_dir: Path = Path("out/demo_study"),
    methods: tuple[str, ...] = ("ether", "etherplus", "oft", "naive", "lora"),
    lrs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1),
    seeds: tuple[int, ...] = (1, 2, 3),
    threads: int = 1,
    jobs: int = 1,
) -> None:
    """Every method at every learning rate over every seed; writes ``lr_sweep.png`` beside the CSVs.

    Arguments:
        out_dir: Where the runs, ``sweep.csv``, ``sweep_summary.csv`` and the plot go.
        methods: Demo presets by name, and "lora".
        lrs: The learning-rate grid.
        seeds: Training seeds per point.
        threads: CPU threads per run.
        jobs: Runs at a time.
    """
    summary = study("sweep", out_dir, [(m, lr, s, threads) for m in methods for lr in lrs for s in seeds], jobs)
    print(f"| learning rate | {' | '.join(f'{lr:g}' for lr in lrs)} |\n|---{'|---' * len(lrs)}|")
    for method in methods:
        cells = [next(r for r in summary if r["method"] == method and r["lr"] == lr) for lr in lrs]
        print(
            f"| {method} | " + " | ".join(f"{c['median']:.1%} ({c['min']:.1%} - {c['max']:.1%})" for c in cells) + " |"
        )
    plot(summary, out_dir / "lr_sweep.png", preset("etherplus")["train"]["max_steps"], len(seeds))


def plot(summary: list[dict], path: Path, steps: int, n_seeds: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in summary):
        points = [r for r in summary if r["method"] == method]
        lrs = [r["lr"] for r in points]
        median = [100 * r["median"] for r in points]
        spread = [[100 * (r["median"] - r["min"]) for r in points], [100 * (r["max"] - r["median"]) for r in points]]
        axes[0].errorbar(lrs, median, yerr=spread, marker="o", capsize=3, label=method)
        axes[1].plot(lrs, [r["median_final_loss"] for r in points], marker="o", label=method)
    for ax, label in zip(axes, ["held-out exact match (%): median, min-max", "final training loss (median)"]):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1].set_yscale("log")
    fig.suptitle(f"Demo: {steps} steps per run, {n_seeds} seeds per point")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"Wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    from jsonargparse import auto_cli

    auto_cli({"table": table, "sweep": sweep, "score": score})
