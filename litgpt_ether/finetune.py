"""``litgpt_ether finetune``: instruction-tune a litgpt checkpoint with ETHER or ETHER+.

Reads top to bottom like litgpt's ``finetune/lora.py``: ``setup`` (parse, pick strategy and
precision) -> ``main`` (data, model, optimizer, base weights) -> ``fit`` (the loop) -> save the adapter
and a merged checkpoint. litgpt's data modules, tokenizer, prompt styles, args, logger and helpers are
used as they are.
"""

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from pprint import pprint
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
import yaml
from lightning.fabric.strategies import ModelParallelStrategy
from lightning.fabric.utilities import ThroughputMonitor
from litgpt.args import EvalArgs, LogArgs, TrainArgs
from litgpt.data import Alpaca, DataModule
from litgpt.finetune.lora import (
    generate_example,
    get_dataloaders,
    get_lr_scheduler,
    validate,
)
from litgpt.generate.base import generate_fn
from litgpt.parser_config import save_hyperparameters
from litgpt.prompts import PromptStyle, save_prompt_style
from litgpt.tokenizer import Tokenizer
from litgpt.types import LoggerChoice
from litgpt.utils import (
    CycleIterator,
    choose_logger,
    chunked_cross_entropy,
    copy_config_files,
    create_finetuning_performance_report,
    init_out_dir,
    instantiate_torch_optimizer,
    num_parameters,
    select_sft_generate_example,
)
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader
from torchmetrics import RunningMean

from litgpt_ether.checkpoint import (
    ADAPTER_FILE,
    TRAINING_STATE_FILE,
    Resolved,
    atomic_save,
    check_adapter_fits,
    check_checkpoint_dir,
    exclusive,
    load_adapter,
    load_tokenizer,
    merge_adapter,
    read_model_config,
    save_adapter,
    staged_dir,
)
from litgpt_ether.checks import (
    Accelerator,
    ConfigError,
    TrainingQuantize,
    check_devices,
    check_json_data,
    check_numbers,
    check_optimizer,
    check_output_dir,
    check_outputs_fit,
    check_rows,
    check_samples_fit,
    check_train_args,
    quantization,
)
from litgpt_ether.ether import (
    GPT,
    Config,
    EtherMethod,
    ether_state_dict,
    initial_ether_state,
    load_base_checkpoint,
    load_state,
    mark_only_ether_as_trainable,
)

