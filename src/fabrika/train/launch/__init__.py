"""accelerate configs for multi-GPU training, shipped with the package.

    accelerate launch --config_file $(fabrika accelerate-config fsdp) -m fabrika.cli pretrain ...
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_endpoint HOST:29500 -m fabrika.cli pretrain ...

The files set the strategy only; the number of processes comes from `--num_processes` /
`--num_machines` on the launch line (or the defaults below), so one file serves any cluster size.
"""

from pathlib import Path

from fabrika.errors import FabrikaError

HERE = Path(__file__).parent
CONFIGS = {p.stem: p for p in sorted(HERE.glob("*.yaml"))}


def config_path(name: str) -> Path:
    if name not in CONFIGS:
        raise FabrikaError(f"no accelerate config {name!r}; shipped: {', '.join(CONFIGS)}")
    return CONFIGS[name]
