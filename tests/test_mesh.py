"""Mesh flag parsing and start-up checks (8 simulated CPU devices, see conftest)."""

import jax
import pytest

from llmcxr_jax.parallel import mesh as mesh_lib


@pytest.mark.parametrize("flag,expected", [
    ("4x4", {"data": 4, "fsdp": 4, "tensor": 1}),
    ("2x4x2", {"data": 2, "fsdp": 4, "tensor": 2}),
    ("data:2,fsdp:4,tensor:2", {"data": 2, "fsdp": 4, "tensor": 2}),
    ("fsdp:-1,tensor:2", {"data": 1, "fsdp": 8, "tensor": 2}),
    ("-1x2", {"data": 8, "fsdp": 2, "tensor": 1}),
    ("16", {"data": 1, "fsdp": 16, "tensor": 1}),
    ("-1", {"data": 1, "fsdp": 16, "tensor": 1}),
])
def test_parse_mesh_forms(flag, expected):
    assert mesh_lib.parse_mesh(flag, 16) == expected


@pytest.mark.parametrize("flag,message", [
    ("4x4", "needs 16 devices but 8 are available"),
    ("data:2,pipeline:4", "unknown axis 'pipeline'"),
    ("-1x-1", "only one axis may be -1"),
    ("3x-1", "8 devices are not divisible by the 3"),
    ("2xfour", "'four' is not an integer"),
    ("0x8", "positive or -1"),
])
def test_parse_mesh_errors_name_the_numbers(flag, message):
    with pytest.raises(mesh_lib.MeshError, match=message):
        mesh_lib.parse_mesh(flag, 8)


def test_mesh_from_flag_builds_auto_axes_on_simulated_devices():
    assert len(jax.devices()) == 8
    mesh = mesh_lib.mesh_from_flag("2x4")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert mesh_lib.data_parallel_size(mesh) == 8


def test_indivisible_global_batch_names_both_numbers():
    mesh = mesh_lib.mesh_from_flag("2x4")
    mesh_lib.check_global_batch(16, mesh)
    with pytest.raises(mesh_lib.MeshError, match="global batch 12 is not divisible by the 8"):
        mesh_lib.check_global_batch(12, mesh)
