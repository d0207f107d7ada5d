"""The `kvtier` command line: one module per command group, registered on the group in app.py.

Commands: info, config init|show|validate, models get|ls, store ls|du|verify|gc|clear, demo,
run, plan, bench, verify. Only this package prints; the work is done by library modules.
"""

from __future__ import annotations

from kvtier.cli import bench, config, demo, info, models, plan, run, store, verify
from kvtier.cli.app import CliHandler, main

_CliHandler = CliHandler  # the name tests and older callers use

for _command in (
    info.info,
    config.config_group,
    demo.demo,
    models.models_group,
    store.store_group,
    plan.plan,
    bench.bench,
    run.run,
    verify.verify,
):
    main.add_command(_command)

__all__ = ["main"]