# what Fabric's ModelParallelStrategy (FSDP2) runs with; not 16-true: ETHER's vectors stay in fp32 there
# (``trainable_in_fp32``), and FSDP2 wants one dtype for all of a module's parameters
FSDP_PRECISIONS = ("32-true", "bf16-true", "bf16-mixed")
# optimizer state saved whole (FSDP shards gathered) and loaded from whole tensors: one format for any world size
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def setup(
    checkpoint_dir: Path,
    out_dir: Path = Path("out/finetune/ether"),
    precision: str | None = None,
    quantize: TrainingQuantize | None = None,
    accelerator: Accelerator = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    ether_method: EtherMethod = "ether",
    ether_one_sided: bool = False,
    ether_nb: int = 1,
    ether_flip_side: bool = False,
    ether_dropout: float = 0.0,
    ether_query: bool = True,
    ether_key: bool = False,
    ether_value: bool = True,
    ether_projection: bool = False,
    ether_mlp: bool = False,
    ether_head: bool = False,
    data: DataModule | None = None,
    train: TrainArgs = TrainArgs(
        save_interval=1000,
        log_interval=1,
        global_batch_size=16,
        micro_batch_size=1,
        lr_warmup_steps=100,
        epochs=5,
        max_seq_length=None,
    ),
    log: LogArgs = LogArgs(),
    eval: EvalArgs = EvalArgs(interval=100, max_new_tokens=100, max_iters=100),
    optimizer: str | dict = "AdamW",
    logger_name: LoggerChoice = "csv",
    seed: int = 1337,
    test_data: Path | None = None,
    resume: bool | Literal["auto"] | Path = False,
    overwrite: bool = False,
    activation_checkpointing: bool | None = None,
    compile: bool = False,
    pad_multiple: int | None = None,
) -> None:
    """Finetune a model with ETHER or ETHER+.

    Arguments:
        checkpoint_dir: The base model's litgpt checkpoint directory (``lit_model.pth``, ``model_config.yaml``,
            tokenizer files).
        out_dir: Directory for checkpoints, logs and the final adapter and merged model.
        precision: "bf16-true", "bf16-mixed", "32-true", ... Defaults to the best the device supports.
        quantize: Quantize the frozen base weights with bitsandbytes (litgpt's choices; one CUDA device). ETHER acts
            on the activations around the quantized layers; the adapter merges into the full-precision base weights.
        accelerator: "auto", "cpu", "cuda" (or "gpu") or "mps".
        devices: How many devices to use per node: a positive integer, or "auto" / -1 for every CUDA device. More
            than one (on any number of nodes) trains with FSDP: weights, gradients and optimizer state are sharded.
        num_nodes: How many nodes the code is being run on (launch one process per node, see the README).
        ether_method: "ether" (one Householder reflection per block) or "etherplus" (ETHER+: two
            hyperplanes per block, both sides of each layer unless ``ether_one_sided``).
        ether_one_sided: ETHER+ only: reflect one side of each layer, like ETHER.
        ether_nb: Number of diagonal blocks; must divide every reflected dimension. More blocks are
            cheaper and on Llama-2-7B n=32 gave the paper's best results.
        ether_flip_side: One-sided only: reflect the output side of non-QKV layers instead of the input.
        ether_dropout: Dropout on the input of targeted layers.
        ether_query: Reflect the attention queries.
        ether_key: Reflect the attention keys.
        ether_value: Reflect the attention values.
        ether_projection: Reflect the attention output projection.
        ether_mlp: Reflect every linear of the MLP.
        ether_head: Reflect the output head.
        data: Data-related arguments. If not provided, the default is ``litgpt.data.Alpaca``.
        train: Training-related arguments. See ``litgpt.args.TrainArgs`` for details.
        log: Logger arguments. See ``litgpt.args.LogArgs`` for details.
        eval: Evaluation-related arguments. See ``litgpt.args.EvalArgs`` for details.
        optimizer: An optimizer name (such as "AdamW") or config.
        logger_name: The name of the logger to send metrics to.
        seed: The random seed to use for reproducibility.
        test_data: Optional held-out samples (an Alpaca-format JSON list with ``instruction``, ``input``,
            ``output``): the model's greedy answers to them are scored by exact match before and after tuning,
            and reported in the final summary.
        resume: Continue a run from a step checkpoint: "auto" (or true) takes the latest complete ``step-*`` in
            ``out_dir`` (starting afresh if there is none), a path names one. The adapter, optimizer, scheduler,
            RNG states and data position are restored, so the run ends as if it had never stopped.
        overwrite: Start afresh in an ``out_dir`` that holds a previous run's checkpoints. They are moved aside and
            deleted once the new run has saved its first checkpoint; a run that fails before that puts them back.
        activation_checkpointing: Recompute each transformer block's activations in the backward pass instead of
            keeping them: far less memory for about a third more compute. Default: on with more than one device.
        compile: ``torch.compile`` each transformer block for the training steps (validation and generation stay
            eager). One device. Pair it with ``pad_multiple``: every new batch length compiles again.
        pad_multiple: Pad each training batch to a multiple of this many tokens (at most the model's maximum
            sequence length) instead of to its longest sample, so batches come in a few lengths.
    """
    ether_args = {k: v for k, v in locals().items() if k.startswith("ether_")}
    pprint(locals())
    # every check first, in the order a user would fix things; nothing is written until they all pass
    optimizer = normalize_optimizer(optimizer)
    check_numbers(locals())
    check_train_args(train, eval)
    devices = check_devices(accelerator, devices)
    world_size = devices * num_nodes
    precision, plugins = quantization(quantize, precision, True, accelerator, world_size)
    if world_size > 1 and precision not in FSDP_PRECISIONS:
        raise ConfigError(f"--precision {precision} does not work with FSDP (more than one device): use one of"
                          f" {', '.join(FSDP_PRECISIONS)}")  # fmt: skip
    if compile and world_size > 1:
        raise ConfigError("--compile true runs on one device: drop it, or train with --devices 1")
    if activation_checkpointing is None:
        activation_checkpointing = world_size > 1
    check_checkpoint_dir(checkpoint_dir)
    config = read_model_config(checkpoint_dir / "model_config.yaml", ether_args)
    with torch.device("meta"):  # a bad ETHER configuration, or base weights that are unreadable or do not fit it
        load_base_checkpoint(GPT(config), checkpoint_dir / "lit_model.pth", assign=True)  # memory-mapped: cheap
    check_optimizer(optimizer)
    data = Alpaca() if data is None else data
    check_json_data(data)
    if train.global_batch_size < world_size * train.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is smaller than devices x num_nodes x"
            f" train.micro_batch_size = {world_size * train.micro_batch_size}"
        )
    out_dir = init_out_dir(out_dir)
    check_output_dir(out_dir)
    test_rows = load_test_rows(test_data) if test_data is not None else None

    logger = choose_logger(
        logger_name,
        out_dir,
        name=f"finetune-ether-{config.name}",
        log_interval=train.log_interval,
        log_args=dataclasses.asdict(log),
    )
    strategy = "auto"
    if world_size > 1:
        strategy = ModelParallelStrategy(
            parallelize_fn=partial(parallelize, activation_checkpointing=activation_checkpointing),
            data_parallel_size=world_size,
            tensor_parallel_size=1,
        )
    fabric = L.Fabric(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision,
        plugins=plugins,
        loggers=logger,
    )
    # one writer per out_dir: rank 0 writes every file (the other ranks, started by ``launch``, run this again);
    # a run in the way is refused before anything is written
    check = partial(prepare_out_dir, out_dir, resume, overwrite)
    with exclusive(out_dir, check) if fabric.global_rank == 0 else contextlib.nullcontext(check()) as resume_dir:
        set_aside = fabric.global_rank == 0 and overwrite and resume_dir is None and set_aside_previous_run(out_dir)
        try:
            fabric.launch(
                main, devices, seed, config, data, checkpoint_dir, out_dir, train, eval, optimizer, num_nodes,
                test_rows, resume_dir, activation_checkpointing and world_size == 1, compile, pad_multiple,
            )  # fmt: skip
        except BaseException as err:
            if set_aside:
                restore_previous_run(out_dir)  # the new run saved nothing: the old one is back as it was
            if isinstance(err, KeyboardInterrupt):  # Ctrl-C: where the run stands, in one line, not a traceback
                steps = step_checkpoints(out_dir)
                where = (f"its latest checkpoint is {str(steps[-1])!r}: continue it with the same command and"
                         " --resume auto" if steps else "no checkpoint was saved yet: start it again")  # fmt: skip
                raise Interrupted(f"finetune interrupted; {where}") from None
            raise


