"""`tdlrt train`: build data, model and method from the config, train, evaluate, log, checkpoint.

Read top to bottom: :func:`train` (called by the Hydra entry point, :mod:`tdlrt_cli.entry`, with the
composed config as a :class:`~tdlrt_cli.config.TrainConfig`) takes the run folder and hands the run
to :func:`run`: the whole run on one screen, as named steps. What a method adds to the plain loop (the TDLRT
integrator, pruning masks, IMP rounds) stays behind :class:`~tdlrt_cli.methods.Method`; one epoch of steps
is :func:`~tdlrt_cli.loop.train_one_epoch`.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from . import identity
from .checkpoint import (CHECKPOINT_TEMPORARY, checkpoint_state, finished_summary, load_checkpoint,
                         load_dense_weights, restore, save_checkpoint)
from .config import TrainConfig
from .data import DataBundle, build_data
from .distributed import Distributed, init_distributed
from .errors import ConfigError, Interrupted, UserError
from .faults import faults
from .files import atomic_write_text, load_json, remove_stale_temporaries, resume_command
from .lock import RunLock
from .logs import Console, RunLogger, hparams_of
from .loop import Diverged, EpochOptions, StopRequested, StopSignals, log_ranks, train_one_epoch
from .messages import pace_note, pinned_modes, start_block, warn_pinned
from .methods import Method, factorise, method_of, sources_of, tucker_ranks_in
from .lowrank import lowrank_layers
from .metrics import evaluate, flops_per_image, layer_ranks, parameter_report
from .models import build_configured
from .models.pretrained import load_torchvision_weights
from .models.torchvision_nets import fitted_layers
from .provenance import provenance, source_state
from .runtime import build_optimizer, build_scheduler, resolve_device, seed_everything, set_threads
from .selection import drop_top, no_best, remove_unlisted_top, repair_best, save_epoch, select


# --------------------------------------------------------------------------- the run

def train(cfg: TrainConfig, run_dir: Path, config_dict: Optional[dict] = None) -> dict:
    """Train ``cfg`` into ``run_dir`` (``config_dict``: the resolved config, saved in every checkpoint);
    returns the summary. Holds the run folder's lock for the whole run."""
    start_time = time.time()
    source_state()  # the source revision that is running, recorded before anything can change it
    device = resolve_device(cfg.device)
    dist = init_distributed(device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    seed_everything(cfg.seed, cfg.deterministic)
    set_threads(cfg.threads)
    run_dir = Path(run_dir)
    lock = RunLock(run_dir).acquire() if dist.main else None  # one writer per run folder
    thread_hook = threading.excepthook

    def quiet_if_folder_gone(args) -> None:  # TensorBoard's writer thread, say: the main thread reports it
        if not (issubclass(args.exc_type, OSError) and not run_dir.is_dir()):
            thread_hook(args)

    threading.excepthook = quiet_if_folder_gone
    try:
        return run(cfg, run_dir, config_dict, dist, device, start_time)
    except Exception:
        if dist.main and not run_dir.is_dir():  # whatever failed, it failed because the folder went away
            raise UserError(f"the run folder {run_dir} disappeared during the run (deleted or moved): stopped, "
                            f"nothing more can be written there; start the run again") from None
        raise
    finally:
        if lock is not None:
            lock.release()
        if run_dir.is_dir():  # (gone: writer threads may still fail on their way out; keep them quiet)
            threading.excepthook = thread_hook


def run(cfg: TrainConfig, run_dir: Path, config_dict: Optional[dict], dist: Distributed, device: torch.device,
        start_time: float) -> dict:
    """One run, from its checkpoint (if any) to its summary."""
    say = Console(run_dir / "train.log") if dist.main else (lambda line: None)
    left_behind = checkpoint_left_behind(cfg, run_dir, dist)  # the same job started again in its folder
    method = method_of(cfg)  # what the method adds to the loop (integrator, pruning, rounds)
    resume = load_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else None
    done = dist.broadcast_object(finished_summary(run_dir, resume, cfg.ckpt_path, method.epochs()) if dist.main else None)
    if done is not None:  # (a sweep run again: its finished jobs; the CLI says so before Hydra for a single run)
        if dist.main:
            print(f"tdlrt: {run_dir} is finished ({resume['epoch']} of {method.epochs()} epochs, summary.json "
                  f"written): nothing to do; its checkpoints, logs and summary are left as they are", file=sys.stderr)
        return done
    if left_behind:
        say(f"{left_behind} is there: continuing that run (checkpoint.auto_resume=false turns this off)")
    check_resume(cfg, run_dir, config_dict, method, resume)

    r = set_up(cfg, run_dir, config_dict, dist, device, start_time, say, method, resume)
    stop = StopSignals().install()  # Ctrl-C / SIGTERM / SIGHUP: finish the step, write last.pt, one line, exit 128+N
    try:
        for epoch in range(r.start_epoch, r.total_epochs):
            if method.before_epoch(epoch, r.model):  # imp, a new round: new optimizer and schedule, best.pt anew
                new_round(r)
            stats = train_epoch(r, epoch, stop)
            row = evaluate_epoch(r, epoch, stats)
            log_epoch(r, row)
            select_and_save(r, row)
            say(epoch_line(r, row))
            signum = stop.requested(dist)
            if signum and epoch + 1 < r.total_epochs:
                raise r.stopped(signum, r.global_step, epoch)
    except BaseException:  # stopped by a signal, diverged, failed: the logs are complete up to here
        r.logger.close()  # (and a sweep goes on to its next job in this process)
        raise
    finally:
        stop.restore()
    if r.total_epochs == 0 and dist.main and not (r.ckpt_dir / "last.pt").is_file():  # the network as built (a
        save_checkpoint(r.state(0), r.ckpt_dir / "last.pt")  # one-shot decomposition): export and eval take it
    summary = summarise(r)
    if dist.main:
        say_done(r, summary)
    return summary


# --------------------------------------------------------------------------- its steps

@dataclass
class Run:
    """A run in training: what :func:`set_up` built, and how far the epoch loop has come."""
    cfg: TrainConfig
    run_dir: Path
    config_dict: Optional[dict]
    dist: Distributed
    device: torch.device
    say: Callable[[str], None]
    method: Method
    data: DataBundle
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    amp: Callable
    total_epochs: int
    start_time: float                     # when this session started (time.time())
    resumed: bool = False
    earlier_s: float = 0.0                # earlier sessions' wall time, up to the checkpoint resumed from
    start_epoch: int = 0
    global_step: int = 0
    position: Optional[dict] = None       # the place inside start_epoch a mid-epoch checkpoint resumes at
    best: dict = field(default_factory=no_best)  # the selection of best.pt (selection.py)
    skip_budget: list = field(default_factory=list)  # nan_policy=skip: [the steps the run may still skip]
    logger: Optional[RunLogger] = None
    test_loss: float = float("nan")       # of the last evaluation
    test_acc: float = float("nan")

    @property
    def integrator(self):
        return self.method.integrator

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def select_by(self) -> str:
        """best.pt: the epoch with the best validation accuracy (data.val_split > 0), else test accuracy."""
        return "val_acc" if self.data.val is not None else "test_acc"

    def elapsed(self) -> float:
        """The run's wall time: the earlier sessions' and this one's."""
        return self.earlier_s + time.time() - self.start_time

    def state(self, epoch: int, position: Optional[dict] = None) -> dict:
        d = self.data
        return checkpoint_state(self.cfg, self.config_dict, self.model, self.optimizer, self.integrator,
                                self.scheduler, epoch, self.global_step if position is None else position["global_step"],
                                self.best, position, (d.in_channels, d.num_classes, d.image_size),
                                skipped_steps=self.cfg.nan_max_skips - self.skip_budget[0], elapsed_s=self.elapsed(),
                                data_input={"mean": list(d.mean), "std": list(d.std), "classes": d.classes})

    def save_position(self, position: dict) -> None:
        """A mid-epoch ``last.pt`` (every checkpoint.every_n_steps, and when a stop signal came)."""
        if self.dist.main:
            save_checkpoint(self.state(position["epoch"], position), self.ckpt_dir / "last.pt")

    def stopped(self, signum: int, step: int, epoch: int) -> Interrupted:
        line = (f"{signal.Signals(signum).name} at step {step} (epoch {epoch + 1}): {self.ckpt_dir / 'last.pt'} "
                f"written; resume with: {resume_command(self.run_dir)}")
        if isinstance(self.say, Console):
            self.say.record(f"tdlrt: stopped: {line}")
        return Interrupted(line, signum)


def checkpoint_left_behind(cfg: TrainConfig, run_dir: Path, dist: Distributed) -> Optional[str]:
    """A ``last.pt`` in the run folder of a job that names no checkpoint (SLURM requeue, restart): the run
    continues from it (``cfg.ckpt_path`` is set), unless checkpoint.auto_resume=false."""
    last = run_dir / "checkpoints" / "last.pt"  # (only process 0's run folder is the real one)
    left_behind = dist.broadcast_object(str(last) if last.is_file() and cfg.ckpt_path is None else None)
    if left_behind:
        if not cfg.checkpoint.auto_resume:
            raise ConfigError(f"{run_dir} already holds a run (checkpoints/last.pt); resume it with "
                              f"resume={run_dir} or start in another folder")
        cfg.ckpt_path = str(left_behind)
    return left_behind


def check_resume(cfg: TrainConfig, run_dir: Path, config_dict: Optional[dict], method: Method,
                 resume: Optional[dict]) -> None:
    """Refuse a resume that would train something else (the CLI refuses it before Hydra writes a file; here
    for library use and sweep jobs), shorten the run, or continue a method that cannot be resumed."""
    if resume is None:
        return
    if not method.resumable:
        raise ConfigError(f"method={cfg.method.name} runs cannot be resumed (masks and rewind point are not "
                          f"checkpointed); start it again in a new folder")
    saved = resume.get("config") if config_dict is not None else None
    identity.check_resume(saved if isinstance(saved, dict) else None, config_dict, int(resume.get("epoch", 0)),
                          method.epochs(), run_dir)


def set_up(cfg: TrainConfig, run_dir: Path, config_dict: Optional[dict], dist: Distributed, device: torch.device,
           start_time: float, say: Callable[[str], None], method: Method, resume: Optional[dict]) -> Run:
    """Data, network, method, optimizer and schedule; the checkpoint's state when resuming; the logger; the
    start block."""
    data = build_data(cfg.data, cfg.batch_size, cfg.eval_batch_size, device, cfg.seed)
    faults.signal_at("train_setup")
    for loader in (data.train, data.test, data.val):
        if loader is not None:
            loader.shard(dist.rank, dist.world)
    model = build_network(cfg, data, say, resume).to(device)
    if resume is None:
        method.start(model, lambda: next(iter(data.train)))  # snip, grasp: masks from one batch
    dist.sync_model(model)  # every replica starts from process 0's weights (and pruning masks)
    optimizer = build_optimizer(cfg, model)
    method.stepper(model, optimizer, len(data.train), dist)  # tdlrt, dlrt: the integrator takes the steps
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.precision == "bf16" else nullcontext
    r = Run(cfg, run_dir, config_dict, dist, device, say, method, data, model, optimizer,
            build_scheduler(cfg, optimizer, len(data.train)), amp, total_epochs=method.epochs(),  # imp: all rounds
            start_time=start_time, skip_budget=[cfg.nan_max_skips])
    if resume is not None:
        restore_run(r, resume)
    if dist.main:
        # (a run started again in its folder before it wrote a checkpoint logs from the start: RunLogger)
        r.logger = RunLogger(run_dir, resume_epoch=r.start_epoch if r.resumed else None,
                             resume_step=r.global_step if r.resumed else None)
        if r.ckpt_dir.is_dir():
            remove_stale_temporaries(r.ckpt_dir, CHECKPOINT_TEMPORARY)
    else:  # data parallel: only the first process writes logs and checkpoints
        r.logger = RunLogger(run_dir, tensorboard=False, write=False)
    if method.ranks_move and not r.resumed and dist.main:  # the starting ranks, at step 0
        r.logger.scalars(0, {**log_ranks(r.logger, model, 0, 0),
                             "compression/rate": parameter_report(model)["compression_rate"]})
    for line in start_block(cfg, run_dir, data, model, r.total_epochs, device, r.start_epoch if r.resumed else None):
        say(line)
    if cfg.starts_trained and not r.resumed:  # a trained network compressed: its accuracy before any step
        evaluate_start(r)
    if not r.resumed and dist.main:  # the runs it starts from, read now (their folders may move later)
        sources = sources_of(cfg)
        if sources:
            atomic_write_text(run_dir / SOURCES, json.dumps(sources))
    return r


START_EVAL = "start_eval.json"  # the starting network's test accuracy (init_from), for summary.json
SOURCES = "sources.json"        # the runs it started from (ranks_from, init_from), read at the start


def evaluate_start(r: Run) -> None:
    """``init_from``: the test accuracy of the starting network (for a low-rank method: right after the
    decomposition, before fine-tuning), said and kept in the run folder for summary.json."""
    loss, acc = evaluate(r.model, r.data.test, r.amp, r.device, r.dist)
    report = parameter_report(r.model)
    source = "init_from" if r.cfg.init_from else f"model.weights={r.cfg.model.weights}"
    r.say(f"{source}: the starting network (c.r. {report['compression_rate']:.1f}%) has test acc {acc:.2f}% "
          f"before training")
    if r.dist.main:
        atomic_write_text(r.run_dir / START_EVAL, json.dumps({"test_acc": acc, "test_loss": loss,
                                                               "compression_rate": report["compression_rate"],
                                                               "fresh_layers": getattr(r.model, "fresh_layers", [])}))


def read_json(path: Path) -> Optional[dict]:
    """A small JSON file the run wrote itself (a dict), or None if it is not there or not readable."""
    try:
        found = load_json(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return found if isinstance(found, dict) else None


def start_eval(run_dir: Path) -> Optional[dict]:
    return read_json(run_dir / START_EVAL)


def build_network(cfg: TrainConfig, data: DataBundle, say: Callable[[str], None],
                  resume: Optional[dict] = None) -> nn.Module:
    """The model, its starting weights (``init_from``) and the method's factorisation of its layers; a resumed
    fixed-rank Tucker run takes its ranks from the checkpoint (not from ``method.ranks_from`` or the
    allocation again, whose inputs may have moved)."""
    try:
        model = build_configured(cfg.model, data.in_channels, data.num_classes, data.image_size,
                                 load_weights=resume is None and not cfg.init_from)  # else the checkpoint's
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if cfg.init_from == "torchvision":
        copied, kept = load_torchvision_weights(model, cfg.model.name)
        say(f"init_from=torchvision: copied {copied} layers, {kept} keep their initialisation")
    elif cfg.init_from:
        refit = fitted_layers(model) if cfg.model.name == "torchvision" else ()
        kept = load_dense_weights(model, cfg.init_from, refit)
        if kept:
            model.fresh_layers = kept  # (as build_torchvision records its new classifier)
            say(f"init_from: {', '.join(kept)} keep their initialisation (the file's are of another size: "
                f"another number of classes or channels)")
    saved = tucker_ranks_in(resume["model"]) if resume is not None and cfg.method.name == "tucker" \
        and isinstance(resume.get("model"), dict) else None
    factorise(cfg, model, torch.Generator().manual_seed(cfg.seed), saved_ranks=saved or None)
    return model


def restore_run(r: Run, resume: dict) -> None:
    """Continue from a checkpoint: weights, optimizer, schedule, integrator, random state and position; the
    best.pt selection and the top-k files as it records them."""
    r.start_epoch, r.global_step, r.best, r.position = restore(resume, r.cfg, r.model, r.optimizer, r.integrator,
                                                               r.scheduler)
    r.resumed, r.earlier_s = True, float(resume.get("elapsed_s") or 0.0)
    r.skip_budget[0] -= int(resume.get("skipped_steps", 0))
    r.say(f"resuming {r.cfg.ckpt_path} at epoch {r.start_epoch + 1}" + (f" step {r.global_step}" if r.position else ""))
    if r.dist.main:
        repair_best(resume, r.ckpt_dir, r.say)
        remove_unlisted_top(r.ckpt_dir, r.best)


def new_round(r: Run) -> None:
    """IMP, a new round: a new optimizer and schedule; best.pt is chosen anew, among the pruned network's epochs."""
    r.optimizer = build_optimizer(r.cfg, r.model)
    r.scheduler = build_scheduler(r.cfg, r.optimizer, len(r.data.train))
    drop_top(r.ckpt_dir, r.best, r.dist.main)
    r.best = no_best()


def train_epoch(r: Run, epoch: int, stop: StopSignals) -> dict:
    """The epoch's steps (resumed at the checkpoint's place in the first one); a stop signal or a divergence
    ends the run with its one line."""
    first = epoch == r.start_epoch
    try:
        options = EpochOptions(r.cfg.log_every_n_steps, r.cfg.nan_policy, r.cfg.checkpoint.every_n_steps,
                               r.save_position, r.dist, stop, r.skip_budget, r.say,
                               pace_note(r.device, len(r.data.train), r.say) if first else None)
        stats = train_one_epoch(r.model, r.data.train, r.optimizer, r.integrator, r.scheduler, r.amp, r.logger,
                                r.cfg.progress and r.dist.main, epoch, r.global_step, options,
                                start=r.position if first else None)
    except StopRequested as exc:
        raise r.stopped(exc.signum, exc.step, epoch) from None
    except Diverged as exc:
        last = r.ckpt_dir / "last.pt"
        raise Diverged(exc.step, exc.epoch, last if last.is_file() else None, exc.skipped_all, exc.weights) from None
    r.global_step = stats.pop("global_step")
    return stats


def evaluate_epoch(r: Run, epoch: int, stats: dict) -> dict:
    """Test (and validation) accuracy after the epoch, and the plateau schedule's step: the epoch's row."""
    r.dist.sync_batchnorm(r.model)  # running statistics of process 0 (each process saw its own batches)
    started = time.time()
    r.test_loss, r.test_acc = evaluate(r.model, r.data.test, r.amp, r.device, r.dist)
    val = {} if r.data.val is None else dict(zip(("val_loss", "val_acc"),
                                                 evaluate(r.model, r.data.val, r.amp, r.device, r.dist)))
    if isinstance(r.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        r.scheduler.step(val.get("val_loss", r.test_loss))
    report = parameter_report(r.model)
    return {"epoch": epoch + 1, "step": r.global_step, **stats, **val, "test_loss": r.test_loss,
            "test_acc": r.test_acc, "lr": r.optimizer.param_groups[0]["lr"], "params": report["params"],
            "compression_rate": report["compression_rate"], "compression_rate_total": report["compression_rate_total"],
            "eval_time_s": time.time() - started}  # test and validation sets


def log_epoch(r: Run, row: dict) -> None:
    """The epoch's row in metrics.csv, its ranks in ranks.csv, its scalars in TensorBoard."""
    r.logger.epoch(row)
    full_shapes = {n: list(m.full_shape) for n, m in r.model.named_modules() if hasattr(m, "full_shape")}
    r.logger.ranks(row["epoch"], layer_ranks(r.model), full_shapes)
    shown = ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_time_s", "images_per_s",
             "compression_rate", "val_loss", "val_acc")
    r.logger.scalars(r.global_step, {"epoch/epoch": row["epoch"], **{
        f"epoch/{'time_s' if k == 'epoch_time_s' else k}": row[k] for k in shown if k in row}})


def select_and_save(r: Run, row: dict) -> None:
    """Count the epoch in best.pt's selection and write its checkpoints (last.pt, best.pt, top-k)."""
    metric = row["val_acc"] if "val_acc" in row else row["test_acc"]
    ranks = layer_ranks(r.model) if r.method.ranks_move else None
    r.best, improved, stale = select(r.best, row["epoch"], r.select_by, metric, row["test_acc"], row.get("val_acc"),
                                     row["compression_rate"], ranks, r.cfg.checkpoint.keep_top_k)
    state = r.state(row["epoch"])
    if r.dist.main:
        save_epoch(r.ckpt_dir, state, improved, stale)


def epoch_line(r: Run, row: dict) -> str:
    return (f"epoch {row['epoch']}/{r.total_epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.2f}% "
            + (f"| val acc {row['val_acc']:.2f}% " if "val_acc" in row else "")
            + f"| test loss {row['test_loss']:.4f} acc {row['test_acc']:.2f}% | {row['images_per_s']:.0f} img/s "
            + f"| train {row['epoch_time_s']:.0f} s, evaluation {row['eval_time_s']:.0f} s"
            + (f" | conv c.r. {row['compression_rate']:.1f}%" if r.cfg.method.name != "dense" else "")
            + (f", conv and linear {parameter_report(r.model)['compression_rate_weights']:.1f}%"
               if r.cfg.method.convert_linear else ""))


def summarise(r: Run) -> dict:
    """summary.json (accuracies, parameters, FLOPs, ranks, wall time, provenance; the cost report), the
    HParams entry; closes the logs."""
    cfg, model, dist, best = r.cfg, r.model, r.dist, r.best
    faults.signal_at("train_summary")
    if math.isnan(r.test_acc) or r.resumed and r.start_epoch >= r.total_epochs:  # epochs=0: the start
        r.test_loss, r.test_acc = evaluate(model, r.data.test, r.amp, r.device, dist)
    report = parameter_report(model)
    example = next(iter(r.data.train))[0][:2].to(r.device)
    chosen = (best["selected"] or {}).get("test_acc") if r.select_by == "val_acc" else None
    summary = {  # the names: summary.accuracies
        # the network the run hands on (export and eval read it by default): best.pt, chosen on the validation
        # split (data.val_split > 0), else last.pt
        "test_acc": r.test_acc if chosen is None else chosen,
        "checkpoint": "last.pt" if chosen is None else "best.pt",
        "test_acc_final": r.test_acc, "test_loss_final": r.test_loss,  # after the last epoch (last.pt)
        # max over epochs (rank-adaptive methods: the epochs at the final ranks): chosen on the test set, optimistic
        "test_acc_max_epoch": max(best["max_test"], r.test_acc),
        "selected": best["selected"],  # the epoch of best.pt: by val_acc (data.val_split > 0) or by test_acc
        "epochs": r.total_epochs, "steps": r.global_step, **report, "ranks": layer_ranks(model),
        "pinned_modes": pinned_modes(model) if r.method.ranks_move else None,
        **flops_per_image(model, example), "wall_time_s": r.elapsed(),
        "device": torch.cuda.get_device_name(r.device) if r.device.type == "cuda" else "cpu",
        "run_dir": str(r.run_dir), "config": r.config_dict,
        "provenance": provenance(r.start_time),
    }
    start = start_eval(r.run_dir) if cfg.starts_trained else None
    if start is not None:  # init_from: the network before training (after the decomposition)
        summary["test_acc_at_start"] = start.get("test_acc")
    sources = read_json(r.run_dir / SOURCES) or sources_of(cfg)
    if sources:  # the runs it started from (ranks_from, init_from), by their configs
        summary["sources"] = sources
    if cfg.cost_report and dist.main:
        summary["cost"] = run_cost_report(cfg, model, r.data, r.device, report)
    if dist.enabled:
        prints = dist.fingerprints(model)
        summary["data_parallel"] = {"world_size": dist.world, "replicas_identical": len(set(prints)) == 1,
                                    "fingerprints": prints}
        if len(set(prints)) != 1:
            warnings.warn(f"data-parallel replicas differ at the end of the run (fingerprints {prints})")
    r.logger.summary(summary)
    r.logger.hparams(hparams_of(r.config_dict or {}), {
        "test_acc": summary["test_acc"], "test_acc_final": r.test_acc,
        "compression_rate": report["compression_rate"], "params": report["params"]})
    r.logger.close()
    dist.close()
    return summary


def say_done(r: Run, summary: dict) -> None:
    """The run's last lines: adapted modes that finished at a rank bound, and the accuracies."""
    if summary["pinned_modes"] is not None:
        m = r.cfg.method
        warn_pinned(summary["pinned_modes"], sum(sum(layer.adapted) for layer in lowrank_layers(r.model)), r.say,
                    target=m.target_cr is not None, cap_is_full=m.r_max is None and m.r_max_frac >= 1)
    r.say(done_line(summary, r.cfg.method.name != "dense", r.run_dir, linear=r.cfg.method.convert_linear))


def done_line(summary: dict, compressed: bool, run_dir: Path, linear: bool = False) -> str:
    """The accuracy of the network the run hands on (and which file it is), the final one beside it, the
    conv c.r. (``linear``: and the c.r. of conv and linear weights, which method.convert_linear's target counts)
    and the whole network's."""
    selected, acc, final = summary["selected"], summary["test_acc"], summary["test_acc_final"]
    if summary["checkpoint"] == "best.pt":
        line = (f"done: test acc {acc:.2f}% with checkpoints/best.pt (epoch {selected['epoch']}, chosen on the "
                f"validation split; export and eval use it), {final:.2f}% after the last epoch")
    else:
        line = (f"done: test acc {acc:.2f}% after the last epoch (checkpoints/last.pt; no validation split to choose "
                f"on; max over epochs {summary['test_acc_max_epoch']:.2f}%, chosen on the test set)")
    if compressed:
        line += (f", conv c.r. {summary['compression_rate']:.1f}% ("
                 + (f"conv and linear {summary['compression_rate_weights']:.1f}%, " if linear else "")
                 + f"whole network {summary['compression_rate_total']:.1f}%)")
    return line + f", outputs in {run_dir}"


def run_cost_report(cfg: TrainConfig, model: nn.Module, data, device: torch.device, params: dict) -> dict:
    """The cost report of the trained network against the dense one of the same architecture (`tdlrt eval`
    prints the same report for any run, checkpoint or export)."""
    from .cost import cost_report
    from .runs import dense_reference

    dense = dense_reference(cfg.model, (data.in_channels, data.num_classes, data.image_size), device)
    example = next(iter(data.test))[0][:128].to(device)
    return cost_report(model.eval(), dense, example, params, repeat=cfg.cost_repeat, latency_too=cfg.cost_latency)
