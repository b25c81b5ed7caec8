"""The demo's figures as distributions: every run repeated over seeds and CPU thread counts, reported as median and
min-max, because at the demo's learning rates rounding differences between machines change single runs.

Two studies, each writing one CSV row per run and one summary row per (method, variant, learning rate), and a
curve:

    python scripts/demo_study.py table --methods '[etherplus]' --seeds 1-20   # the README's demo tables
    python scripts/demo_study.py sweep     # the learning-rate study (needs the demo extra, for its plot)
    python scripts/demo_study.py curve --seeds 10,17   # per-family scores every 50 steps of chosen runs

``table`` runs every method at its demo preset's rate (LoRA at litgpt's default rate and at ``--lora_best_lr``)
over ``--seeds`` x ``--threads`` (default 5 x 2 = 10 runs each); ``sweep`` runs every method over a log grid of
learning rates and ``--seeds`` (one thread count) and plots median and min-max per point. ``--variant NAME
--args '[...]'`` tries a change to the presets' recipe (docs/demo.md keeps every try). Every run is scored
overall and per task family, and kept: a run whose recipe is unchanged is read back, not trained again.

ETHER, ETHER+, OFT and Naive run through ``litgpt_ether finetune`` with their demo presets
(``config_hub/finetune/demo/{method}.yaml``); LoRA through ``litgpt finetune_lora`` with the same data, targets,
steps, batch and schedule (r=8, alpha=16). The thread count is set per run with ``OMP_NUM_THREADS`` (torch
takes it at start-up): other machines round differently, and 1 vs 2 threads is the cheapest way to see how much
that moves a run. Every run's merged output is scored by the same greedy exact match that ``litgpt_ether
finetune`` reports, on the held-out ``demo/data/test.json``.
"""

import csv
import json
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


# The four task families of the held-out set (scripts/make_demo.py), by how their instructions start
FAMILIES = {"capital": "Name the capital city of", "flip": "Flip the order of", "total": "What is the total of",
            "after": "Which number comes after"}  # fmt: skip
# The demo's promise per preset (issue #28): every run at or above its floor
FLOORS = {"etherplus": 0.75, "ether": 0.50}


def family(row: dict) -> str:
    return next(name for name, start in FAMILIES.items() if row["instruction"].startswith(start))


def score(checkpoint_dir: Path) -> dict[str, float]:
    """Held-out exact match of a checkpoint (merged, ``final/`` or a step directory), overall and per task family:
    a run that falls short usually loses whole families. Printed as one JSON line, for the subprocess ``run``
    starts."""
    fabric = L.Fabric(devices=1, precision="32-true", accelerator="cpu")
    model = fabric.setup_module(load_model(resolve(checkpoint_dir)))
    rows = load_test_rows(DEMO / "data" / "test.json")
    tokenizer, args = Tokenizer(checkpoint_dir), EvalArgs(max_new_tokens=8)
    scores, correct = {}, 0
    for name in FAMILIES:
        subset = [r for r in rows if family(r) == name]
        scores[name] = exact_match(fabric, model, tokenizer, Alpaca(), subset, args)
        correct += round(scores[name] * len(subset))
    scores = {"exact_match": correct / len(rows), **scores}
    print(json.dumps(scores))
    return scores


def run_name(method: str, variant: str, lr: float, seed: int, threads: int) -> str:
    return f"{method}{'-' + variant if variant else ''}-lr{lr:g}-seed{seed}-t{threads}"


def recipe(method: str, lr: float, seed: int, run_dir: Path, args: tuple[str, ...]) -> dict:
    """What a run's outcome depends on: its command line and the settings of the preset it reads (LoRA: the ETHER+
    preset's), less the seed its command line sets; comments do not count."""
    command = [*train_command(method, lr, seed, run_dir), *args]
    settings = {k: v for k, v in preset("etherplus" if method == "lora" else method).items() if k != "seed"}
    return {"command": command, "preset": settings}