def main(
    fabric: L.Fabric,
    devices: int,
    seed: int,
    config: Config,
    data: DataModule,
    checkpoint_dir: Path,
    out_dir: Path,
    train: TrainArgs,
    eval: EvalArgs,
    optimizer: str | dict,
    num_nodes: int = 1,
    test_rows: list[dict] | None = None,
    resume_dir: Path | None = None,
    checkpoint_blocks: bool = False,
    compile: bool = False,
    pad_multiple: int | None = None,
) -> None:
    tokenizer = load_tokenizer(checkpoint_dir)
    try:
        train_dataloader, val_dataloader = get_dataloaders(fabric, data, tokenizer, train)
    except OSError as err:  # a data module that downloads (Alpaca, ...) without a network; requests' errors too
        detail = " ".join(str(err).split())[:300]
        raise ConfigError(f"could not prepare the data ({type(err).__name__}: {detail})") from None
    check_outputs_fit(train_dataloader.dataset, train.max_seq_length)
    longest = check_samples_fit(
        train_dataloader.dataset, val_dataloader.dataset, train.max_seq_length, config.block_size
    )
    steps_per_epoch = len(train_dataloader) // train.gradient_accumulation_iters(devices, num_nodes)
    lr_max_steps = min(train.epochs * steps_per_epoch, (train.max_steps or float("inf")))
    if lr_max_steps <= (train.lr_warmup_steps or 0):
        raise ConfigError(
            f"train.lr_warmup_steps={train.lr_warmup_steps} leaves no step after warmup (the run has {lr_max_steps})"
        )

    fabric.seed_everything(seed)

    # every tensor is loaded below, so nothing is initialised here: on "meta" for FSDP, which shards it first
    with fabric.init_module(empty_init=True):
        model = GPT(config)
    mark_only_ether_as_trainable(model)
    trainable_parameters = num_parameters(model, requires_grad=True)
    fabric.print(f"Number of trainable parameters: {trainable_parameters:,}")
    fabric.print(f"Number of non-trainable parameters: {num_parameters(model, requires_grad=False):,}")

    # what a resumed run must share with the run it continues, for the replayed data order to be the same
    run = {"ether": config.ether_args(), "seed": seed, "world_size": fabric.world_size,
           "global_batch_size": train.global_batch_size, "micro_batch_size": train.micro_batch_size,
           "max_seq_length": train.max_seq_length}  # fmt: skip
    state = load_training_state(resume_dir, run) if resume_dir is not None else None
    if state is not None:
        adapter = load_adapter(resume_dir / ADAPTER_FILE)[0]
        check_adapter_fits(model, adapter, Resolved(resume_dir, checkpoint_dir, resume_dir / ADAPTER_FILE))
    else:  # the same starting adapter on any device and number of processes, drawn from the seed alone
        adapter = initial_ether_state(model, seed)

    if compile:  # per block, as torchtune does: one graph per block, compiled once for all of them
        for block in model.transformer.h:
            block.compile()
    if checkpoint_blocks:  # with FSDP, ``parallelize`` does it
        checkpoint_each_block(model)
    model = fabric.setup_module(model)
    trainable_in_fp32(model)
    load_base_checkpoint(model, checkpoint_dir / "lit_model.pth")
    load_state(model, adapter)
    if fabric.world_size > 1:
        # FSDP allocates the gathered weights in the first forward, which must not be litgpt's generation (it runs
        # in inference mode, and tensors made there cannot be written by training later)
        with torch.no_grad():
            model(torch.zeros(1, 1, dtype=torch.long, device=fabric.device))

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = fabric.setup_optimizers(instantiate_torch_optimizer(optimizer, trainable))
    scheduler = get_lr_scheduler(optimizer, warmup_steps=train.lr_warmup_steps, max_steps=lr_max_steps)
    if state is not None:
        set_optimizer_state_dict(model.module, optimizer.optimizer, state["optimizer"], options=FULL_STATE)
        scheduler.load_state_dict(state["scheduler"])
        progress = Progress(**state["progress"])
    else:
        progress = Progress(summary={"trainable_parameters": trainable_parameters})

    summary = progress.summary  # saved with every step checkpoint, so a resumed run keeps the "before" score
    if test_rows and "exact_match_before" not in summary:
        summary["exact_match_before"] = eagerly(
            exact_match, fabric, model, tokenizer, data.prompt_style, test_rows, eval
        )
        fabric.print(
            f"Held-out exact match before tuning: {summary['exact_match_before']:.1%} ({len(test_rows)} samples)"
        )
    rng = state["rng"] if state is not None else None
    progress = fit(fabric, model, optimizer, scheduler, train_dataloader, val_dataloader, devices, checkpoint_dir,
                   out_dir, train, eval, data, longest, num_nodes, progress, rng, run, pad_multiple)  # fmt: skip
    training_time, token_counts = progress.seconds, progress.token_counts
    fabric.print(create_finetuning_performance_report(training_time, token_counts, fabric.device.type))

    summary["training_seconds"] = training_time
    summary["tokens_per_second"] = token_counts["raw_tokens_plus_prompt_template_and_padding"] / training_time
    if eval.final_validation:
        val_loss = eagerly(
            validate, fabric, model, val_dataloader, dataclasses.replace(eval, max_iters=len(val_dataloader))
        )
        fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(val_loss)})
        fabric.print(f"Final evaluation | val loss: {val_loss.item():.3f} | val ppl: {math.exp(val_loss):.3f}")
        summary["val_loss"] = val_loss.item()
    if test_rows:
        summary["exact_match_after"] = eagerly(
            exact_match, fabric, model, tokenizer, data.prompt_style, test_rows, eval
        )

    final_dir = out_dir / "final"
    save_checkpoint(fabric, model, config, checkpoint_dir, final_dir, data, summary=summary)
    fabric.print(f"Saved the ETHER adapter and the merged model to {str(final_dir)!r}")
    fabric.print(format_summary(summary))
    for logger in fabric.loggers:
        logger.finalize("success")  # flush what the logger still buffers
    fabric.barrier()


