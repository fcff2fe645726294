"""Throughput: samples/s, steps/s, step time, time spent waiting for data, peak accelerator memory and model FLOPs
utilisation, over the window between two records."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from accelengine.callbacks.base import Callback
from accelengine.callbacks.lr_monitor import log_step_due

if TYPE_CHECKING:
    from accelengine.engine import Engine

# Dense bf16/fp16 peak FLOP/s per device (vendor datasheets, without sparsity), for MFU when `peak_flops` is unset.
PEAK_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 70e12,
    "V100": 125e12,
    "T4": 65e12,
}


def batch_size(batch: Any) -> int:
    """Samples in a batch: the leading size of its first tensor (batches are tensors, pairs or dicts of them)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, Mapping):
        batch = next(iter(batch.values()), None)
        return batch_size(batch) if batch is not None else 0
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size(batch[0])
    return 0


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class ThroughputMonitor(Callback):
    """Adds `perf/*` values to the training record every `every_n_steps` optimizer steps (default `log_every`):

    - `perf/samples_per_s`, `perf/steps_per_s` (all processes together), `perf/step_time_s` (wall time per
      optimizer step, data loading included; averaged over the window, which is accurate on asynchronous
      accelerators because a log step synchronises),
    - `perf/data_wait_frac`: the share of that time between the end of one step and the start of the next: waiting
      for the next batch, and the `after_fit_step` work of callbacks after this one (the checkpointer's saves among
      them; no clock is read there, to keep the step free of hooks). Without saves in the window, high means the
      loader is the bottleneck: raise `num_workers`,
    - `perf/peak_mem_gb`: peak memory allocated on the accelerator during the window (CUDA/XPU; MPS: the driver's
      current total); the run's peak goes to the summary,
    - `perf/mfu`: model FLOPs utilisation, when `flops_per_sample` is given (forward + backward FLOPs of one
      training sample, e.g. 6 x parameters x tokens for a transformer) and the device's peak is known or given.

    Only host clocks are read per step; evaluation time is left out of the windows.
    """

    def __init__(
        self, every_n_steps: int | None = None, flops_per_sample: float | None = None, peak_flops: float | None = None
    ) -> None:
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"ThroughputMonitor: every_n_steps must be at least 1, got {every_n_steps}")
        self.every = every_n_steps
        self.flops_per_sample = flops_per_sample
        self.peak_flops = peak_flops
        self._reset_window()
        self._last_end: float | None = None
        self.totals: dict[str, float] = {"samples": 0, "steps": 0, "time_s": 0.0}

    def _reset_window(self) -> None:
        self._t0 = time.perf_counter()
        self._samples = 0
        self._steps = 0
        self._wait = 0.0

    def before_fit(self, engine: Engine) -> None:
        self._reset_window()
        self._last_end = self._t0
        if self.peak_flops is None:
            self.peak_flops = device_peak_flops(engine.accelerator.device)
        _reset_peak_memory(engine.accelerator.device)

    def before_fit_step(self, engine: Engine) -> None:
        now = time.perf_counter()
        if self._last_end is not None:
            self._wait += now - self._last_end  # from the end of the last step to this batch: the data loader
        self._samples += batch_size(engine.state.batch)

    def fit_step(self, engine: Engine) -> None:
        # the engine's step is done and its log record not made yet: close the window here
        self._last_end = time.perf_counter()
        if not engine.state.optimizer_stepped:
            return
        self._steps += 1
        if log_step_due(engine, self.every):
            engine.log_next(self.measure(engine, self._last_end))
            self._reset_window()
            self._last_end = self._t0

    def on_log(self, engine: Engine, record: dict[str, Any]) -> None:
        # A training record comes after the log step's synchronisation: the time spent waiting there is the
        # accelerator finishing queued steps (part of the window), not the data loader.
        if self._last_end is not None and "train/loss" in record:
            self._last_end = time.perf_counter()

    def before_eval(self, engine: Engine) -> None:
        self._eval_start = time.perf_counter()

    def after_eval(self, engine: Engine) -> None:
        # An evaluation in the middle of a window is not training time: shift the window past it.
        now = time.perf_counter()
        self._t0 += now - self._eval_start
        if self._last_end is not None:
            self._last_end = now

    def measure(self, engine: Engine, now: float) -> dict[str, float]:
        elapsed = max(now - self._t0, 1e-9)
        world = engine.accelerator.num_processes
        samples_per_s = self._samples * world / elapsed
        values = {
            "perf/samples_per_s": samples_per_s,
            "perf/steps_per_s": self._steps / elapsed,
            "perf/step_time_s": elapsed / max(self._steps, 1),
            "perf/data_wait_frac": min(self._wait / elapsed, 1.0),
        }
        peak = _peak_memory_gb(engine.accelerator.device)
        if peak is not None:
            values["perf/peak_mem_gb"] = peak
            self.totals["peak_mem_gb"] = max(self.totals.get("peak_mem_gb", 0.0), peak)
            _reset_peak_memory(engine.accelerator.device)
        if self.flops_per_sample and self.peak_flops:
            values["perf/mfu"] = self.flops_per_sample * samples_per_s / (self.peak_flops * world)
        self.totals["samples"] += self._samples * world
        self.totals["steps"] += self._steps
        self.totals["time_s"] += elapsed
        t = self.totals
        engine.summary_extras["throughput"] = {
            "samples_per_s": round(t["samples"] / t["time_s"], 3) if t["time_s"] else None,
            "steps_per_s": round(t["steps"] / t["time_s"], 3) if t["time_s"] else None,
            "peak_mem_gb": t.get("peak_mem_gb"),
        }
        return values


def _peak_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "xpu" and hasattr(torch, "xpu"):
        return torch.xpu.max_memory_allocated(device) / 2**30
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**30  # MPS has no peak counter: the current driver total
    return None


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "xpu" and hasattr(torch, "xpu"):
        torch.xpu.reset_peak_memory_stats(device)
