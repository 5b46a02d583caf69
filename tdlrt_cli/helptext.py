"""`tdlrt train --help` (every key, its value in the composed config, what it does) and shell completion
for `tdlrt` and its subcommands (`tdlrt completion bash`)."""
from __future__ import annotations

from pathlib import Path
from typing import List

from textwrap import wrap

from .config import CONFIG_DIR, FIELD_HELP, flatten
from .models.torchvision_nets import architectures

GROUPS = ("model", "data", "method", "optimizer", "scheduler", "experiment", "variant")


def options(group: str) -> List[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def train_help(overrides: List[str]) -> str:
    """The help of `tdlrt train`, with the values composed from ``overrides`` (``model=lenet5 --help``)."""
    from dataclasses import asdict

    from omegaconf import OmegaConf

    from .config import from_dictconfig
    from .launch import Composer, train_config

    with Composer() as compose:  # every schema key, the ones the chosen presets leave out at their defaults
        config = flatten(asdict(from_dictconfig(OmegaConf.create(train_config(compose(overrides))))))
    width = max(len(f"{k}={v}") for k, v in config.items()) + 2
    lines = ["usage: tdlrt train [KEY=VALUE ...] [GROUP=OPTION ...] [-m]   (Hydra overrides; -m sweeps a,b,c lists)",
             "", "config groups (GROUP=OPTION; experiment and variant are presets: +experiment=NAME):"]
    lines += [f"  {g:<10} {', '.join(options(g))}" for g in GROUPS]
    lines += ["", "model=torchvision model.arch=NAME (torchvision's classifiers; model.weights=DEFAULT for its published "
              "weights):"] + wrap(", ".join(architectures()), 116, initial_indent="  ", subsequent_indent="  ")
    lines += ["", "keys (value with these overrides; what it does):"]
    for key, value in config.items():
        shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        lines.append(f"  {key + '=' + shown:<{width}} {FIELD_HELP.get(key, '')}".rstrip())
    lines += ["", "resume: tdlrt train resume=<run folder> [epochs=N device=...]  (the run's own settings)",
              "Hydra: --cfg job (the composed config), --hydra-help, -m hydra/launcher=slurm (pip install "
              "\"tdlrt[cluster]\")", "completion: eval \"$(tdlrt completion bash)\""]
    return "\n".join(lines)


BASH = r"""# bash completion for tdlrt: eval "$(tdlrt completion bash)"
_tdlrt_complete()
{
    local word=${COMP_WORDS[COMP_CWORD]}
    local words=($COMP_LINE)
    if (( COMP_CWORD <= 1 )); then
        COMPREPLY=($(compgen -W "SUBCOMMANDS" -- "$word"))
        return
    fi
    if [[ ${words[1]} =~ ^(train|compress)$ && $word == model.arch=* ]]; then  # torchvision's networks
        COMPREPLY=($(compgen -P "model.arch=" -W "ARCHS" -- "${word#model.arch=}"))
        return
    fi
    case ${words[1]} in
        train|bench)
            local rest=${COMP_LINE#*${words[1]}}
            local choices=$(COMP_LINE="tdlrt-${words[1]}$rest" COMP_POINT=$COMP_POINT tdlrt ${words[1]} -sc query=bash 2>/dev/null)
            COMPREPLY=($(compgen -o nospace -W "$choices" -- "$word"));;
        *)
            COMPREPLY=($(compgen -f -- "$word"));;
    esac
}
COMP_WORDBREAKS=${COMP_WORDBREAKS//=}
complete -o nospace -o default -F _tdlrt_complete tdlrt
"""


def completion(shell: str, subcommands) -> str:
    if shell != "bash":
        raise ValueError(f"completion for {shell!r} is not available; bash is")
    return BASH.replace("SUBCOMMANDS", " ".join(subcommands)).replace("ARCHS", " ".join(architectures()))
