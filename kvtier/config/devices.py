"""[gpu.devices]: a GPU budget per device, over gpu.budget for the devices it names.

`[gpu] budget` applies to each device that holds tiered layers; a `[gpu.devices]` table
(`"cuda:1" = "4GiB"`) overrides it for one device. Percentages and "auto" are of that
device's free memory; a device this machine lacks takes only a size (for `kvtier plan --gpus`
on a smaller machine; a cache never uses it). Sizes become bytes here, once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from kvtier.config.keys import Layers
from kvtier.config.sources import fail, quoted
from kvtier.config.values import as_budget, parse_budget
from kvtier.errors import shown
from kvtier.machine import free_device_bytes
from kvtier.sizes import MAX_BYTES

PREFIX = "gpu.devices."
# "cuda:0", "cuda:12"; "cpu" (the GPU tier of layers kept on the CPU) and "cpu:N" (tests)
_DEVICE = re.compile(r"cuda:(0|[1-9][0-9]{0,2})|cpu(:(0|[1-9][0-9]{0,2}))?", re.ASCII)
_EXAMPLE = "name a device with its index, such as 'cuda:0' or 'cuda:1' ('cpu' for CPU layers)"


def device_keys(layers: Layers) -> list[str]:
    """The gpu.devices.<device> keys of `layers`, sorted."""
    return sorted(key for key in layers if key.startswith(PREFIX))


def as_device_budgets(layers: Layers) -> Mapping[str, int]:
    """Device name -> bytes for every [gpu.devices] entry; ConfigError for a name that is no
    device (or one this machine lacks) and for a bad budget."""
    out: dict[str, int] = {}
    for key in device_keys(layers):
        name = key.removeprefix(PREFIX)
        source = layers[key][1]
        if not _DEVICE.fullmatch(name):
            fail(f"unknown device {quoted(name)} in [gpu.devices]; {_EXAMPLE}", source)
        if free_device_bytes(name) is None:
            # a device this machine lacks (a plan for a bigger machine): a size, unchecked
            if not isinstance(parse_budget(layers, key), int):
                fail(
                    f"{key} = {shown(layers[key][0])} is a share of free memory, but this "
                    f"machine has no {name} to measure; give a size such as '8GiB'",
                    source,
                )
            out[name] = as_budget(layers, key, lambda: MAX_BYTES, f"the size of {name}")
            continue
        out[name] = as_budget(
            layers, key, lambda name=name: free_device_bytes(name), f"free memory of {name}"
        )
    return MappingProxyType(out)
