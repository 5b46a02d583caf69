"""`tdlrt bench`: time one training step of dense, fixed-rank Tucker and TDLRT networks, like with like.

Every method runs the same model, batch, precision and memory layout on random inputs of the dataset's
shape. TDLRT runs with its ranks pinned (r_min = r_max = the asked fraction of each mode), so it
augments to twice the rank and truncates back every ``augment_every`` steps at a fixed, comparable size.
Times are over ``steps`` steps after ``warmup`` steps, with device synchronisation, summarised like
``torch.utils.benchmark``: median and interquartile range (IQR = 75th - 25th percentile, linear
interpolation). The truncation share of a TDLRT row is the median, over cycles of ``augment_every`` steps,
of (time in truncation) / (time of the cycle).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .config import PRECISIONS
from .errors import ConfigError, UserError
from .lowrank import TDLRT, ConversionRules, RankPolicy, ToleranceRule, convert_to_lowrank
from .lowrank.spectra import SPECTRA
from .metrics import parameter_report
from .models import MIN_IMAGE_SIZE, build_model

GRAPH = ("auto", "true", "false")
FORMATS = ("table", "json")
# Why there is no graph-captured TDLRT row (shown whenever graph rows are).
NO_TDLRT_GRAPH = ("no graph-captured TDLRT row: an adapting step changes the shapes of every core and factor "
                  "(augmented to 2r, truncated to a rank decided on the host after an eigen-decomposition) and "
                  "replaces their storage, which a captured graph cannot replay; the steps between adaptations "
                  "(augment_every > 1) are fixed-rank steps, timed by the tucker_graph row")


BENCH_HELP = {
    "model.name": "network: vgg16, resnet18, alexnet, lenet5 (model=NAME)",
    "model.width_mult": "scales every hidden width",
    "batch_size": "images per step",
    "image_size": "side of the random input images",
    "channels": "input channels",
    "num_classes": "classes of the random labels",
    "device": "auto (CUDA if there is a GPU), cpu, cuda or cuda:N",
    "precision": "fp32 or bf16 (autocast)",
    "channels_last": "channels-last memory format",
    "steps": "timed steps per row (median and interquartile range)",
    "warmup": "untimed steps before timing",
    "rank_fracs": "ranks of the Tucker and TDLRT rows, as fractions of the channels (pinned)",
    "augment_every": "TDLRT rows: adapt every k-th step, one row per k",
    "graph": "compiled dense and Tucker rows: auto (CUDA only), true or false",
    "tau": "TDLRT truncation tolerance (ranks are pinned: it only decides the work of the truncation)",
    "spectra": "TDLRT truncation: fast, or exact (the float64 reference)",
    "threads": "CPU threads of torch; 0: torch's default",
    "format": "table (markdown) or json",
    "seed": "seed of the weights and the random batch",
}


def bench_help() -> str:
    """`tdlrt bench --help`: every key, its default and what it does."""
    from dataclasses import asdict

    from .config import flatten

    defaults = flatten(asdict(BenchConfig()))
    width = max(len(f"{k}={v}") for k, v in defaults.items()) + 2
    lines = ["usage: tdlrt bench [KEY=VALUE ...]   (step time per method: dense, fixed-rank Tucker, TDLRT)", "",
             "keys (default; what it does):"]
    for key, value in defaults.items():
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        lines.append(f"  {key + '=' + shown:<{width}} {BENCH_HELP.get(key, '')}".rstrip())
    return "\n".join(lines)


@dataclass
class BenchModel:
    """The built-in network the bench times (torchvision networks are not benched here)."""
    name: str = "vgg16"
    width_mult: float = 1.0


@dataclass
class BenchConfig:
    model: BenchModel = field(default_factory=BenchModel)
    batch_size: int = 128
    image_size: int = 32
    channels: int = 3
    num_classes: int = 10
    device: str = "auto"
    precision: str = "fp32"           # fp32 | bf16
    channels_last: bool = False
    steps: int = 20
    warmup: int = 5
    rank_fracs: List[float] = field(default_factory=lambda: [0.25, 0.1])
    augment_every: List[int] = field(default_factory=lambda: [1, 4])
    graph: str = "auto"               # compiled dense and Tucker baselines: auto (CUDA only) | true | false
    tau: float = 0.1
    spectra: str = "fast"             # TDLRT truncation: fast | exact (the float64 reference)
    threads: int = 0                  # CPU threads for torch; 0: torch's default
    format: str = "table"             # table | json
    seed: int = 0

    def validate(self) -> "BenchConfig":
        """Every bad value fails here, naming its key and the values it may take."""
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        def one_of(key: str, value, allowed) -> None:
            need(value in allowed, f"{key}={value} is not one of: {', '.join(allowed)}")

        self.graph = str(self.graph).lower()  # the command line's graph=true arrives as the bool True
        one_of("model", self.model.name, tuple(MIN_IMAGE_SIZE))  # the built-in networks
        one_of("precision", self.precision, PRECISIONS)
        one_of("graph", self.graph, GRAPH)
        one_of("format", self.format, FORMATS)
        one_of("spectra", self.spectra, SPECTRA)
        need(self.device in ("auto", "cpu") or self.device.startswith("cuda"),
             f"device={self.device} is not one of: auto, cpu, cuda, cuda:N")
        need(self.model.width_mult > 0, f"model.width_mult={self.model.width_mult} must be > 0")
        smallest = MIN_IMAGE_SIZE[self.model.name]
        need(self.image_size >= smallest,
             f"image_size={self.image_size} is too small for model={self.model.name}: it must be >= {smallest}")
        need(self.channels >= 1, f"channels={self.channels} must be >= 1")
        need(self.num_classes >= 2, f"num_classes={self.num_classes} must be >= 2")
        need(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        need(self.steps >= 1, f"steps={self.steps} must be >= 1")
        need(self.warmup >= 0, f"warmup={self.warmup} must be >= 0")
        need(0 < self.tau < 1, f"tau={self.tau} must be in (0, 1)")
        need(all(0 < f <= 0.5 for f in self.rank_fracs),
             f"rank_fracs={list(self.rank_fracs)} must all be in (0, 0.5] (r_max = n/2 leaves room to augment)")
        need(all(k >= 1 for k in self.augment_every), f"augment_every={list(self.augment_every)} must all be >= 1")
        need(all(k <= 10_000 for k in self.augment_every), f"augment_every={list(self.augment_every)} must all be "
             f"<= 10000 (each row times at least two cycles of that many steps)")
        need(self.threads >= 0, f"threads={self.threads} must be >= 0 (0: torch's default)")
        need(0 <= self.seed < 2 ** 63, f"seed={self.seed} must be in [0, 2^63)")
        for key, top in (("model.width_mult", 16), ("image_size", 4096), ("channels", 64), ("num_classes", 10 ** 6),
                         ("batch_size", 10 ** 5), ("steps", 10 ** 6), ("warmup", 10 ** 6), ("threads", 4096)):
            value = self.model.width_mult if key == "model.width_mult" else getattr(self, key)
            need(math.isfinite(value) and value <= top, f"{key}={value} is larger than tdlrt bench takes (at most {top:g})")
        return self


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quartiles(values: List[float]) -> List[float]:
    """25th, 50th and 75th percentiles, linearly interpolated (as ``torch.utils.benchmark.Measurement``)."""
    return torch.tensor(values, dtype=torch.float64).quantile(
        torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()


def timing_stats(seconds: List[float]) -> Dict[str, float]:
    """Median and interquartile range (75th - 25th percentile), in milliseconds."""
    q1, median, q3 = quartiles([1000 * s for s in seconds])
    return {"median": median, "iqr": q3 - q1}


def _random_batch(cfg: BenchConfig, device: torch.device):
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size, generator=g).to(device)
    y = torch.randint(0, cfg.num_classes, (cfg.batch_size,), generator=g).to(device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def _build(cfg: BenchConfig, device, rank_frac: Optional[float]):
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model.name, cfg.channels, cfg.num_classes, cfg.image_size, cfg.model.width_mult)
    if rank_frac is not None:
        policy = RankPolicy(r_min=1, r_max_frac=rank_frac, init_rank_frac=rank_frac)
        convert_to_lowrank(model, policy, ConversionRules(), generator=torch.Generator().manual_seed(cfg.seed))
        for m in model.modules():  # pin the ranks: r_min = r_max = starting rank
            if hasattr(m, "rank_bounds"):
                m.rank_bounds = [(r, r) for r in m.ranks]
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def _time_steps(step, n: int, device) -> List[float]:
    times = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _step_flops(step, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / batch


def _truncation_cycles(step, integrator: TDLRT, cycles: int, device) -> Tuple[List[float], Dict[str, float]]:
    """The measured steps of a TDLRT row, in cycles of ``augment_every`` steps (one truncation each): each
    cycle's time per step, and the truncation's time and share of its own cycle (medians over ``cycles``
    cycles), so that every column of the row comes from the same steps (a truncation never takes longer
    than the step it is part of). The integrator's clock synchronises the device."""
    integrator.timing = True
    per_step, shares, seconds = [], [], []
    for _ in range(cycles):
        integrator.truncation_seconds = 0.0
        total = sum(_time_steps(step, integrator.augment_every, device))
        per_step.append(total / integrator.augment_every)
        shares.append(integrator.truncation_seconds / total)
        seconds.append(integrator.truncation_seconds)
    integrator.timing = False
    stats = timing_stats(seconds)
    return per_step, {"truncation_share": quartiles(shares)[1], "truncation_ms": stats["median"],
                      "truncation_ms_iqr": stats["iqr"]}


