"""The XLA flags of the suite's processes. conftest.py sets them for pytest's own; a test that
starts a subprocess with a device count of its own (or the launchers' CPU split) builds that
process's XLA_FLAGS here, so that every process of the suite compiles alike.

XLA's lowest backend optimisation level: the suite's programs are many and tiny, so compiling them
is most of its time, and this level compiles them faster (on a 2-core machine the shrunk
`--mesh=4x4` README run took 71 s instead of 95, tests/test_run_steps.py 129 s instead of 159).
"""

COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a process of `devices` simulated CPU devices (None: no count, so the launch
    scripts split the host into one device per core, as a user's would)."""
    if devices is None:
        return COMPILE_FLAGS
    return f"--xla_force_host_platform_device_count={devices} {COMPILE_FLAGS}"
