"""`maisi train vae|diffusion|controlnet`: train MAISI networks; diffusion and controlnet learn from `maisi data embed`
latents.

Runs in one process, or under `torchrun --nproc_per_node N -m maisi_cli train …` (NCCL on GPUs, gloo on the CPU).
No torch at import time: the engine is imported inside the command.

The options every trainer has are defined once (`trainer_options`); a command adds its own and the help texts that
differ, and `train_command` builds its Typer signature from that list.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from maisi_cli.cli import render, terminal
from maisi_cli.engine.progress import ProgressCallback, ProgressEvent
from maisi_cli.errors import UsageError

app = typer.Typer(help="Train MAISI networks: the VAE, the diffusion UNet, the ControlNet (released checkpoint "
                       "layouts).",
                  no_args_is_help=True)


# --- progress -------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def train_progress(output: render.Output) -> Iterator[ProgressCallback]:
    """Engine events → on a TTY one bar per epoch with the current loss, the seconds per step, the epoch's ETA (from
    its first step) and the validation loss when it validated; off a TTY one JSON line per epoch on stderr and a
    heartbeat line (the current step, loss, seconds per step) whenever nothing was printed for 10 s
    (MAISI_HEARTBEAT_S); nothing with --quiet. Each saved epoch is noted for an interruption's resume line."""
    if output.quiet:
        yield lambda event: None
        return
    console = render.stderr_console()
    if console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bars = Progress(TextColumn("{task.description:<14}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[pace]}{task.fields[val]}"),
                        TimeElapsedColumn(), render.eta_column(), console=console)
        epochs = EpochBars(bars)
        try:
            yield epochs.on_event
        finally:
            terminal.clear()
            if epochs.shown:
                bars.stop()
        return
    log = EpochLog()
    try:
        yield log.on_event
    finally:
        log.heartbeat.stop()


