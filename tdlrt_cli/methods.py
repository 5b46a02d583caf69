"""Turn ``method=...`` into changes of a freshly built dense network (the CLI side of the low-rank core).

tdlrt, dlrt      convert convs to Tucker / matrix low-rank layers; trained by the TDLRT integrator
tucker, cp, tt,  replace convs by fixed-rank factorisations trained directly by the optimizer, at
matrix           ``method.rank_frac`` of the channels or the fraction that reaches ``method.target_cr``;
                 tucker also at another run's final ranks (``method.ranks_from``). With ``init_from`` the
                 trained kernels are decomposed (HOSVD, TT-SVD, SVD), tucker's ranks at ``target_cr`` chosen
                 by the target rule's allocation from their spectra (one-shot compression)
tucker_prune     gradual pruning without the integrator: Tucker factors and core trained by the optimizer,
                 ranks cut on the target rule's schedule with its allocation
snip, grasp      one-shot pruning masks at initialisation, ``method.sparsity`` of the conv weights
imp              iterative magnitude pruning with rewinding (``method.rounds``, ``method.rewind_epoch``)
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import TrainConfig
from .families import FIXED_RANK, PRUNED, RANK_ADAPTIVE
from .errors import ConfigError
from .lowrank import TDLRT, BudgetRule, BudgetSchedule, ConversionRules, ToleranceRule, RankPolicy, convert_to_lowrank, lowrank_layers
from .lowrank.allocation import lower_bound_params, upper_bound_params
from .metrics import parameter_report
from .lowrank.baselines import (DECOMPOSABLE, FixedTuckerConv2d, allocate_tucker_ranks, apply_masks,
                                frac_for_compression, global_masks, grasp_scores, magnitude_scores, make_fixed,
                                prunable_convs, snip_scores)
from .lowrank.pruning import GradualPruning
from .lowrank.convert import eligible_conv
from .lowrank.tucker import mode_product
from .files import load_json


def _convs_to_factorise(model: nn.Module, convert_first: bool, keep: Tuple[str, ...] = ()):
    """Every eligible conv but the first (unless ``convert_first``) and those named in ``keep``."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    first = convs[0][0] if convs else None
    return [(n, m) for n, m in convs if eligible_conv(m) and (convert_first or n != first) and n not in keep]


def conv_classifier(cfg: TrainConfig, model: nn.Module) -> Tuple[str, ...]:
    """A torchvision network without a linear layer (squeezenet) classifies with its last conv: kept dense, as
    a linear classifier is."""
    if cfg.model.name != "torchvision" or any(isinstance(m, nn.Linear) for m in model.modules()):
        return ()
    from .models.torchvision_nets import fitted_layers

    return (fitted_layers(model)[0],)


def factorise(cfg: TrainConfig, model: nn.Module, generator: torch.Generator,
              saved_ranks: Optional[Dict[str, Tuple[int, int]]] = None) -> None:
    """Apply a low-rank method (integrated or fixed-rank) to ``model`` in place, before training.
    ``saved_ranks``: rebuilding a trained run for its checkpoint (eval, export), fixed-rank Tucker layers at
    the checkpoint's ranks, whatever chose them (another run's ranks, the one-shot allocation)."""
    m = cfg.method
    init = "hosvd" if cfg.starts_trained else "random"
    if m.name in RANK_ADAPTIVE or m.name in PRUNED:
        policy = RankPolicy(m.r_min, m.r_max, m.r_max_frac, m.init_rank, m.init_rank_frac, m.adapted_modes)
        rules = ConversionRules(convert_linear=m.convert_linear, convert_first_conv=m.convert_first_conv,
                                pointwise="matrix" if cfg.model.name == "torchvision" else "tucker",
                                exclude=conv_classifier(cfg, model))
        fmt = {"tdlrt": "tucker", "dlrt": "matrix", "tucker_prune": "trained_tucker"}[m.name]
        try:
            converted = convert_to_lowrank(model, policy, rules, init=init, generator=generator, conv_format=fmt)
        except ValueError as exc:
            raise ConfigError(f"{exc}: method.init_rank and method.r_min are absolute ranks, method.r_max_frac "
                              f"a fraction of each layer (method.init_rank_frac sets the start)") from None
        if not converted:
            raise ConfigError(nothing_to_factorise(cfg))
    elif m.name in FIXED_RANK:
        factorise_fixed(cfg, model, generator, saved_ranks)
    if m.init_decay > 0:
        ill_condition(model, m.init_decay, generator)