def checkpoint_each_block(model: GPT) -> None:
    """Activation checkpointing per transformer block (the RNG state is kept, so dropout recomputes the same)."""
    model.transformer.h = torch.nn.ModuleList(checkpoint_wrapper(block) for block in model.transformer.h)


def parallelize(model: GPT, device_mesh: DeviceMesh, activation_checkpointing: bool) -> GPT:
    """FSDP2 for Fabric's ``ModelParallelStrategy``: one shard group per transformer block, one for the rest.

    The ETHER vectors are sharded with the frozen weights of their block and gathered with them for each forward.
    """
    if activation_checkpointing:
        checkpoint_each_block(model)
    mesh = device_mesh["data_parallel"]
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    # the root too gives its gathered weights back after each forward: after a forward without backward (validation,
    # generation) it would otherwise stay gathered, and the optimizer and the checkpoints see the shards only
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return model


def format_summary(summary: dict) -> str:
    """The run in one line: what a user wants to see last."""
    parts = [
        f"time {summary['training_seconds']:.1f} s",
        f"{summary['tokens_per_second']:,.0f} tokens/s",
        f"{summary['trainable_parameters']:,} trainable parameters",
    ]
    if "exact_match_after" in summary:
        parts.append(f"held-out exact match {summary['exact_match_before']:.1%} -> {summary['exact_match_after']:.1%}")
    return "Summary | " + " | ".join(parts)


def trainable_in_fp32(model: torch.nn.Module) -> None:
    """Under ``--precision 16-true``, keep the trainable vectors (and so their gradients and AdamW's state) in fp32.

    Why: in float16, AdamW's ``eps`` (1e-8) and small squared gradients round to zero, so its first update divides
    by zero and the loss is NaN from the second step. The vectors are few (a 7B model's are 1 MB in fp32), and the
    layers cast the unit vectors to the activations' dtype, so the forward still runs in float16.
    """
    for p in model.parameters():
        if p.requires_grad and p.dtype == torch.float16:
            p.data = p.data.float()


