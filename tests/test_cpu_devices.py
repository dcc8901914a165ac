"""The launch scripts' one-XLA-CPU-device-per-core setup (edits XLA_FLAGS only, before JAX)."""

import os
import pathlib
import subprocess
import sys

import pytest

from llmcxr_jax.parallel import cpu_devices


@pytest.mark.parametrize("cores,expected", [(1, 1), (2, 2), (3, 2), (6, 4), (8, 8), (64, 8)])
def test_default_count_is_a_power_of_two_within_the_cores(cores, expected):
    assert cpu_devices.default_cpu_devices(cores) == expected


def test_an_existing_count_in_xla_flags_is_kept(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=16 --xla_foo=1")
    monkeypatch.setenv(cpu_devices.ENV_OVERRIDE, "4")
    assert cpu_devices.split_cpu_into_devices() is None
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=16 --xla_foo=1"


def test_env_override_and_other_flags_survive(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
    monkeypatch.setenv(cpu_devices.ENV_OVERRIDE, "4")
    assert cpu_devices.split_cpu_into_devices() == 4
    assert os.environ["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv(cpu_devices.ENV_OVERRIDE, "1")  # 1 = XLA's single CPU device
    assert cpu_devices.split_cpu_into_devices() is None and os.environ["XLA_FLAGS"] == ""


@pytest.mark.parametrize("raw", ["two", "0"])
def test_bad_override_names_the_variable(monkeypatch, raw):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv(cpu_devices.ENV_OVERRIDE, raw)
    with pytest.raises(ValueError, match=f"{cpu_devices.ENV_OVERRIDE}='{raw}'"):
        cpu_devices.split_cpu_into_devices()


def test_jax_sees_the_devices_in_a_fresh_process():
    code = ("from llmcxr_jax.parallel.cpu_devices import split_cpu_into_devices; "
            "n = split_cpu_into_devices(); import jax; print(n, jax.device_count())")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update({cpu_devices.ENV_OVERRIDE: "3", "JAX_PLATFORMS": "cpu"})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, check=True,
                         cwd=pathlib.Path(__file__).resolve().parents[1]).stdout.split()
    assert out == ["3", "3"]