def nothing_to_factorise(cfg: TrainConfig) -> str:
    """The line for a network none of whose layers the method can factorise, with what would help."""
    m = cfg.method
    if cfg.model.name == "torchvision":
        linear = ("" if m.convert_linear else "; method.convert_linear=true factorises its hidden linear layers"
                  + ("" if m.name in RANK_ADAPTIVE else " under method=tdlrt (tdlrt compress takes it too)"))
        return (f"method={m.name}: no layer of {cfg.model.arch} can be factorised (grouped and depthwise convs, the "
                f"first conv and the classifier stay dense, and so do projections an attention layer reads "
                f"directly){linear}")
    return (f"method={m.name}: no layer of {cfg.model.name} at model.width_mult={cfg.model.width_mult:g} can be "
            f"factorised (a conv needs 2 or more channels in and out); raise model.width_mult")


def factorise_fixed(cfg: TrainConfig, model: nn.Module, generator: torch.Generator,
                    saved_ranks: Optional[Dict[str, Tuple[int, int]]] = None) -> None:
    """tucker, cp, tt, matrix: every conv but the first replaced by a fixed-rank factorisation at
    ``method.rank_frac`` of its channels, at the one fraction that reaches ``method.target_cr``, or (tucker)
    at the final ranks of the run ``method.ranks_from``. With ``init_from`` the loaded kernels are decomposed
    (tucker: truncated HOSVD; tt: TT-SVD; matrix: SVD; cp is refused) and tucker's ranks at ``target_cr`` are
    chosen by the target rule's global allocation from the kernels' spectra."""
    m = cfg.method
    decompose = cfg.starts_trained and saved_ranks is None
    if decompose and m.name not in DECOMPOSABLE:
        raise ConfigError(f"init_from with method={m.name}: a CP decomposition has no closed form (it is fitted "
                          f"iteratively), so a trained network cannot be compressed to it here; use method=tucker, "
                          f"tt or matrix")
    init = "hosvd" if decompose else "random"
    convs = _convs_to_factorise(model, m.convert_first_conv, conv_classifier(cfg, model))
    if not convs:
        raise ConfigError(nothing_to_factorise(cfg))
    names = {n for n, _ in convs}
    kept = sum(c.weight.numel() for n, c in model.named_modules() if isinstance(c, nn.Conv2d) and n not in names)
    if m.name == "tucker" and (saved_ranks or m.ranks_from or (decompose and m.target_cr is not None)):
        if saved_ranks:
            missing = sorted(set(n for n, _ in convs) - set(saved_ranks))
            if missing:
                raise ConfigError(f"the checkpoint has no Tucker factors for {', '.join(missing[:3])}")
            ranks = saved_ranks
        elif m.ranks_from:
            ranks = ranks_of_run(m.ranks_from, cfg, dict(convs))
        else:
            dense = kept + sum(c.weight.numel() for _, c in convs)
            budget = (1 - m.target_cr / 100.0) * dense - kept
            least = sum(c.kernel_size[0] * c.kernel_size[1] + c.out_channels + c.in_channels for _, c in convs)
            if budget < least:
                raise ConfigError(f"method.target_cr={m.target_cr:g} is out of reach: at rank 1 in every layer the "
                                  f"conv compression rate is {100 * (1 - (least + kept) / dense):.2f}%")
            chosen = allocate_tucker_ranks([c.weight for _, c in convs], budget)
            ranks = {name: r for (name, _), r in zip(convs, chosen)}
        new = {name: FixedTuckerConv2d(conv, *ranks[name], init=init, generator=generator) for name, conv in convs}
    else:
        frac = m.rank_frac
        if frac is None:
            shapes = [(c.out_channels, c.in_channels, math.prod(c.kernel_size)) for _, c in convs]
            frac = frac_for_compression(m.name, shapes, m.target_cr, kept)
        new = {name: make_fixed(m.name, conv, frac, generator, init=init) for name, conv in convs}
    for name, layer in new.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)


def tucker_ranks_in(weights: dict) -> Dict[str, Tuple[int, int]]:
    """``(r_out, r_in)`` of every fixed-rank Tucker layer in a state dict (its ``<name>.core`` next to
    ``<name>.U0``)."""
    return {key[: -len(".core")]: (int(v.shape[0]), int(v.shape[1])) for key, v in weights.items()
            if key.endswith(".core") and getattr(v, "dim", lambda: 0)() == 4 and key[: -len("core")] + "U0" in weights}