class StepPace:
    """The mean seconds per step of an epoch so far, from the steps' own times (the engine's "seconds")."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.steps = 0

    def add(self, event: ProgressEvent) -> None:
        if "seconds" in event.metrics:
            self.seconds += float(event.metrics["seconds"])
            self.steps += 1

    @property
    def per_step(self) -> float | None:
        return self.seconds / self.steps if self.steps else None

    def text(self) -> str:
        return "-- s/step" if self.per_step is None else f"{self.per_step:.2f} s/step"


class EpochBars:
    """One rich bar per epoch (keyed by the event's subject, "epoch e/E"): steps done, the current loss, seconds
    per step, the epoch's ETA. The bars start with the first event (the status line says what happens before)."""

    def __init__(self, bars: Any):
        self.bars = bars
        self.tasks: dict[str, Any] = {}
        self.pace: dict[str, StepPace] = {}
        self.shown = False

    def on_event(self, event: ProgressEvent) -> None:
        if event.stage not in ("train", "validate", "epoch"):
            return
        if not self.shown:
            terminal.clear()
            self.bars.start()
            self.shown = True
        if event.subject not in self.tasks:
            total = event.total if event.stage == "train" else None
            self.tasks[event.subject] = self.bars.add_task(event.subject, total=total, loss=float("nan"),
                                                           pace="-- s/step", val="", deadline=None)
            self.pace[event.subject] = StepPace()
        task, pace = self.tasks[event.subject], self.pace[event.subject]
        if event.stage == "train":
            pace.add(event)
            left = None if pace.per_step is None else pace.per_step * (event.total - event.done)
            self.bars.update(task, completed=event.done, total=event.total, loss=event.metrics["loss"],
                             pace=pace.text(), deadline=None if left is None else time.monotonic() + left)
        elif event.stage == "validate":
            self.bars.update(task, val=f"  val loss {event.metrics['val_loss']:.4f}")
        else:
            terminal.facts["epoch"] = (event.done, event.total)
            self.bars.update(task, loss=event.metrics["loss"], deadline=time.monotonic())


class EpochLog:
    """Off a TTY: one JSON line per finished epoch (its loss, time, samples per second, validation loss) and, while
    an epoch runs, a heartbeat line whenever nothing was printed for the heartbeat interval."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.step: ProgressEvent | None = None
        self.pace = StepPace()
        self.heartbeat = terminal.Ticker(sys.stderr, tty=False)
        self.heartbeat.show(self.heartbeat_line, grace=self.heartbeat.interval)

    def heartbeat_line(self) -> str:
        """Plain text, not JSON: the JSON lines on stderr stay one per finished epoch."""
        elapsed = f"[{time.monotonic() - self.started:8.1f}s]"
        event = self.step
        if event is None:
            return f"{elapsed} preparing data and networks"
        line = f"{elapsed} {event.subject} step {event.done}/{event.total}, loss {event.metrics['loss']:.4f}"
        if self.pace.per_step is not None:
            left = self.pace.per_step * (event.total - event.done)
            line += f", {self.pace.text()}, {terminal.clock(left)} left in the epoch"
        return line

    def on_event(self, event: ProgressEvent) -> None:
        if event.stage == "train":
            if self.step is not None and self.step.subject != event.subject:
                self.pace = StepPace()
            self.step = event
            self.pace.add(event)
        if event.stage != "epoch":
            return
        terminal.facts["epoch"] = (event.done, event.total)
        with self.heartbeat.lock:
            log_epoch(event)
            self.heartbeat.printed()


def log_epoch(event: ProgressEvent) -> None:
    """Off a TTY: one JSON line per finished epoch (its loss, time, samples per second, validation loss)."""
    seconds = event.metrics["seconds"]
    line = {"event": "epoch", "epoch": event.done, "epochs": event.total, "loss": event.metrics["loss"],
            "seconds": round(seconds, 3), "samples_per_s": round(event.metrics["samples"] / max(seconds, 1e-9), 3)}
    if "val_loss" in event.metrics:
        line["val_loss"] = event.metrics["val_loss"]
    sys.stderr.write(json.dumps(line) + "\n")
    sys.stderr.flush()


def run_trainer(output: render.Output, config_class: type, config_file: Path | None, flags: dict,
                train: Callable, describe: Callable[[dict], str], required: dict[str, str] | None = None) -> None:
    """Build the trainer's config (file + flags), train with progress, and print one summary from rank 0 only:
    `describe(summary)` for people, the summary itself with --json. `required`: what to give for each required
    option (its error line when left out)."""
    from maisi_cli.engine.train.common import build_config  # pydantic + torch: only when a command runs

    settings = build_config(config_class, config_file, flags, required)
    terminal.facts["train_out"] = settings.out  # an interruption's resume line names it
    render.status(output, "preparing data and networks…")
    with train_progress(output) as on_event:
        summary = train(settings, on_event)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if output.json:
        render.print_json(summary)
    else:
        render.info(describe(summary), output)


# --- options --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainOption:
    """One option of a `maisi train` command: its parameter name (the config key), type and Typer option, and for
    a required one what to give (the error line when it is left out)."""

    name: str
    kind: Any
    option: Any  # typer.models.OptionInfo
    required: str | None = None


def option(name: str, kind: Any, *declarations: str, help: str, metavar: str | None = None,
           required: str | None = None) -> TrainOption:
    """An option that is None unless given (so a --config file's value stands). A `required` one (it may come from
    --config instead, so Click does not enforce it) says so in its help."""
    if required:
        help = f"{help} Required (here or in --config)."
    return TrainOption(name, kind, typer.Option(None, *declarations, help=help, metavar=metavar), required)


CONFIG_HELP = "JSON or TOML file of these options; flags override it."


def trainer_options(*, data: str, out: str, lr: str, batch_size: str, init: str, config: str = CONFIG_HELP,
                    data_example: str, out_example: str,
                    after_model: tuple[TrainOption, ...] = (),
                    after_batch_size: tuple[TrainOption, ...] = ()) -> list[TrainOption]:
    """Every trainer's options in help order, with the help texts that differ between trainers and the trainer's
    own options (after --model, after --batch-size). `data_example`, `out_example`: the values the error line for a
    missing --data or --out suggests."""
    return [
        option("data", Path | None, "--data", help=data, metavar="FILE",
               required=f"the training datalist, e.g. --data {data_example}"),
        option("out", Path | None, "--out", "-o", help=out, metavar="DIR",
               required=f"the output folder, e.g. --out {out_example}"),
        option("model", str | None, "--model", help="Model name or spec .json (default: rflow-ct)."),
        *after_model,
        option("epochs", int | None, "--epochs", help="Epochs in all (a resumed run counts the done ones)."),
        option("lr", float | None, "--lr", help=lr),
        option("batch_size", int | None, "--batch-size", help=batch_size),
        *after_batch_size,
        option("config", Path | None, "--config", help=config),
        option("resume", bool | None, "--resume/--no-resume", help="Continue the run in --out."),
        option("init", Path | None, "--init", help=init),
        option("device", str | None, "--device", help="auto, cpu, cuda or cuda:N."),
        option("amp", bool | None, "--amp/--no-amp", help="Mixed precision: fp16 on CUDA (default on there), bf16 "
               "on the CPU (default off)."),
        option("seed", int | None, "--seed", help="Seed of the run (default 0)."),
        TrainOption("json_flag", bool, typer.Option(False, "--json", help="Print the summary as one JSON document.")),
    ]


def train_command(name: str, help: str, options: list[TrainOption], engine: tuple[str, str, str],
                  describe: Callable[[dict], str], flags_of: Callable[[dict], dict] = lambda flags: flags) -> None:
    """Register `maisi train NAME` with `options`. `engine` names the trainer's module, config class and train
    function; `flags_of` checks or adjusts the given flags before the config is built."""

    def command(ctx: typer.Context, **values: Any) -> None:
        output = render.output_of(ctx.obj, values.pop("json_flag"))
        config_file = values.pop("config")
        flags = flags_of(values)
        check_required(flags, config_file, required)  # before the 5-20 s of importing torch
        # The trainer imports torch and MONAI: only when its command runs, never for --help or shell completion.
        module = importlib.import_module(engine[0])
        run_trainer(output, getattr(module, engine[1]), config_file, flags, getattr(module, engine[2]), describe,
                    required)

    required = {o.name: o.required for o in options if o.required}

    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    command.__signature__ = inspect.Signature([context, *(  # type: ignore[attr-defined]
        inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.option, annotation=o.kind)
        for o in options)])
    app.command(name, help=help)(command)


def check_required(flags: dict, config_file: Path | None, required: dict[str, str]) -> None:
    """A required option given neither as a flag nor in the --config file: one line saying what to give (the
    trainer's config would say the same, after torch is imported)."""
    from maisi_cli.errors import missing_option
    from maisi_cli.io.documents import read_document

    missing = [name for name in required if flags.get(name) is None]
    if missing and config_file is not None:
        in_file = read_document(config_file, "--config", shape="a table/object of options")
        missing = [name for name in missing if in_file.get(name) is None]
    if missing:
        raise missing_option(missing[0], required[missing[0]], config_file)


# --- the commands ---------------------------------------------------------------------------------------------------
def checked_scheduler(flags: dict) -> dict:
    if flags["scheduler"] is not None and flags["scheduler"] not in ("rflow", "ddpm"):
        raise UsageError(f"--scheduler: '{flags['scheduler']}' is not a scheduler; use rflow or ddpm")
    return flags


train_command(
    "diffusion", "Train the diffusion UNet of a model on pre-computed latents.",
    trainer_options(
        data="Embeddings datalist (embeddings.json from `maisi data embed`).",
        out="Folder for diff_unet.pt and train_state.pt.",
        lr="Adam learning rate (default 1e-4), decayed to 0.",
        batch_size="Latents per step per process (default 1).",
        init="Fine-tune from this diffusion UNet checkpoint (its scale factor is kept).",
        data_example="embeddings/embeddings.json", out_example="runs/diffusion",
        after_model=(option("scheduler", str | None, "--scheduler", help="rflow or ddpm (default: the model's)."),),
    ),
    ("maisi_cli.engine.train.diffusion", "DiffusionTrainConfig", "train_diffusion"),
    lambda summary: (
        f"trained {summary['model']} diffusion UNet ({summary['scheduler']}) for epochs "
        f"{summary['start_epoch'] + 1}..{summary['epochs']}: loss {summary['loss']:.4f}, scale factor "
        f"{summary['scale_factor']:.4f} ({summary['scale_factor_source']}); wrote {summary['checkpoint']}"),
    flags_of=checked_scheduler,
)


train_command(
    "controlnet", "Train a model's ControlNet (initialised from its frozen diffusion UNet) on latents + label maps.",
    trainer_options(
        data="Datalist {\"training\": [{\"image\": LATENT, \"label\": LABEL_MAP}, …]}, paths relative to it: the "
             "embeddings.json of `maisi data embed` run on a datalist with labels (it lists each label); LABEL_MAP is "
             "the integer mask (0-255) of the CT the latent came from.",
        out="Folder for controlnet.pt and train_state.pt.",
        lr="AdamW learning rate (default 1e-5), decayed to 0.",
        batch_size="Latents per step per process (default 1).",
        init="Start from this ControlNet checkpoint instead of the UNet's weights.",
        data_example="embeddings/embeddings.json", out_example="runs/controlnet",
        after_model=(option("weights_dir", Path | None, "--weights-dir", help="Folder holding the model's "
                            "released diffusion UNet (frozen; its scale factor is used) under its repository name "
                            "(default: MAISI_WEIGHTS_DIR, then the caches)."),),
        after_batch_size=(
            option("weighted_label", list[int] | None, "--weighted-label", help="Label id whose latent voxels "
                   "weigh --weighted-loss in the L1 loss; repeat for several."),
            option("weighted_loss", float | None, "--weighted-loss", help="Weight of --weighted-label voxels "
                   "(default 100)."),
        ),
    ),
    ("maisi_cli.engine.train.controlnet", "ControlNetTrainConfig", "train_controlnet"),
    lambda summary: (
        f"trained {summary['model']} ControlNet ({summary['scheduler']}) for epochs "
        f"{summary['start_epoch'] + 1}..{summary['epochs']}: loss {summary['loss']:.4f}; wrote "
        f"{summary['checkpoint']}"),
    flags_of=lambda flags: {**flags, "weighted_label": flags["weighted_label"] or None},  # Typer gives [] if unset
)


train_command(
    "vae", "Train a model's VAE (L1 + KL + perceptual + patch-adversarial) on CT images.",
    trainer_options(
        data="Datalist of CT images ({\"training\": [{\"image\": …, \"fold\": k}]}, e.g. from `maisi data "
             "phantoms`); fold == val fold (0) validates.",
        out="Folder for autoencoder.pt, train_state.pt and validation.json.",
        lr="Adam learning rate of both networks (default 1e-4; ×0.01 before epoch 10, ×0.1 before 20).",
        batch_size="Patches per step per process (default 1).",
        init="Fine-tune from this autoencoder state dict.",
        data_example="phantoms/datalist.json", out_example="runs/vae",
        config="JSON or TOML file of these options and of warmup, random_aug, recon_loss (l1|l2), lr_decay "
               "(none|cosine), bright_weight, bright_threshold, bright_margin, discriminator_layers, val_window; "
               "flags override it.",
        after_batch_size=(
            option("patch_size", str | None, "--patch-size", help="Training patch, N or XxYxZ (default 64)."),
            option("kl_weight", float | None, "--kl-weight", help="KL weight (default 1e-7)."),
            option("latent_sampling", bool | None, "--latent-sampling/--no-latent-sampling", help="Decode a "
                   "sample of the latent (default, the reference) or its mean."),
            option("perceptual_weight", float | None, "--perceptual-weight", help="Perceptual weight (default "
                   "0.3; 0 skips it)."),
            option("perceptual_network", str | None, "--perceptual-network", help="MONAI PerceptualLoss network "
                   "(default squeeze; resnet50 with --perceptual-weights)."),
            option("perceptual_weights", Path | None, "--perceptual-weights", help="Local ResNet-50 weights for "
                   "the perceptual loss (offline)."),
            option("adversarial_weight", float | None, "--adversarial-weight", help="Adversarial weight (default "
                   "0.1; 0 trains no discriminator)."),
            option("val_every", int | None, "--val-every", help="Validate every N epochs (default 10; the first "
                   "and last epoch always)."),
            option("val_fold", int | None, "--val-fold", help="Items with this fold validate (default 0)."),
        ),
    ),
    ("maisi_cli.engine.train.vae", "VaeTrainConfig", "train_vae"),
    lambda summary: (
        f"trained {summary['model']} VAE for epochs {summary['start_epoch'] + 1}..{summary['epochs']}: "
        f"loss {summary['loss']:.4f}"
        + (f", val loss {summary['val']['val_loss']:.4f}" if summary["val"] else "")
        + f"; wrote {summary['checkpoint']}"),
)


def embed_command(
    ctx: typer.Context,
    datalist: Path = typer.Argument(..., help="Datalist JSON {\"training\": [{\"image\": PATH, [\"label\": PATH], "
                                    "[\"modality\": \"ct\"]}, …]}; paths relative to its folder."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for <stem>_emb.nii.gz, their .json sidecars and "
                             "embeddings.json."),
    model: str = typer.Option("rflow-ct", "--model", help="Model name or spec .json whose VAE encodes."),
    weights_dir: Optional[Path] = typer.Option(None, "--weights-dir", help="Folder holding the weight files under "
                                               "their repository names (default: MAISI_WEIGHTS_DIR, then the "
                                               "caches)."),
    mean: bool = typer.Option(False, "--mean/--sample", help="Encode the mean z_mu instead of a sample "
                              "z_mu + z_sigma*eps (the reference samples)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampled encodings (file k uses a seed derived from it)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    json_flag: bool = typer.Option(False, "--json", help="Print a summary as one JSON document."),
) -> None:
    """Encode CT images into VAE latents for `maisi train diffusion` (existing outputs are skipped)."""
    from maisi_cli.engine.runtime import resolve_device
    from maisi_cli.engine.train.embed import embed_datalist
    from maisi_cli.models import get_model

    output = render.output_of(ctx.obj, json_flag)
    spec = get_model(model)
    with render.progress(output) as on_progress:
        summary = embed_datalist(spec, datalist, out, weights_dir=weights_dir, device=resolve_device(device),
                                 mean=mean, seed=seed, on_progress=on_progress)
    if output.json:
        render.print_json(summary)
    else:
        render.info(f"{len(summary['written'])} latent(s) written, {len(summary['skipped'])} already there; "
                    f"datalist {summary['datalist']}", output)
