"""The version guard every host patch runs first."""

import types

import pytest

from mlx_lm_dspark.hosts import guards
from mlx_lm_dspark.hosts import mlx_lm as patch_mlx_lm
from mlx_lm_dspark.hosts.guards import HostMismatchError


def _just_before(version: str) -> str:
    major, minor, patch = guards.release(version)
    return f"{major}.{minor}.{patch - 1}" if patch else f"{major}.{minor - 1}.99"


@pytest.mark.parametrize("host", sorted(guards.SUPPORTED))
def test_versions_outside_the_range_are_refused_loudly(host):
    low, high = guards.SUPPORTED[host]
    for version in (_just_before(low), high, f"{high}rc1", "99.0.0", "not-a-version"):
        with pytest.raises(HostMismatchError) as refused:
            guards.check_version(host, f"{host}'s module", version=version)
        message = str(refused.value)
        assert f"Installed {host} is {version}" in message
        assert guards.supported_range(host) in message
        assert "MLX_LM_DSPARK_DISABLE=1" in message


@pytest.mark.parametrize("host", sorted(guards.SUPPORTED))
def test_versions_inside_the_range_pass(host):
    low, high = guards.SUPPORTED[host]
    for version in (low, _just_before(high), f"{low}.post1"):
        guards.check_version(host, f"{host}'s module", version=version)


def test_release_numbers():
    assert guards.release("0.32.2") == (0, 32, 2)
    assert guards.release("0.33") == (0, 33, 0)
    assert guards.release("0.33.0rc1") == (0, 33, 0)  # a pre-release of 0.33 is outside <0.33
    assert guards.release("unknown") is None


def test_the_installed_mlx_lm_is_in_range():
    version = guards.installed_version("mlx-lm")
    assert guards.in_range("mlx-lm", version), (version, guards.supported_range("mlx-lm"))


def test_a_patch_refuses_an_unsupported_host_before_patching(monkeypatch):
    older = _just_before(guards.SUPPORTED["mlx-lm"][0])
    monkeypatch.setattr(guards, "installed_version", lambda host: older)
    utils = types.ModuleType("mlx_lm.utils_fake")
    stock = utils.load_model = lambda model_path, lazy=False, model_config=None: None
    with pytest.raises(HostMismatchError, match=rf"outside the supported range.*Installed mlx-lm is {older}.*"
                       r"MLX_LM_DSPARK_DISABLE=1"):
        patch_mlx_lm.patch_utils(utils)
    assert utils.load_model is stock  # nothing was patched
    assert not getattr(utils, "_mlx_lm_dspark_patched", False)
