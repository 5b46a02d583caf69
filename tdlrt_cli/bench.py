"""`tdlrt bench`: time one training step of dense, fixed-rank Tucker and TDLRT networks, like with like.

Every method runs the same model, batch, precision and memory layout on random inputs of the dataset's
shape. TDLRT runs with its ranks pinned (r_min = r_max = the asked fraction of each mode), so it
augments to twice the rank and truncates back every ``augment_every`` steps at a fixed, comparable size.
Times are medians over ``steps`` steps after ``warmup`` steps, with device synchronisation.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .errors import ConfigError, UserError
from .lowrank import TDLRT, ConversionRules, RankPolicy, convert_to_lowrank
from .metrics import parameter_report
from .models import build_model


@dataclass
class BenchConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
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
    graph: str = "auto"               # compiled dense baseline: auto (CUDA only) | true | false
    tau: float = 0.1
    format: str = "table"             # table | json
    seed: int = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def run_one(cfg: BenchConfig, device, method: str, rank_frac=None, augment_every=1, graph=False) -> dict:
    model = _build(cfg, device, rank_frac)
    x, y = _random_batch(cfg, device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    integrator = TDLRT(model, opt, tau=cfg.tau, augment_every=augment_every) if method == "tdlrt" else None
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
    times = _time_steps(step, cfg.steps, device)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    share = None
    if integrator is not None:  # a second, instrumented pass: time spent in truncation
        integrator.timing = True
        integrator.truncation_seconds = 0.0
        instrumented = _time_steps(step, max(cfg.steps // 2, augment_every), device)
        share = integrator.truncation_seconds / sum(instrumented)
        integrator.timing = False
    ms = 1000 * statistics.median(times)
    report = parameter_report(model)
    return {"method": method + ("_graph" if graph else ""), "rank_frac": rank_frac,
            "augment_every": augment_every if method == "tdlrt" else None, "ms_per_step": ms,
            "images_per_s": cfg.batch_size / (ms / 1000), "peak_mem_mib": peak, "truncation_share": share,
            "compression_rate": report["compression_rate"], "params": report["params"],
            "flops_forward": flops_fwd, "flops_train": flops_train}


def run_bench(cfg: BenchConfig) -> dict:
    from .train import resolve_device

    device = resolve_device(cfg.device)
    graph = cfg.graph == "true" or (cfg.graph == "auto" and device.type == "cuda")
    results = [run_one(cfg, device, "dense")]
    if graph:
        results.append(run_one(cfg, device, "dense", graph=True))
    for frac in cfg.rank_fracs:
        results.append(run_one(cfg, device, "tucker", rank_frac=frac))
        for every in cfg.augment_every:
            results.append(run_one(cfg, device, "tdlrt", rank_frac=frac, augment_every=every))
    dense = results[0]["ms_per_step"]
    dense_graph = results[1]["ms_per_step"] if graph else None
    for r in results:
        r["ratio_vs_dense"] = r["ms_per_step"] / dense
        r["ratio_vs_dense_graph"] = r["ms_per_step"] / dense_graph if dense_graph else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "config": asdict(cfg), "results": results}


def format_table(out: dict) -> str:
    cfg = out["config"]
    lines = [f"{cfg['model']['name']} (width x{cfg['model']['width_mult']}), batch {cfg['batch_size']}, {cfg['precision']}, "
             f"{'channels_last' if cfg['channels_last'] else 'contiguous'}, on {out['device']}, torch {out['torch']}",
             "", "| method | ranks | augment_every | ms/step | img/s | vs dense | vs dense graph | truncation share "
             "| peak MiB | c.r. % | fwd MFLOPs/img | train MFLOPs/img |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in out["results"]:
        lines.append(
            f"| {r['method']} | {f(r['rank_frac'], '.0%')} | {f(r['augment_every'], 'd')} | {r['ms_per_step']:.1f} | "
            f"{r['images_per_s']:.0f} | {r['ratio_vs_dense']:.2f} | {f(r['ratio_vs_dense_graph'], '.2f')} | "
            f"{f(r['truncation_share'], '.1%')} | {f(r['peak_mem_mib'], '.0f')} | {r['compression_rate']:.1f} | "
            f"{r['flops_forward'] / 1e6:.1f} | {r['flops_train'] / 1e6:.1f} |")
    return "\n".join(lines)


def main() -> None:
    import hydra
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .train import CONFIG_DIR

    @hydra.main(config_path=CONFIG_DIR, config_name="bench", version_base="1.3")
    def _run(cfg) -> None:
        try:
            try:
                bc = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BenchConfig),
                                                         OmegaConf.to_container(cfg, resolve=True)))
            except OmegaConfBaseException as exc:
                raise ConfigError(f"invalid bench config: {str(exc).splitlines()[0]}") from None
            if bc.format not in ("table", "json"):
                raise ConfigError(f"format={bc.format} is not one of: table, json")
            if bc.steps < 1 or bc.batch_size < 1 or bc.warmup < 0:
                raise ConfigError("steps and batch_size must be >= 1, warmup >= 0")
            if not all(0 < f <= 0.5 for f in bc.rank_fracs) or not all(k >= 1 for k in bc.augment_every):
                raise ConfigError("rank_fracs must be in (0, 0.5] and augment_every >= 1")
            out = run_bench(bc)
        except UserError as exc:
            print(f"tdlrt: error: {exc}", file=sys.stderr)
            sys.exit(2)
        print(json.dumps(out, indent=2) if bc.format == "json" else format_table(out))

    _run()