def normalize_optimizer(optimizer: str | dict) -> str | dict:
    """Fold ``--optimizer.lr 0.03`` (or ``--optimizer.init_args.lr``) over a config's optimizer into ``init_args``.

    jsonargparse parses a ``str | dict`` option given key by key as flat string entries beside ``class_path``;
    without this they would be silently ignored.
    """
    if not isinstance(optimizer, dict):
        return optimizer
    extra = {k: _parse_value(v) for k, v in optimizer.items() if k not in ("class_path", "init_args")}
    class_path = optimizer.get("class_path")
    if isinstance(class_path, str) and "." not in class_path:
        class_path = f"torch.optim.{class_path}"  # litgpt resolves a bare name only when it is given alone
    return {"class_path": class_path, "init_args": {**(optimizer.get("init_args") or {}), **extra}}


def _parse_value(value: object) -> object:
    """'0.03', '3e-2', '[0.9, 0.95]' -> numbers and lists (YAML alone reads '3e-2' as a string)."""
    if not isinstance(value, str):
        return value
    try:
        return float(value)
    except ValueError:
        return yaml.safe_load(value)


def load_test_rows(path: Path) -> list[dict]:
    try:
        rows = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"test_data {str(path)!r} is not a readable JSON file ({err})") from None
    check_rows(rows, f"test_data {str(path)!r}")
    return rows


@torch.no_grad()
def exact_match(
    fabric: L.Fabric, model: GPT, tokenizer: Tokenizer, prompt_style: PromptStyle, rows: list[dict], eval: EvalArgs
) -> float:
    """Share of ``rows`` whose greedy answer (up to ``eval.max_new_tokens``, stopped at EOS) equals ``output``."""
    model.eval()
    prompts = [tokenizer.encode(prompt_style.apply(r["instruction"], input=r.get("input", "")), device=fabric.device)
               for r in rows]  # fmt: skip
    train_length = model.max_seq_length
    model.max_seq_length = min(model.config.block_size, max(len(p) for p in prompts) + eval.max_new_tokens)
    with fabric.init_tensor():
        model.set_kv_cache(batch_size=1)
    correct = 0
    for row, prompt in zip(rows, prompts):
        budget = min(eval.max_new_tokens, model.max_seq_length - len(prompt))
        tokens = list(
            generate_fn(model, prompt, len(prompt) + budget, temperature=0.0, stop_tokens=([tokenizer.eos_id],),
                        include_prompt=False, include_eos=False)
        )  # fmt: skip
        answer = tokenizer.decode(torch.cat(tokens)) if tokens else ""
        correct += answer.strip() == row["output"].strip()
    model.clear_kv_cache()
    model.max_seq_length = train_length
    model.train()
    return correct / len(rows)


@dataclass
class Progress:
    """Where a run stands: what a resumed run restores besides the adapter, optimizer, scheduler and RNG."""

    step: int = 0
    iter_num: int = 0
    total_lengths: int = 0
    seconds: float = 0.0  # training time spent by earlier processes of this run
    val_loss: str = "n/a"
    token_counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("raw_tokens", "raw_tokens_plus_prompt_template", "raw_tokens_plus_prompt_template_and_padding"), 0
        )
    )
    summary: dict = field(default_factory=dict)


