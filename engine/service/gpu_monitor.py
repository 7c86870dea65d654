"""GPU sampling through NVML (nvidia-ml-py, `import pynvml`), published on the bus as ("gpu", GpuSample).

`GpuMonitor.sample()` never raises: without NVML or a GPU it returns `available=False` and says
why. Each NVML query is guarded on its own, so a field the device does not support (utilization on
a MIG slice, power on some boards) becomes None while the others are filled. NVML is initialized
once per monitor (by `prepare()` or the first sample) and shut down by `close()`/`stop()`.

Device numbering: `device_index` is NVML's index, which ignores CUDA_VISIBLE_DEVICES; torch's
numbers are relative to it. `torch_device` picks the torch device for the torch_* fields (default:
torch's current device). Those fields are filled only when this process has already imported
torch and initialized CUDA; the monitor never imports torch or initializes CUDA itself.
"""
from __future__ import annotations

import asyncio
import dataclasses
import importlib
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

T = TypeVar("T")
PublishFn = Callable[[str, Any], None]


@dataclass(slots=True)
class GpuSample:
    """One reading of one GPU. Bytes for memory, watts, degrees C, MHz, percent for utilization."""

    time: float
    available: bool
    reason: str | None = None  # why the sample is unavailable (None when available)
    device_index: int = 0
    name: str | None = None
    memory_used: int | None = None  # NVML's `used`; with the v2 query it excludes `memory_reserved`
    memory_total: int | None = None
    memory_reserved: int | None = None  # driver/firmware reservation; None when only v1 is available
    utilization_gpu: int | None = None  # % of time a kernel was running over the last sample period
    utilization_memory: int | None = None  # % of time device memory was read or written
    power_w: float | None = None
    power_limit_w: float | None = None
    temperature_c: int | None = None
    sm_clock_mhz: int | None = None
    mem_clock_mhz: int | None = None
    torch_allocated: int | None = None  # torch.cuda.memory_allocated: live tensors
    torch_reserved: int | None = None  # torch.cuda.memory_reserved: held by torch's caching allocator
    kv_pool_bytes: int = 0  # the engine's paged KV pool, as told to the monitor

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _guard(fn: Callable[[], T]) -> T | None:
    """fn(), or None if it raises (an NVML error such as NOT_SUPPORTED, or anything else)."""
    try:
        return fn()
    except Exception:
        return None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class GpuMonitor:
    """Samples one GPU with NVML; `sample()` on demand, or a loop that publishes ("gpu", sample)
    every `interval_s` (`await run(publish)` on an asyncio loop, or `start(publish)`/`stop()` on a
    thread). `kv_pool_bytes` may be updated at any time (e.g. once the KV pool is allocated).

    `clock` gives GpuSample.time; pass the engine's clock (seconds since engine start) to line the
    samples up with the iteration records. Default: time.monotonic.
    """

    def __init__(
        self,
        device_index: int = 0,
        interval_s: float = 1.0,
        kv_pool_bytes: int = 0,
        *,
        torch_device: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0 seconds, got {interval_s!r}")
        if device_index < 0:
            raise ValueError(f"device_index must be >= 0, got {device_index!r}")
        self.device_index = device_index
        self.interval_s = interval_s
        self.kv_pool_bytes = kv_pool_bytes
        self.torch_device = torch_device
        self.clock = clock
        self.publish_errors = 0
        self._nvml: ModuleType | None = None
        self._handle: Any = None
        self._init_error: str | None = None
        self._initialized = False  # nvmlInit succeeded and needs a matching nvmlShutdown
        self._memory_v2: bool | None = None  # None: not tried yet
        self._prepared = False  # prepare() has read NVML once since the last close()
        self._lock = threading.Lock()  # sample() from a thread and from the caller
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # -- NVML lifecycle -------------------------------------------------------------------------
    def _ensure_nvml(self) -> str | None:
        """Initialize NVML and get the handle once; returns why not, or None when ready."""
        if self._handle is not None or self._init_error is not None:
            return self._init_error
        try:
            nvml = importlib.import_module("pynvml")
        except Exception as exc:
            self._init_error = f"nvidia-ml-py (pynvml) cannot be imported: {_describe(exc)}"
            return self._init_error
        try:
            nvml.nvmlInit()
        except Exception as exc:
            self._init_error = f"NVML unavailable (no NVIDIA driver or GPU?): {_describe(exc)}"
            return self._init_error
        self._nvml = nvml
        self._initialized = True
        try:
            self._handle = nvml.nvmlDeviceGetHandleByIndex(self.device_index)
        except Exception as exc:
            count = _guard(nvml.nvmlDeviceGetCount)
            self._init_error = (
                f"no GPU at NVML index {self.device_index} ({count if count is not None else '?'} GPU(s) seen): "
                f"{_describe(exc)}"
            )
            return self._init_error
        return None

    def close(self) -> None:
        """Shut NVML down if this monitor initialized it; a later sample() initializes it again."""
        with self._lock:
            if self._initialized and self._nvml is not None:
                _guard(self._nvml.nvmlShutdown)
            self._nvml = None
            self._handle = None
            self._init_error = None
            self._initialized = False
            self._memory_v2 = None
            self._prepared = False

    # -- sampling -------------------------------------------------------------------------------
    def sample(self) -> GpuSample:
        """Read the GPU now. Never raises; unsupported fields are None."""
        with self._lock:
            now = self.clock()
            try:
                reason = self._ensure_nvml()
                if reason is not None:
                    return GpuSample(now, False, reason, self.device_index, kv_pool_bytes=self.kv_pool_bytes)
                return self._read(now)
            except Exception as exc:  # belt and braces: sample() is documented never to raise
                return GpuSample(now, False, f"sampling failed: {_describe(exc)}", self.device_index,
                                 kv_pool_bytes=self.kv_pool_bytes)

    def _read(self, now: float) -> GpuSample:
        nvml, handle = self._nvml, self._handle
        assert nvml is not None
        s = GpuSample(now, True, None, self.device_index, kv_pool_bytes=self.kv_pool_bytes)
        name = _guard(lambda: nvml.nvmlDeviceGetName(handle))
        s.name = name.decode(errors="replace") if isinstance(name, bytes) else name
        mem = self._memory_info(nvml, handle)
        if mem is not None:
            s.memory_used = _guard(lambda: int(mem.used))
            s.memory_total = _guard(lambda: int(mem.total))
            s.memory_reserved = _guard(lambda: int(mem.reserved)) if self._memory_v2 else None
        util = _guard(lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
        if util is not None:
            s.utilization_gpu = _guard(lambda: int(util.gpu))
            s.utilization_memory = _guard(lambda: int(util.memory))
        s.power_w = _guard(lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
        limit_mw = _guard(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle))
        if limit_mw is None:
            limit_mw = _guard(lambda: nvml.nvmlDeviceGetPowerManagementLimit(handle))
        s.power_limit_w = limit_mw / 1000.0 if limit_mw is not None else None
        s.temperature_c = _guard(lambda: int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)))
        s.sm_clock_mhz = _guard(lambda: int(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)))
        s.mem_clock_mhz = _guard(lambda: int(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM)))
        s.torch_allocated, s.torch_reserved = self._torch_memory()
        return s

    def _memory_info(self, nvml: ModuleType, handle: Any) -> Any:
        """The v2 memory struct (with `reserved`) where the driver has it, else v1; the choice is
        made once per NVML session."""
        if self._memory_v2 is not False and hasattr(nvml, "nvmlMemory_v2"):
            try:
                mem = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
                self._memory_v2 = True
                return mem
            except Exception:  # old driver (function not found) or version mismatch
                if self._memory_v2 is None:
                    self._memory_v2 = False
                else:  # v2 worked before: a transient failure, not a missing feature
                    return None
        self._memory_v2 = False
        return _guard(lambda: nvml.nvmlDeviceGetMemoryInfo(handle))

    def _torch_memory(self) -> tuple[int | None, int | None]:
        torch = sys.modules.get("torch")  # never import torch (slow) or initialize CUDA from here
        if torch is None:
            return None, None
        try:
            if not torch.cuda.is_initialized():
                return None, None
            device = self.torch_device if self.torch_device is not None else torch.cuda.current_device()
        except Exception:
            return None, None
        return (
            _guard(lambda: int(torch.cuda.memory_allocated(device))),
            _guard(lambda: int(torch.cuda.memory_reserved(device))),
        )

    # -- publishing loops -----------------------------------------------------------------------
    def _publish(self, publish: PublishFn, sample: GpuSample) -> None:
        try:
            publish("gpu", sample)
        except Exception:
            self.publish_errors += 1

    def prepare(self) -> None:
        """Set NVML up and read every field once, unpublished, if not done since the last `close()`.
        Both are slow (importing pynvml holds the interpreter lock; nvmlInit and the first queries
        took 16 ms on an H200 host): a caller that starts a workload right after starting the monitor
        calls this first, so that cost does not land on the workload's first iterations. `start()`
        and `run()` call it too. An NVML failure is kept and reported by every sample."""
        if not self._prepared:
            self.sample()
            self._prepared = True

    async def run(self, publish: PublishFn) -> None:
        """Publish ("gpu", sample) every interval_s, the first one interval_s after `prepare()`, until
        cancelled; NVML is shut down on exit. Samples are taken in a worker thread so a slow NVML
        call never stalls the loop."""
        self.prepare()
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.interval_s
        try:
            while True:
                await asyncio.sleep(max(0.0, next_at - loop.time()))
                self._publish(publish, await asyncio.to_thread(self.sample))
                next_at = _next_tick(next_at, loop.time(), self.interval_s)
        finally:
            self.close()

    def start(self, publish: PublishFn) -> None:
        """Publish a sample from a daemon thread every interval_s, the first one interval_s after
        `prepare()` (called here, in the caller's thread), until `stop()`. Nothing is published before
        the thread's first tick, so a caller that restarts its engine's clock after `start()` (a
        replay) gets no sample stamped on the old clock."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("GpuMonitor is already running; call stop() first")
        self.prepare()
        self._stop.clear()
        self._thread = threading.Thread(target=self._thread_main, args=(publish,), name="gpu-monitor", daemon=True)
        self._thread.start()

    def _thread_main(self, publish: PublishFn) -> None:
        next_at = time.monotonic() + self.interval_s
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            self._publish(publish, self.sample())
            next_at = _next_tick(next_at, time.monotonic(), self.interval_s)

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the thread started by `start()` and shut NVML down."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.close()


def _next_tick(previous: float, now: float, interval: float) -> float:
    """The next time on the fixed grid previous + k*interval after `now` (skipping missed ticks),
    so the rate does not drift with the time a sample takes."""
    next_at = previous + interval
    if next_at <= now:
        next_at += ((now - next_at) // interval + 1) * interval
    return next_at
