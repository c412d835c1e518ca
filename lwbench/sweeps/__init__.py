"""``lwbench sweep FILE``: a grid of methods x budgets x tasks (x seeds), resumable and fault-tolerant.

The wing's rooms, from the ground up: :mod:`~lwbench.sweeps.spec` (the file, typed, and :func:`expand`, its points),
:mod:`~lwbench.sweeps.points` (a point's name, results folder and run id; planning them all first),
:mod:`~lwbench.sweeps.jobs` and :mod:`~lwbench.sweeps.status` (where each point stands), then the two ways to run
them: :mod:`~lwbench.sweeps.local` (this process, two passes) and :mod:`~lwbench.sweeps.submitit` (a job each).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lwbench.sweeps.spec import LaunchOptions, SweepSpec, expand, launch_options, load_spec, parse_spec

LAUNCHERS = ("local", "submitit")


def run_sweep(spec: SweepSpec | str, flags: Mapping[str, Any] | None = None, sets: Sequence[str] = (),
              shard: str | None = None, phase: str = "all", launcher: str = "local",
              launch: Mapping[str, Any] | None = None, plugins: Sequence[str] = (), dry_run: bool = False,
              debug: bool = False, table: bool = True) -> list[tuple[str, str]]:
    """Run a sweep (a :class:`SweepSpec` or a file's path); return its failures as (point, one-line reason).

    ``flags`` and ``sets`` are the caller's (see :func:`expand`); ``launch`` the caller's launch options on top of
    the file's ``launch:`` section (:func:`launch_options`); ``plugins`` modules each submitit job imports first;
    ``table=False`` leaves out the local sweep's closing table (a caller that prints its own)."""
    import difflib

    from lwbench.errors import ConfigError

    if launcher not in LAUNCHERS:
        close = difflib.get_close_matches(str(launcher), LAUNCHERS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}, not '{launcher}'{hint}")
    spec = load_spec(spec) if isinstance(spec, str) else parse_spec(spec)
    options = launch_options(spec, launch)
    points = expand(spec, flags, sets, shard)
    if dry_run:
        from lwbench.sweeps.local import dry_run_table

        print(dry_run_table(points))
        return []
    if launcher == "submitit":
        import time

        from lwbench.sweeps.local import summary
        from lwbench.sweeps.points import preflight
        from lwbench.sweeps.submitit import submit_sweep

        if phase != "all":
            raise ConfigError("--phase is for local sweeps; with --launcher submitit every job trains and measures "
                              "its own point")
        preflight(points)
        t0 = time.perf_counter()
        failures = submit_sweep(points, options, plugins=tuple(plugins))
        summary(len(points), failures, t0)
        return failures
    from lwbench.sweeps.local import run_local

    return run_local(points, phase, debug=debug, table=table)


__all__ = ["run_sweep", "expand", "load_spec", "parse_spec", "launch_options", "SweepSpec", "LaunchOptions",
           "LAUNCHERS"]