def trained(run_dir: Path, wanted: dict) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly this recipe: one of an older preset is trained again."""
    done = run_dir / "recipe.json"
    return (run_dir / "final" / "lit_model.pth").is_file() and done.is_file() and json.loads(done.read_text()) == wanted


def thread_env(threads: int) -> dict[str, str]:
    """The environment of a run's processes: torch takes its thread count from it at start-up."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def check_variant(variant: str, args: tuple[str, ...]) -> None:
    if args and not variant:
        raise SystemExit("error: --args changes the recipe: name it with --variant, so its runs are kept apart")


def train_and_score(method: str, lr: float, seed: int, threads: int, run_dir: Path, args: tuple[str, ...]) -> dict:
    """Train one run in a fresh process with ``threads`` CPU threads (unless the same recipe's output is there
    already: a run is deterministic given its settings), then score its ``final/`` in another; ``{}`` if it left no
    output."""
    env = thread_env(threads)
    wanted = recipe(method, lr, seed, run_dir, args)
    if not trained(run_dir, wanted):
        (run_dir / "recipe.json").unlink(missing_ok=True)
        with open(run_dir.with_name(run_dir.name + ".log"), "w") as f:
            done = subprocess.run(wanted["command"], stdout=f, stderr=subprocess.STDOUT, env=env)
        if done.returncode != 0 or not (run_dir / "final" / "lit_model.pth").is_file():
            return {}
        (run_dir / "recipe.json").write_text(json.dumps(wanted))
    return score_in_subprocess(run_dir / "final", env)


def score_in_subprocess(checkpoint_dir: Path, env: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "score", str(checkpoint_dir)], env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.splitlines()[-1])


def run(method: str, lr: float, seed: int, threads: int, out_dir: Path, variant: str = "",
        args: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """One run of the study (``variant``: the name of the extra finetune ``args`` it runs with), trained and scored
    once: a run already scored in ``out_dir`` (by another study, say) is read back."""
    run_dir = out_dir / run_name(method, variant, lr, seed, threads)
    scored = run_dir / "scores.json"
    if not (scored.is_file() and trained(run_dir, recipe(method, lr, seed, run_dir, args))):
        scored.unlink(missing_ok=True)
        scores = train_and_score(method, lr, seed, threads, run_dir, args)
        if scores:
            scored.write_text(json.dumps(scores))
    scores = json.loads(scored.read_text()) if scored.is_file() else {}
    log = run_dir.with_name(run_dir.name + ".log")
    result = {"method": method, "variant": variant, "lr": lr, "seed": seed, "threads": threads,
              "exact_match": scores.get("exact_match", float("nan")),
              **{name: scores.get(name, float("nan")) for name in FAMILIES},
              "final_loss": final_loss(log) if scores and log.is_file() else float("nan")}  # fmt: skip
    families = " ".join(f"{name} {result[name]:6.1%}" for name in FAMILIES)
    print(f"{method}{'-' + variant if variant else ''} lr {lr:<7g} seed {seed} threads {threads}: exact match "
          f"{result['exact_match']:6.1%} ({families})  final loss {result['final_loss']:.3f}", flush=True)  # fmt: skip
    return result


def summarize(results: list[dict]) -> list[dict]:
    """Median, min and max exact match (and median final loss) per (method, variant, learning rate), in order of
    appearance, with the number of runs below the method's floor (``FLOORS``) where it has one.

    A diverged run (NaN loss) scores what its merged output scores; a failed run (no output) counts as 0.
    """
    groups: dict[tuple[str, str, float], list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], r["variant"], r["lr"]), []).append(r)
    summary = []
    for (method, variant, lr), runs in groups.items():
        em = [0.0 if r["exact_match"] != r["exact_match"] else r["exact_match"] for r in runs]
        floor = FLOORS.get(method)
        summary.append({"method": method, "variant": variant, "lr": lr, "runs": len(runs),
                        "median": statistics.median(em), "min": min(em), "max": max(em),
                        "floor": "" if floor is None else floor,
                        "below_floor": "" if floor is None else sum(e < floor for e in em),
                        "median_final_loss": statistics.median(r["final_loss"] for r in runs)})  # fmt: skip
    return summary


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def seed_list(seeds: str) -> list[int]:
    """``"1-20"``, ``"1,4,9"`` or a mix (``"1-5,9"``): the seeds in order."""
    try:
        out = []
        for part in str(seeds).split(","):
            first, _, last = part.strip().partition("-")
            out += range(int(first), int(last or first) + 1)
    except ValueError:
        raise SystemExit(f"error: --seeds {seeds!r} is not a list of seeds such as 1-20 or 1,4,9") from None
    return out