def ranks_of_run(folder: str, cfg: TrainConfig, convs: Dict[str, nn.Conv2d]) -> Dict[str, Tuple[int, int]]:
    """The final Tucker ranks ``(r_out, r_in)`` of every factorised conv of the finished run in ``folder``
    (its summary.json), for ``method.ranks_from``. Refused with one line: a folder without a summary, a run of
    another model, width or data, or one whose layers are not those factorised here."""
    key = f"method.ranks_from={folder}"
    path = Path(folder).expanduser() / "summary.json"
    try:
        summary = load_json(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{key}: no summary.json there (a finished tdlrt run folder is needed)") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: cannot read {path} ({type(exc).__name__})") from None
    source = summary.get("config") if isinstance(summary, dict) else None
    ranks = summary.get("ranks") if isinstance(summary, dict) else None
    if not isinstance(source, dict) or not isinstance(ranks, dict):
        raise ConfigError(f"{key}: {path} records no config and ranks")
    model, data = source.get("model") or {}, source.get("data") or {}
    theirs = (model.get("name"), model.get("width_mult"), data.get("name"))
    mine = (cfg.model.name, cfg.model.width_mult, cfg.data.name)
    if theirs[0] != mine[0] or theirs[2] != mine[2] or not isinstance(theirs[1], (int, float)) \
            or float(theirs[1]) != float(mine[1]):
        raise ConfigError(f"{key} is a run of model={theirs[0]} (width {theirs[1]}) on data={theirs[2]}; this one "
                          f"is model={mine[0]} (width {mine[1]}) on data={mine[2]}")
    out = {}
    for name, conv in convs.items():
        r = ranks.get(name)
        if not (isinstance(r, list) and len(r) == 4 and all(isinstance(v, int) and not isinstance(v, bool) for v in r)):
            raise ConfigError(f"{key}: layer {name} has no Tucker ranks there (the run must be of method=tdlrt, "
                              f"tucker or tucker_prune with the same layers factorised)")
        if list(r[2:]) != list(conv.kernel_size):
            raise ConfigError(f"{key}: layer {name} has kernel-mode ranks {r[2:]} there (method.adapted_modes=all); "
                              f"fixed-rank Tucker keeps the {tuple(conv.kernel_size)} kernel modes whole")
        if not (1 <= r[0] <= conv.out_channels and 1 <= r[1] <= conv.in_channels):
            raise ConfigError(f"{key}: layer {name} has ranks {r[:2]} there, which do not fit its "
                              f"{conv.out_channels} x {conv.in_channels} channels")
        out[name] = (r[0], r[1])
    extra = sorted(set(ranks) - set(convs))
    if extra:
        raise ConfigError(f"{key}: that run factorised {', '.join(extra[:3])}, which stays dense here")
    return out


def sources_of(cfg: TrainConfig) -> Dict[str, dict]:
    """The runs this one starts from (``method.ranks_from``, an ``init_from`` checkpoint of a tdlrt run):
    ``{key: {"path", "config", "seed"}}`` from their saved configs, for summary.json, so that a report groups
    the runs started from the seeds of one setting into one row. A source that cannot be read is left out."""
    found = {}
    if getattr(cfg.method, "ranks_from", None):
        try:
            config = load_json((Path(cfg.method.ranks_from).expanduser() / "summary.json").read_text()).get("config")
        except (OSError, ValueError, AttributeError):
            config = None
        if isinstance(config, dict):
            found["method.ranks_from"] = {"path": str(cfg.method.ranks_from), "config": config}
    if cfg.init_from and cfg.init_from != "torchvision":
        try:
            state = torch.load(cfg.init_from, map_location="cpu", weights_only=True, mmap=True)
            config = state.get("config") if isinstance(state, dict) else None
        except Exception:
            config = None
        if isinstance(config, dict):
            found["init_from"] = {"path": str(cfg.init_from), "config": config}
    for entry in found.values():
        entry["seed"] = entry["config"].get("seed")
    return found