def fit(
    fabric: L.Fabric,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_dataloader: DataLoader,
    val_dataloader: DataLoader,
    devices: int,
    checkpoint_dir: Path,
    out_dir: Path,
    train: TrainArgs,
    eval: EvalArgs,
    data: DataModule,
    longest_seq_length: int,
    num_nodes: int = 1,
    progress: Progress | None = None,
    rng: dict | None = None,
    run: dict | None = None,
    pad_multiple: int | None = None,
) -> Progress:
    """The training loop. With ``progress`` and ``rng`` from a step checkpoint it continues that run exactly: the
    data iterator is replayed to the same position and the random state restored after it. ``longest_seq_length``
    is the longest sample of either split (``check_samples_fit``)."""
    resumed = rng is not None
    progress = progress or Progress()
    tokenizer = load_tokenizer(checkpoint_dir)
    model.max_seq_length = min(longest_seq_length, train.max_seq_length or float("inf"))
    fabric.print(
        f"The longest sequence length in the train data is {longest_seq_length}, the model's maximum sequence length is"
        f" {model.max_seq_length} and context length is {model.config.block_size}"
    )
    if eval.initial_validation and not resumed:
        full = dataclasses.replace(eval, max_iters=len(val_dataloader))
        progress.val_loss = f"{eagerly(validate, fabric, model, val_dataloader, full):.3f}"
    else:  # a sanity check
        eagerly(validate, fabric, model, val_dataloader, dataclasses.replace(eval, max_iters=2), verbose=False)

    accumulation = train.gradient_accumulation_iters(devices, num_nodes)
    train_iterator = CycleIterator(train_dataloader)
    if resumed:
        fabric.print(f"Resuming at step {progress.step}: replaying {progress.iter_num} batches of the data order")
        for _ in range(progress.iter_num):
            next(train_iterator)
        set_rng_state(rng)
    throughput = ThroughputMonitor(fabric, window_size=50)
    running_loss = RunningMean(window=accumulation, sync_on_compute=False).to(fabric.device)
    max_steps = train.max_steps or float("inf")
    max_time = train.max_time or float("inf")
    counts = dict.fromkeys(progress.token_counts, 0)  # this process's, since it started
    total_t0 = time.perf_counter()
    step_loss = torch.zeros((), device=fabric.device)  # the sum of this step's losses: non-finite if any is

    while progress.step < max_steps:
        progress.iter_num += 1
        iter_num = progress.iter_num
        iter_t0 = time.perf_counter()
        batch = next(train_iterator)
        if train_iterator.epoch >= train.epochs or progress.seconds + iter_t0 - total_t0 > max_time:
            fabric.print("Number of epochs or max time reached, stopping training...")
            break
        input_ids, targets = batch["input_ids"], batch["labels"]
        if pad_multiple is not None:
            input_ids, targets = pad_to_multiple(input_ids, targets, pad_multiple, model.max_seq_length)

        is_accumulating = iter_num % accumulation != 0
        with fabric.no_backward_sync(model, enabled=is_accumulating):
            logits = model(input_ids, lm_head_chunk_size=128)
            logits[-1] = logits[-1][..., :-1, :]  # output n predicts token n+1
            loss = chunked_cross_entropy(logits, targets[..., 1:])
            fabric.backward(loss / accumulation)
        running_loss.update(loss.detach())
        step_loss += loss.detach()

        if not is_accumulating:
            # before the update, so no checkpoint is ever saved from a bad step
            check_finite_loss(fabric, step_loss, progress.step + 1, out_dir)
            step_loss.zero_()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            progress.step += 1

        counts["raw_tokens"] += batch["token_counts"]["raw"].sum().item()
        counts["raw_tokens_plus_prompt_template"] += batch["token_counts"]["raw_plus_prompt_template"].sum().item()
        counts["raw_tokens_plus_prompt_template_and_padding"] += input_ids.numel()
        progress.total_lengths += input_ids.numel()

        if iter_num % train.log_interval == 0:
            loss = running_loss.compute().item()  # device-to-host sync
            t1 = time.perf_counter()
            throughput.update(
                time=t1 - total_t0,
                batches=iter_num,
                samples=iter_num * train.micro_batch_size,
                lengths=progress.total_lengths,
            )
            throughput.compute_and_log(step=iter_num)
            metrics = {
                "loss": loss,
                "iter": iter_num,
                "step": progress.step,
                "epoch": train_iterator.epoch,
                "iter_time": t1 - iter_t0,
                "tokens": counts["raw_tokens_plus_prompt_template"],
                "learning_rate": scheduler.get_last_lr()[0],
            }
            fabric.print(
                f"Epoch {metrics['epoch'] + 1} | iter {iter_num} step {progress.step} | loss train: {loss:.3f},"
                f" val: {progress.val_loss} | iter time: {metrics['iter_time'] * 1000:.2f} ms"
                f"{'' if is_accumulating else ' (step)'}"
            )
            fabric.log_dict(metrics, step=iter_num)

        if not is_accumulating and progress.step % eval.interval == 0:
            t0 = time.perf_counter()
            val = eagerly(validate, fabric, model, val_dataloader, eval)
            eagerly(sample_example, fabric, model, tokenizer, eval, data, seed=iter_num)
            val = fabric.all_reduce(val.to(fabric.device), reduce_op="mean")
            progress.val_loss = f"{val.item():.3f}"
            fabric.print(
                f"iter {iter_num}: val loss {progress.val_loss}, val time: {(time.perf_counter() - t0) * 1000:.2f} ms"
            )
            fabric.log_dict({"val_loss": val.item(), "val_ppl": math.exp(val.item())}, step=iter_num)

        if train.save_interval is not None and not is_accumulating and progress.step % train.save_interval == 0:
            seconds = progress.seconds + time.perf_counter() - total_t0
            totals = total_counts(fabric, progress.token_counts, counts)
            now = dataclasses.replace(progress, seconds=seconds, token_counts=totals)
            state = training_state(now, model, optimizer, scheduler, run or {})
            save_dir = out_dir / f"step-{progress.step:06d}"
            save_checkpoint(fabric, model, model.config, checkpoint_dir, save_dir, data, state)

    progress.seconds += time.perf_counter() - total_t0
    progress.token_counts = total_counts(fabric, progress.token_counts, counts)
    return progress