def run_one(cfg: BenchConfig, device, method: str, rank_frac=None, augment_every=1, graph=False) -> dict:
    model = _build(cfg, device, rank_frac)
    x, y = _random_batch(cfg, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    integrator = (TDLRT(model, opt, ToleranceRule(cfg.tau, spectra=cfg.spectra), augment_every=augment_every)
                  if method == "tdlrt" else None)
    stepper = integrator or opt
    forward = torch.compile(model, mode="reduce-overhead" if device.type == "cuda" else "default") if graph else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    def step():
        stepper.zero_grad(set_to_none=True)
        with amp:
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        stepper.step()

    def forward_only():
        with torch.no_grad(), amp:
            forward(x)

    flops_fwd = _step_flops(forward_only, cfg.batch_size)
    flops_train = _step_flops(step, cfg.batch_size)  # the whole step: forward, backward, integrator
    _time_steps(step, cfg.warmup, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    truncation = {"truncation_share": None, "truncation_ms": None, "truncation_ms_iqr": None}
    if integrator is None:
        times = _time_steps(step, cfg.steps, device)
    else:  # one instrumented pass gives the step time and the truncation's (timing it synchronises the device)
        times, truncation = _truncation_cycles(step, integrator, max(2, math.ceil(cfg.steps / augment_every)), device)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    stats = timing_stats(times)
    report = parameter_report(model)
    return {"method": method + ("_graph" if graph else ""), "rank_frac": rank_frac,
            "augment_every": augment_every if method == "tdlrt" else None,
            "spectra": cfg.spectra if method == "tdlrt" else None,
            "ms_per_step": stats["median"], "ms_iqr": stats["iqr"],
            "images_per_s": cfg.batch_size / (stats["median"] / 1000), "peak_mem_mib": peak, **truncation,
            "compression_rate": report["compression_rate"], "params": report["params"],
            "flops_forward": flops_fwd, "flops_train": flops_train}


def run_bench(cfg: BenchConfig) -> dict:
    from .runtime import resolve_device

    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    graph = cfg.graph == "true" or (cfg.graph == "auto" and device.type == "cuda")
    results = [run_one(cfg, device, "dense")]
    if graph:
        results.append(run_one(cfg, device, "dense", graph=True))
    for frac in cfg.rank_fracs:
        results.append(run_one(cfg, device, "tucker", rank_frac=frac))
        if graph:
            results.append(run_one(cfg, device, "tucker", rank_frac=frac, graph=True))
        for every in cfg.augment_every:
            results.append(run_one(cfg, device, "tdlrt", rank_frac=frac, augment_every=every))
    dense = results[0]["ms_per_step"]
    dense_graph = results[1]["ms_per_step"] if graph else None
    for r in results:
        r["ratio_vs_dense"] = r["ms_per_step"] / dense
        r["ratio_vs_dense_graph"] = r["ms_per_step"] / dense_graph if dense_graph else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "config": asdict(cfg), "results": results,
            "notes": [NO_TDLRT_GRAPH] if graph else []}


def format_table(out: dict) -> str:
    cfg = out["config"]
    lines = [f"{cfg['model']['name']} (width x{cfg['model']['width_mult']}), batch {cfg['batch_size']}, {cfg['precision']}, "
             f"{'channels_last' if cfg['channels_last'] else 'contiguous'}, on {out['device']}, torch {out['torch']}; "
             f"ms/step: median (IQR) of {cfg['steps']} steps",
             "", "| method | ranks | augment_every | ms/step | img/s | vs dense | vs dense graph | truncation share "
             "| truncation ms | peak MiB | c.r. % | fwd MFLOPs/img | train MFLOPs/img |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in out["results"]:
        lines.append(
            f"| {r['method']} | {f(r['rank_frac'], '.0%')} | {f(r['augment_every'], 'd')} | "
            f"{r['ms_per_step']:.1f} ({r['ms_iqr']:.1f}) | "
            f"{r['images_per_s']:.0f} | {r['ratio_vs_dense']:.2f} | {f(r['ratio_vs_dense_graph'], '.2f')} | "
            f"{f(r['truncation_share'], '.1%')} | {f(r['truncation_ms'], '.1f')} | {f(r['peak_mem_mib'], '.0f')} | "
            f"{r['compression_rate']:.1f} | {r['flops_forward'] / 1e6:.1f} | {r['flops_train'] / 1e6:.1f} |")
    lines += [f"\nNote: {note}" for note in out.get("notes", [])]
    return "\n".join(lines)


def _bench_config(cfg) -> BenchConfig:
    """The Hydra config as a validated :class:`BenchConfig`; type errors name their key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        bc = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchConfig),
                                                 OmegaConf.to_container(cfg, resolve=True)))
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"{key + ': ' if key else ''}{str(exc).splitlines()[0]}") from None
    return bc.validate()


def main() -> None:
    import hydra

    from .config import CONFIG_DIR

    @hydra.main(config_path=CONFIG_DIR, config_name="bench", version_base="1.3")
    def _run(cfg) -> None:
        try:
            bc = _bench_config(cfg)
            out = run_bench(bc)
        except UserError as exc:
            print(f"tdlrt: error: {exc}", file=sys.stderr)
            sys.exit(2)
        print(json.dumps(out, indent=2) if bc.format == "json" else format_table(out))

    _run()
