"""engine/gpu_monitor.py: no-GPU behaviour, and a fake pynvml for the field mapping."""
from __future__ import annotations

import asyncio
import sys
import threading
import time
import types

import pytest

from batchdeck.engine.service.gpu_monitor import GpuMonitor, GpuSample

MiB = 1 << 20


class FakeNVMLError(Exception):
    pass


def make_fake_pynvml(*, v2: bool = True, unsupported: frozenset[str] = frozenset()) -> types.ModuleType:
    """A stand-in for nvidia-ml-py with known values. `unsupported` names functions that raise
    like NVML's NOT_SUPPORTED; `v2=False` makes nvmlDeviceGetMemoryInfo_v2 missing (old driver)."""
    m = types.ModuleType("pynvml")
    m.NVMLError = FakeNVMLError
    m.NVML_TEMPERATURE_GPU = 0
    m.NVML_CLOCK_SM = 1
    m.NVML_CLOCK_MEM = 2
    m.nvmlMemory_v2 = 0x02000028
    m.calls = {"init": 0, "shutdown": 0, "memory_versions": []}

    def guarded(name):
        def wrap(fn):
            def inner(*args, **kwargs):
                if name in unsupported:
                    raise FakeNVMLError("Not Supported")
                return fn(*args, **kwargs)
            setattr(m, name, inner)
            return inner
        return wrap

    @guarded("nvmlInit")
    def _init():
        m.calls["init"] += 1
        m.calls["init_thread"] = threading.current_thread().name

    @guarded("nvmlShutdown")
    def _shutdown():
        m.calls["shutdown"] += 1

    guarded("nvmlDeviceGetCount")(lambda: 1)

    @guarded("nvmlDeviceGetHandleByIndex")
    def _handle(i):
        if i != 0:
            raise FakeNVMLError("Invalid Argument")
        return "handle-0"

    @guarded("nvmlDeviceGetName")
    def _name(h):
        m.calls.setdefault("name_threads", []).append(threading.current_thread().name)
        return b"NVIDIA H100 80GB HBM3"

    @guarded("nvmlDeviceGetMemoryInfo")
    def _mem(h, version=None):
        m.calls["memory_versions"].append(version)
        if version is None:
            return types.SimpleNamespace(total=80_000 * MiB, free=30_000 * MiB, used=50_000 * MiB)
        if not v2:
            raise FakeNVMLError("Function Not Found")
        return types.SimpleNamespace(version=version, total=80_000 * MiB, reserved=500 * MiB,
                                     free=30_000 * MiB, used=49_500 * MiB)

    guarded("nvmlDeviceGetUtilizationRates")(lambda h: types.SimpleNamespace(gpu=87, memory=42))
    guarded("nvmlDeviceGetPowerUsage")(lambda h: 312_500)  # mW
    guarded("nvmlDeviceGetEnforcedPowerLimit")(lambda h: 700_000)
    guarded("nvmlDeviceGetPowerManagementLimit")(lambda h: 650_000)
    guarded("nvmlDeviceGetTemperature")(lambda h, sensor: 61)
    guarded("nvmlDeviceGetClockInfo")(lambda h, kind: {1: 1980, 2: 2619}[kind])
    return m


@pytest.fixture
def fake_nvml(monkeypatch):
    def install(**kwargs) -> types.ModuleType:
        fake = make_fake_pynvml(**kwargs)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake
    return install


def test_without_a_gpu_sample_is_unavailable_with_a_reason():
    """On this CPU-only machine (or any without NVML): no exception, a reason instead."""
    try:
        import pynvml
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVML")
    except Exception:
        pass
    mon = GpuMonitor(kv_pool_bytes=123)
    s = mon.sample()
    assert isinstance(s, GpuSample)
    assert s.available is False
    assert s.reason and "NVML" in s.reason
    assert s.memory_total is None and s.kv_pool_bytes == 123
    assert mon.sample().available is False  # stays quiet on repeated calls
    mon.stop()  # nothing to stop: must not raise


def test_fake_nvml_fills_every_field(fake_nvml):
    fake = fake_nvml()
    mon = GpuMonitor(device_index=0, kv_pool_bytes=4 * MiB, clock=lambda: 12.5)
    s = mon.sample()
    assert s.available and s.reason is None
    assert s.time == 12.5
    assert s.name == "NVIDIA H100 80GB HBM3"  # bytes decoded
    assert (s.memory_total, s.memory_used, s.memory_reserved) == (80_000 * MiB, 49_500 * MiB, 500 * MiB)
    assert (s.utilization_gpu, s.utilization_memory) == (87, 42)
    assert s.power_w == pytest.approx(312.5) and s.power_limit_w == pytest.approx(700.0)
    assert s.temperature_c == 61
    assert (s.sm_clock_mhz, s.mem_clock_mhz) == (1980, 2619)
    assert s.kv_pool_bytes == 4 * MiB
    assert fake.calls["memory_versions"] == [fake.nvmlMemory_v2]
    mon.sample()
    assert fake.calls["init"] == 1  # initialized once per monitor
    mon.stop()
    assert fake.calls["shutdown"] == 1
    assert s.to_dict()["memory_reserved"] == 500 * MiB