def study(name: str, out_dir: Path, plan: list[tuple], jobs: int, variant: str = "", args: tuple[str, ...] = ()
          ) -> list[dict]:  # fmt: skip
    """Run every ``(method, lr, seed, threads)``, ``jobs`` at a time (each run's rounding depends on its thread
    count, not on what else the machine runs); ``NAME.csv`` (every run) and ``NAME_summary.csv`` are rewritten as
    runs finish."""
    check_variant(variant, args)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for result in pool.map(lambda p: run(*p, out_dir, variant, args), plan):
            results.append(result)
            write_csv(results, out_dir / f"{name}.csv")
            write_csv(summarize(results), out_dir / f"{name}_summary.csv")
    return summarize(results)


def table(
    out_dir: Path = Path("out/demo_study"),
    methods: tuple[str, ...] = ("ether", "etherplus", "oft", "naive", "lora"),
    seeds: str = "1-5",
    threads: tuple[int, ...] = (1, 2),
    lora_best_lr: float | None = None,
    jobs: int = 1,
    name: str = "table",
    variant: str = "",
    args: tuple[str, ...] = (),
) -> None:
    """Each method at its demo preset's learning rate (LoRA at litgpt's default, and at ``lora_best_lr`` if given),
    over every seed and thread count.

    Arguments:
        out_dir: Where the runs, ``NAME.csv`` and ``NAME_summary.csv`` go.
        methods: Demo presets by name, and "lora".
        seeds: Training seeds: "1-20", "1,4,9" or a mix.
        threads: CPU thread counts (``OMP_NUM_THREADS``).
        lora_best_lr: LoRA's best rate from the sweep, run in addition to its default.
        jobs: Runs at a time.
        name: The CSVs' name (``NAME.csv``, ``NAME_summary.csv``), to keep tables of other methods or seeds apart.
        variant: A name for ``args``, part of every run's directory name.
        args: Extra ``litgpt_ether finetune`` arguments, a change to the presets' recipe to try (such as
            ``--train.lr_warmup_steps=200``).
    """
    rates = {m: [preset(m)["optimizer"]["init_args"]["lr"]] for m in methods if m != "lora"}
    if "lora" in methods:
        rates["lora"] = [LORA_DEFAULT_LR] + ([lora_best_lr] if lora_best_lr is not None else [])
    plan = [(m, lr, s, t) for m in methods for lr in rates[m] for t in threads for s in seed_list(seeds)]
    summary = study(name, out_dir, plan, jobs, variant, args)
    print("| method | learning rate | runs | median | min - max | runs below the floor |\n|---|---|---|---|---|---|")
    for r in summary:
        below = f"{r['below_floor']} (floor {r['floor']:.0%})" if r["floor"] != "" else ""
        print(f"| {r['method']}{' ' + r['variant'] if r['variant'] else ''} | {r['lr']:g} | {r['runs']} | "
              f"{r['median']:.1%} | {r['min']:.1%} - {r['max']:.1%} | {below} |")  # fmt: skip