def ill_condition(model: nn.Module, decay: float, generator: torch.Generator) -> None:
    """The paper's ill-conditioned start: every Tucker core (4-d ``core``) is mixed in its channel modes by
    ``Q_i diag(10^(-decay k))`` (Q_i random orthogonal), so the unfoldings' singular values decay like
    ``10^(-decay k)``; its norm is kept. CP layers get their rank-one terms scaled by ``10^(-decay k)``."""
    for module in model.modules():
        core = getattr(module, "core", None)
        if isinstance(core, torch.Tensor) and core.dim() == 4:
            c = core.detach().to(torch.float64)
            for i in (0, 1):
                r = c.shape[i]
                q, _ = torch.linalg.qr(torch.randn(r, r, dtype=torch.float64, generator=generator))
                c = mode_product(c, q * 10.0 ** (-decay * torch.arange(r, dtype=torch.float64)), i)
            core.data.copy_((c * (core.detach().to(torch.float64).norm() / c.norm())).to(core.dtype))
        elif hasattr(module, "A") and hasattr(module, "Kw"):
            s = 10.0 ** (-decay * torch.arange(module.A.shape[1], dtype=torch.float64))
            module.A.data *= s.to(module.A.dtype).to(module.A.device)


def prune_at_init(cfg: TrainConfig, model: nn.Module, batch) -> None:
    """SNIP or GraSP masks from one training batch, before training."""
    x, y = batch
    convs = prunable_convs(model)
    if not convs:
        raise ConfigError(f"method={cfg.method.name}: {cfg.model.arch or cfg.model.name} has no conv to prune but "
                          f"the first (grouped and depthwise convs are not pruned)")

    def loss_fn(net):
        return F.cross_entropy(net(x), y)

    scores = snip_scores(model, convs, loss_fn) if cfg.method.name == "snip" else grasp_scores(model, convs, loss_fn)
    apply_masks(model, global_masks(scores, cfg.method.sparsity))


def imp_prune(model: nn.Module, keep_fraction: float) -> None:
    """Iterative magnitude pruning: keep the largest ``keep_fraction`` of all prunable conv weights."""
    convs = prunable_convs(model)
    if not convs:
        raise ConfigError("method=imp: the network has no conv to prune but the first (grouped and depthwise "
                          "convs are not pruned)")
    apply_masks(model, global_masks(magnitude_scores(convs), 1 - keep_fraction))


def imp_rewind(model: nn.Module, state: dict) -> None:
    """Reset every weight and buffer to ``state`` (saved before pruning), keeping the current masks."""
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key.endswith("weight_mask"):
                continue
            source = key[: -len("_orig")] if key.endswith("weight_orig") else key
            value.copy_(state[source])


# --------------------------------------------------------------------------- what a method adds to the loop

class Method:
    """The plain loop's hooks; dense and the fixed-rank factorisations need none of them.

    ``train()`` calls, in order: :meth:`epochs` (how many the run has), :meth:`start` (once, before the first
    step of a fresh run), :meth:`stepper` (what takes the optimisation step), and :meth:`before_epoch` at the
    start of every epoch; ``True`` from it means "new optimizer, new schedule, forget the best epoch"."""

    resumable = True
    ranks_move = False  # the ranks change during training (tdlrt, dlrt): logged per step, best.pt at the final ones

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.integrator = None

    def epochs(self) -> int:
        return self.cfg.epochs

    def start(self, model: nn.Module, first_batch) -> None:
        """``first_batch()`` returns a training batch (called only by methods that need one: it draws random
        numbers, which a resumed run must not see twice)."""

    def stepper(self, model: nn.Module, optimizer, steps_per_epoch: int, dist) -> None:
        pass

    def before_epoch(self, epoch: int, model: nn.Module) -> bool:
        return False


class Integrated(Method):
    """tdlrt, dlrt: the TDLRT integrator takes each step; bases frozen for the last ``finetune_epochs``."""

    ranks_move = True

    def stepper(self, model, optimizer, steps_per_epoch, dist) -> None:
        m = self.cfg.method
        if m.target_cr is not None:  # the target rule
            rule = BudgetRule(target_budget(model, m.target_cr, m.ramp_start, m.ramp_end,
                                            (self.cfg.epochs - m.finetune_epochs) * steps_per_epoch, m.augment_every,
                                            linear=m.convert_linear))
        else:  # the paper's rule
            rule = ToleranceRule(self.cfg.tau, round(m.tau_warmup_epochs * steps_per_epoch), m.tau_warmup_shape)
        self.integrator = TDLRT(model, optimizer, rule, m.augment_every,
                                average=dist.mean_ if dist.enabled else None,
                                broadcast=dist.broadcast_ if dist.enabled else None)

    def before_epoch(self, epoch, model) -> bool:
        if epoch >= self.cfg.epochs - self.cfg.method.finetune_epochs:
            self.integrator.freeze_bases()
        return False