def test_memory_v2_falls_back_to_v1(fake_nvml):
    fake = fake_nvml(v2=False)
    mon = GpuMonitor()
    s = mon.sample()
    assert s.available
    assert (s.memory_total, s.memory_used) == (80_000 * MiB, 50_000 * MiB)
    assert s.memory_reserved is None
    mon.sample()
    # v2 tried once, then v1 only
    assert fake.calls["memory_versions"] == [fake.nvmlMemory_v2, None, None]


def test_unsupported_fields_become_none(fake_nvml):
    fake_nvml(unsupported=frozenset({"nvmlDeviceGetUtilizationRates", "nvmlDeviceGetPowerUsage",
                                     "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetClockInfo"}))
    s = GpuMonitor().sample()
    assert s.available
    assert s.utilization_gpu is None and s.utilization_memory is None
    assert s.power_w is None
    assert s.power_limit_w == pytest.approx(650.0)  # fell back to the management limit
    assert s.sm_clock_mhz is None and s.mem_clock_mhz is None
    assert s.temperature_c == 61 and s.memory_total == 80_000 * MiB  # the rest still filled


def test_bad_device_index_and_failed_init_are_reasons(fake_nvml):
    fake = fake_nvml()
    s = GpuMonitor(device_index=3).sample()
    assert not s.available and "index 3" in s.reason and "1 GPU" in s.reason
    fake_nvml(unsupported=frozenset({"nvmlInit"}))
    s = GpuMonitor().sample()
    assert not s.available and "NVML unavailable" in s.reason
    assert fake.calls["init"] == 1


def test_thread_loop_publishes_gpu_samples(fake_nvml):
    fake = fake_nvml()
    got: list[tuple[str, GpuSample]] = []
    enough = threading.Event()

    def publish(topic: str, sample: GpuSample) -> None:
        got.append((topic, sample))
        threads.append(threading.current_thread().name)
        if len(got) >= 3:
            enough.set()
        raise RuntimeError("a broken sink must not stop the sampler")

    threads: list[str] = []
    mon = GpuMonitor(interval_s=0.01)
    mon.start(publish)
    # NVML's set-up and a first reading of each field happen in start(), in the caller's thread;
    # every published sample comes from the sampling thread
    here = threading.current_thread().name
    assert fake.calls["init_thread"] == here and fake.calls["name_threads"][:1] == [here]
    assert enough.wait(30.0)
    mon.stop()
    assert all(topic == "gpu" and s.available for topic, s in got[:3]) and set(threads) == {"gpu-monitor"}
    assert mon.publish_errors >= 3
    assert fake.calls["shutdown"] == 1


async def test_async_run_publishes_and_shuts_down_on_cancel(fake_nvml):
    fake = fake_nvml()
    got: list[GpuSample] = []
    enough = asyncio.Event()

    def publish(topic: str, sample: GpuSample) -> None:
        got.append(sample)
        if len(got) >= 2:
            enough.set()

    mon = GpuMonitor(interval_s=0.01)
    mon.prepare()  # what headless and serve call before the workload starts
    here = threading.current_thread().name
    assert fake.calls["init_thread"] == here and fake.calls["name_threads"] == [here] and not got
    task = asyncio.create_task(mon.run(publish))
    await asyncio.wait_for(enough.wait(), 30.0)
    assert fake.calls["init"] == 1 and fake.calls["name_threads"][1] != here  # run() did not prepare again
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert fake.calls["shutdown"] == 1 and all(s.available for s in got)


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval_s"):
        GpuMonitor(interval_s=0)


async def test_run_reads_nvml_first_on_the_loop_and_publishes_one_interval_later(fake_nvml):
    fake = fake_nvml()
    got: list[GpuSample] = []
    mon = GpuMonitor(interval_s=30.0)
    task = asyncio.create_task(mon.run(lambda topic, sample: got.append(sample)))
    for _ in range(1000):  # the task's first step: prepare(), then the wait for the first tick
        if fake.calls["init"]:
            break
        await asyncio.sleep(0)
    assert fake.calls["init_thread"] == threading.current_thread().name and fake.calls["name_threads"]
    assert got == []  # nothing published before the first tick
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_run_publishes_its_first_sample_an_interval_after_it_starts(fake_nvml):
    fake_nvml()
    first = asyncio.get_running_loop().create_future()
    mon = GpuMonitor(interval_s=0.2)
    t0 = time.monotonic()
    task = asyncio.create_task(mon.run(lambda topic, s: first.done() or first.set_result(time.monotonic())))
    at = await asyncio.wait_for(first, 30.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert at - t0 >= 0.9 * mon.interval_s  # a slower machine only makes the gap longer


def test_thread_publishes_its_first_sample_an_interval_after_start(fake_nvml):
    fake_nvml()
    stamps: list[float] = []
    published = threading.Event()

    def publish(topic: str, sample: GpuSample) -> None:
        stamps.append(time.monotonic())
        published.set()

    mon = GpuMonitor(interval_s=0.2)
    t0 = time.monotonic()
    mon.start(publish)
    assert published.wait(30.0)
    mon.stop()
    assert stamps[0] - t0 >= 0.9 * mon.interval_s  # nothing before the first tick (a replay restarts its clock)