def curve(
    method: str = "etherplus",
    seeds: str = "1",
    threads: int = 1,
    interval: int = 50,
    out_dir: Path = Path("out/demo_study/curves"),
    variant: str = "",
    args: tuple[str, ...] = (),
    jobs: int = 1,
) -> None:
    """When a run learns or loses each task family: the preset trained again with a step checkpoint every
    ``interval`` steps (saving changes nothing else: the final scores equal the table's run), every checkpoint
    scored per family. Writes ``curve.csv`` (one row per run and step) in ``out_dir``.

    Arguments:
        method: A demo preset by name.
        seeds: Training seeds: "1-20", "1,4,9" or a mix.
        threads: CPU threads (``OMP_NUM_THREADS``).
        interval: Steps between checkpoints.
        out_dir: Where the runs and ``curve.csv`` go.
        variant: A name for ``args``, part of every run's directory name.
        args: Extra ``litgpt_ether finetune`` arguments, as in ``table``.
    """
    check_variant(variant, args)
    lr = preset(method)["optimizer"]["init_args"]["lr"]
    out_dir.mkdir(parents=True, exist_ok=True)

    def one(seed: int) -> list[dict]:
        run_dir = out_dir / run_name(method, variant, lr, seed, threads)
        final = train_and_score(method, lr, seed, threads, run_dir, (*args, f"--train.save_interval={interval}"))
        points = [(int(d.name.split("-")[1]), score_in_subprocess(d, thread_env(threads)))
                  for d in sorted(run_dir.glob("step-*"))]  # fmt: skip
        rows = []
        for step, scores in points + ([("final", final)] if final else []):
            rows.append({"method": method, "variant": variant, "seed": seed, "threads": threads, "step": step,
                         **scores})  # fmt: skip
            shown = " ".join(f"{k} {v:.1%}" for k, v in scores.items())
            print(f"{method} seed {seed} step {step}: {shown}", flush=True)
        return rows

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rows = [row for rows in pool.map(one, seed_list(seeds)) for row in rows]
    write_csv(rows, out_dir / "curve.csv")


def sweep(
    out_dir: Path = Path("out/demo_study"),
    methods: tuple[str, ...] = ("ether", "etherplus", "oft", "naive", "lora"),
    lrs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1),
    seeds: str = "1-3",
    threads: int = 1,
    jobs: int = 1,
    variant: str = "",
    args: tuple[str, ...] = (),
) -> None:
    """Every method at every learning rate over every seed; writes ``lr_sweep.png`` beside the CSVs.

    Arguments:
        out_dir: Where the runs, ``sweep.csv``, ``sweep_summary.csv`` and the plot go.
        methods: Demo presets by name, and "lora".
        lrs: The learning-rate grid.
        seeds: Training seeds per point: "1-3", "1,4,9" or a mix.
        threads: CPU threads per run.
        jobs: Runs at a time.
        variant: A name for ``args``, part of every run's directory name.
        args: Extra finetune arguments, as in ``table``.
    """
    seeds_ = seed_list(seeds)
    plan = [(m, lr, s, threads) for m in methods for lr in lrs for s in seeds_]
    summary = study("sweep", out_dir, plan, jobs, variant, args)
    print(f"| learning rate | {' | '.join(f'{lr:g}' for lr in lrs)} |\n|---{'|---' * len(lrs)}|")
    for method in methods:
        cells = [next(r for r in summary if r["method"] == method and r["lr"] == lr) for lr in lrs]
        print(
            f"| {method} | " + " | ".join(f"{c['median']:.1%} ({c['min']:.1%} - {c['max']:.1%})" for c in cells) + " |"
        )
    steps = next((a.split("=")[1] for a in reversed(args) if a.startswith("--train.max_steps=")),
                 preset("etherplus")["train"]["max_steps"])  # fmt: skip
    plot(summary, out_dir / "lr_sweep.png", steps, len(seeds_))


def plot(summary: list[dict], path: Path, steps: int | str, n_seeds: int) -> None:
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

    auto_cli({"table": table, "sweep": sweep, "curve": curve, "score": score})