def pad_to_multiple(
    input_ids: torch.Tensor, targets: torch.Tensor, multiple: int, limit: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch padded on the right to a multiple of ``multiple`` tokens (at most ``limit``), as litgpt's collate pads
    (token 0, label ``-100``, which the loss ignores): batch lengths from a few values, so a compiled model is not
    compiled again for every new one."""
    length = input_ids.shape[1]
    padded = max(length, min(-(-length // multiple) * multiple, limit))
    if padded == length:
        return input_ids, targets
    return F.pad(input_ids, (0, padded - length), value=0), F.pad(targets, (0, padded - length), value=-100)


def eagerly(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(...)`` with compiled blocks run uncompiled: validation and generation have other shapes than the training
    batches (and a KV cache), each of which would compile the blocks again."""
    with torch.compiler.set_stance("force_eager"):
        return fn(*args, **kwargs)


def total_counts(fabric: L.Fabric, before: dict[str, int], counts: dict[str, int]) -> dict[str, int]:
    """The run's token counts: earlier processes' plus this one's, summed over ranks (every rank must call it)."""
    return {k: before[k] + int(fabric.all_reduce(torch.tensor(v, device=fabric.device), reduce_op="sum").item())
            for k, v in counts.items()}  # fmt: skip


@torch.no_grad()
def sample_example(
    fabric: L.Fabric, model: GPT, tokenizer: Tokenizer, eval: EvalArgs, data: DataModule, seed: int
) -> None:
    """litgpt's ``generate_example`` on every process (FSDP needs all of them in each forward), sampling from a
    forked RNG seeded alike everywhere: every process draws the same tokens, and training's RNG is untouched.

    The model's ``max_seq_length`` is the longest training sample, which the example's prompt plus
    ``eval.max_new_tokens`` can exceed (litgpt then skips the example with a note, at every validation): it is
    raised to fit the example, within the context, for the example only.
    """
    prompt = data.prompt_style.apply(select_sft_generate_example(eval, data))
    needed = min(len(tokenizer.encode(prompt)) + eval.max_new_tokens + 1, model.config.block_size)
    train_length = model.max_seq_length
    model.max_seq_length = max(train_length, needed)
    with torch.random.fork_rng(devices=[fabric.device] if fabric.device.type == "cuda" else []):
        torch.manual_seed(seed)
        generate_example(fabric, model, tokenizer, eval, data)
    model.max_seq_length = train_length


# --------------------------------------------------------------------------------------------------
# Resuming: a step checkpoint holds the adapter and ``training_state.pth`` (optimizer, scheduler, RNG, progress).


def rng_state() -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])


def training_state(progress: Progress, model: Any, optimizer: Any, scheduler: Any, run: dict) -> dict:
    """Everything to resume from besides the adapter; the optimizer state is gathered whole (a collective)."""
    return {
        "progress": dataclasses.asdict(progress),
        "optimizer": get_optimizer_state_dict(model.module, optimizer.optimizer, options=FULL_STATE),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "run": run,
    }


def step_checkpoints(out_dir: Path) -> list[Path]:
    """The complete step checkpoints in ``out_dir``, oldest first (a save in progress has another name)."""
    steps = [d for d in out_dir.glob("step-*") if d.name[5:].isdigit() and (d / TRAINING_STATE_FILE).is_file()]
    return sorted(steps, key=lambda d: int(d.name[5:]))


def prepare_out_dir(out_dir: Path, resume: bool | str | Path, overwrite: bool) -> Path | None:
    """The step checkpoint to resume from, if any; refuses to start over a previous run unless ``overwrite``."""
    if resume is True or resume == "auto":
        found = step_checkpoints(out_dir)
        if found:
            return found[-1]
    elif resume:
        path = Path(resume)
        if not (path / TRAINING_STATE_FILE).is_file() or not (path / ADAPTER_FILE).is_file():
            raise ConfigError(f"--resume {str(path)!r} is not a step checkpoint of a finetune run (a step-* directory)")
        return path
    # a run set aside by an ``--overwrite`` that was killed before its first save counts as a run
    previous = sorted(d.name for d in (*out_dir.glob("step-*"), out_dir / "final", out_dir / OVERWRITTEN) if d.is_dir())
    if previous and not overwrite and resume:
        raise ConfigError(
            f"out_dir {str(out_dir)!r} holds a run but no complete step checkpoint to resume from:"
            " pass --overwrite true to start over and delete it"
        )
    if previous and not overwrite:
        listed = ", ".join(previous[:3]) + (", ..." if len(previous) > 3 else "")
        raise ConfigError(
            f"out_dir {str(out_dir)!r} already holds a run ({listed}): pass --resume auto to continue it,"
            " or --overwrite true to start over and delete it"
        )
    return None