def target_budget(model: nn.Module, target_cr: float, ramp_start: float, ramp_end: float,
                  adapting_steps: int, augment_every: int = 1, linear: bool = False) -> BudgetSchedule:
    """The target rule's schedule for ``model`` (converted): conv c.r. (the paper's definition, every conv
    kernel counted; ``linear``: every conv kernel and linear weight matrix, ``compression_rate_weights``)
    rising to ``target_cr`` percent between the fractions ``ramp_start`` and ``ramp_end`` of the adapting
    steps. The ramp ends no later than the last adapting step (step ``t`` adapts when ``t % augment_every ==
    0``), so that the last truncation already has the final budget. Refuses a target outside what the rank
    bounds can give."""
    report = parameter_report(model)
    adapted = [layer for layer in lowrank_layers(model) if linear or layer.is_conv]
    counted = report["conv_params"] + (report["linear_params"] if linear else 0)
    fixed = counted - sum(layer.num_params() for layer in adapted)
    dense = report["conv_params_dense"] + (report["linear_params_dense"] if linear else 0)
    last = augment_every * ((max(adapting_steps, 1) - 1) // augment_every)  # the last adapting step
    end = min(round(ramp_end * adapting_steps), last)
    budget = BudgetSchedule(dense=dense, fixed=fixed, target=target_cr / 100.0,
                            start=min(round(ramp_start * adapting_steps), end), end=end)
    most = 100.0 * (1 - (fixed + sum(lower_bound_params(layer) for layer in adapted)) / dense)
    least = 100.0 * (1 - (fixed + sum(upper_bound_params(layer) for layer in adapted)) / dense)
    what = "conv and linear" if linear else "conv"
    if target_cr > most:
        r_min = min(layer.rank_bounds[i][0] for layer in adapted for i, a in enumerate(layer.adapted) if a)
        raise ConfigError(f"method.target_cr={target_cr:g} is out of reach: with every adapted rank at "
                          f"method.r_min={r_min} the {what} compression rate is {most:.2f}% (lower r_min, or ask "
                          f"for less)")
    if target_cr < least:
        raise ConfigError(f"method.target_cr={target_cr:g} is below the {what} compression rate at the rank caps "
                          f"({least:.2f}%): raise method.r_max_frac (at most 1) or method.r_max to ask for less")
    return budget


class Pruned(Method):
    """tucker_prune: the optimizer trains factors and cores at every step; :class:`GradualPruning` cuts the
    ranks on the target rule's schedule (the same budget as tdlrt's, :func:`target_budget`)."""

    ranks_move = True

    def stepper(self, model, optimizer, steps_per_epoch, dist) -> None:
        if dist.enabled:
            raise ConfigError("method=tucker_prune does not run data parallel yet (one process per run)")
        m = self.cfg.method
        budget = target_budget(model, m.target_cr, m.ramp_start, m.ramp_end, self.cfg.epochs * steps_per_epoch,
                               m.augment_every)
        self.integrator = GradualPruning(model, optimizer, budget, m.augment_every)


class PruneAtInit(Method):
    """snip, grasp: masks from one training batch before the first step."""

    def start(self, model, first_batch) -> None:
        prune_at_init(self.cfg, model, first_batch())


class IterativePruning(Method):
    """imp: ``rounds`` prunings, each followed by ``epochs`` of retraining from the weights rewound to their
    values after ``rewind_epoch``; best.pt is the best epoch of the pruned network."""

    resumable = False  # masks and the rewind point are not checkpointed

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.rewind_state = None

    def epochs(self) -> int:
        return self.cfg.epochs * (self.cfg.method.rounds + 1)

    def before_epoch(self, epoch, model) -> bool:
        m = self.cfg.method
        if epoch == m.rewind_epoch:
            self.rewind_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if epoch > 0 and epoch % self.cfg.epochs == 0:  # a round ends: prune, rewind, restart the schedule
            imp_prune(model, (1 - m.sparsity) ** ((epoch // self.cfg.epochs) / m.rounds))
            imp_rewind(model, self.rewind_state)
            return True
        return False


def method_of(cfg: TrainConfig) -> Method:
    name = cfg.method.name
    if name in RANK_ADAPTIVE:
        return Integrated(cfg)
    if name in PRUNED:
        return Pruned(cfg)
    if name in ("snip", "grasp"):
        return PruneAtInit(cfg)
    if name == "imp":
        return IterativePruning(cfg)
    return Method(cfg)