# ``--overwrite``: the old run's checkpoints wait here until the new run has saved its first one
OVERWRITTEN = ".overwritten-run"


def set_aside_previous_run(out_dir: Path) -> bool:
    """Move the previous run's ``step-*`` and ``final`` directories into ``out_dir/.overwritten-run``; whether any.

    A leftover from an overwrite that was killed before its first save (nothing visible beside it) is the user's
    run: it stays set aside, with whatever this call adds.
    """
    previous = [d for d in (*out_dir.glob("step-*"), out_dir / "final") if d.is_dir()]
    aside = out_dir / OVERWRITTEN
    if not previous:
        return aside.is_dir()
    aside.mkdir(parents=True, exist_ok=True)
    for d in previous:
        os.replace(d, aside / d.name)
    return True


def restore_previous_run(out_dir: Path) -> None:
    """Undo ``set_aside_previous_run``, for a run that failed before it saved anything."""
    aside = out_dir / OVERWRITTEN
    if not aside.is_dir():
        return
    for d in aside.iterdir():
        if not (out_dir / d.name).exists():
            os.replace(d, out_dir / d.name)
    if not any(aside.iterdir()):
        aside.rmdir()


def load_training_state(resume_dir: Path, run: dict) -> dict:
    """The saved state, checked to belong to a run with the same settings (else the replay would not match)."""
    try:
        state = torch.load(resume_dir / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
        saved_run = state["run"]
    except Exception as err:
        raise ConfigError(f"{str(resume_dir)!r} has no readable training state ({type(err).__name__}: {err})") from None
    changed = sorted(k for k in set(run) | set(saved_run) if run.get(k) != saved_run.get(k))
    if changed:
        diff = ", ".join(f"{k}: {saved_run.get(k)!r} -> {run.get(k)!r}" for k in changed[:3])
        raise ConfigError(f"cannot resume {str(resume_dir)!r}: this run's settings differ ({diff})")
    return state


class Interrupted(RuntimeError):
    """Ctrl-C (SIGINT) stopped a finetune: the CLI says where it stands and exits with 130, as a shell does."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite: the run stops, keeping the checkpoints saved before."""


def check_finite_loss(fabric: L.Fabric, step_loss: torch.Tensor, step: int, out_dir: Path) -> None:
    """Stop at the first step whose loss is not finite, naming the last checkpoint saved before it.

    One device-to-host sync per optimizer step (the loss logging syncs as often at ``log_interval=1``); every
    process sees the same verdict, so none is left waiting in a collective.
    """
    if fabric.world_size > 1:
        step_loss = fabric.all_reduce(step_loss, reduce_op="sum")
    value = step_loss.item()
    if math.isfinite(value):
        return
    for logger in fabric.loggers:
        logger.finalize("failed")  # keep the logged metrics up to the bad step
    good = [d for d in step_checkpoints(out_dir) if int(d.name[5:]) < step]
    last = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was saved before it"
    raise NonFiniteLossError(f"loss became {value} at step {step}; {last}")


def save_checkpoint(
    fabric: L.Fabric,
    model: torch.nn.Module,
    config: Config,
    checkpoint_dir: Path,
    save_dir: Path,
    data: DataModule,
    training_state: dict | None = None,
    summary: dict | None = None,
) -> None:
    """An adapter dir: the ETHER tensors and everything needed to use them with the base checkpoint (and to resume
    from it, with ``training_state``; ``summary`` also merges the adapter, for the final dir).

    Written under a temporary name and renamed into place once complete, so a kill never leaves half a checkpoint.
    """
    state = {k: v.detach().cpu() for k, v in ether_state_dict(model).items()}  # FSDP: gathered on every rank
    if fabric.global_rank == 0:
        with staged_dir(save_dir) as tmp:
            save_adapter(tmp / ADAPTER_FILE, state, config)
            copy_config_files(checkpoint_dir, tmp)
            save_hyperparameters(setup, tmp, known_commands=["finetune"])
            save_prompt_style(data.prompt_style, tmp)
            if training_state is not None:
                atomic_save(training_state, tmp / TRAINING_STATE_FILE)
            if summary is not None:
                merge_adapter(Resolved(tmp, checkpoint_dir, tmp / ADAPTER_FILE), tmp)
                (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        # the new run has a checkpoint: an old run that ``--overwrite`` set aside goes now
        shutil.rmtree(save_dir.parent / OVERWRITTEN, ignore_errors=True)
    fabric.barrier()
