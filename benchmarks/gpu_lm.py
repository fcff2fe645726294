"""Tokens per second of a ~100M-parameter transformer language model in bf16: the engine against a hand-written
loop, and a check that the engine makes no host-device synchronisation between its log steps.

    python benchmarks/gpu_lm.py --json                   # on a CUDA device: the GPU target of the performance issue
    python benchmarks/gpu_lm.py --tiny --json            # a few seconds on a CPU: the script itself still works

The model is a decoder-only transformer built from `torch.nn` (token embedding tied to the output head, learned
positions, pre-norm `TransformerEncoderLayer`s with a causal mask): 12 layers, width 768, 12 heads, vocabulary
32,000, sequences of 512 — about 110M parameters. The data are random tokens (nothing is downloaded), 16 sequences
per batch, from pinned host memory. Both contestants use AdamW, bf16 autocast and the same loader;
they alternate for `--rounds` rounds and each figure is the median (`*_paired`: the median of each round's ratio).

The synchronisation check (CUDA only): between two log steps the engine runs under
`torch.cuda.set_sync_debug_mode("error")`, so any operation that waits for the device (a `.item()`, a blocking
copy, a `nonzero`) raises; `sync_free_steps` counts the steps that ran that way. The log steps themselves read the
losses back once, outside the check.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from accelengine.data import make_loader

LOG_EVERY = 50


class TinyGPT(nn.Module):
    """Decoder-only LM: embeddings, `layers` pre-norm transformer blocks with a causal mask, tied output head."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        x = self.tokens(ids) + self.positions.weight[:length]
        x = self.blocks(x, mask=self.mask[:length, :length], is_causal=True)
        return self.norm(x) @ self.tokens.weight.T  # logits, the head tied to the embedding


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def make_workload(tiny: bool, seed: int = 0) -> tuple[TensorDataset, Any, dict[str, int]]:
    shape = (
        dict(vocab=512, width=64, layers=2, heads=4, context=32, batch=4, batches=8)
        if tiny
        else dict(vocab=32_000, width=768, layers=12, heads=12, context=512, batch=16, batches=64)
    )
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, shape["vocab"], (shape["batch"] * shape["batches"], shape["context"] + 1), generator=g)
    data = TensorDataset(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())

    def model() -> TinyGPT:
        torch.manual_seed(seed)
        return TinyGPT(shape["vocab"], shape["width"], shape["layers"], shape["heads"], shape["context"])

    return data, model, shape


def optimizer(params: Any) -> torch.optim.Optimizer:
    # torch's default implementation (foreach on CUDA): the engine builds its optimizer before the model is moved
    return torch.optim.AdamW(params, lr=3e-4)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_hand_written(data, make_model, shape, device, steps: int, warmup: int) -> float:
    """Seconds per step of the plain loop: autocast to bf16, AdamW, the engine's loader, batches copied ahead."""
    model = make_model().to(device)
    opt = optimizer(model.parameters())
    loader = make_loader(data, batch_size=shape["batch"], shuffle=True, pin_memory=device.type == "cuda")
    done, start = 0, 0.0
    while done < steps + warmup:
        for ids, target in loader:
            if done == warmup:
                synchronize(device)
                start = time.perf_counter()
            ids, target = ids.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = lm_loss(model(ids), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            done += 1
            if done == steps + warmup:
                break
    synchronize(device)
    return (time.perf_counter() - start) / steps


def time_engine(data, make_model, shape, device, steps: int, warmup: int) -> tuple[float, int]:
    """Seconds per step of the engine (timed between two log steps, which end in a read-back), and the number of
    steps that ran under the CUDA sync check (0 on a CPU)."""
    from accelengine import Callback, DataConfig, Engine, TrainerConfig

    class Clock(Callback):
        def __init__(self) -> None:
            super().__init__()
            self.marks: list[tuple[int, float]] = []
            self.checked = 0

        def fit_step(self, engine) -> None:  # before the step's log record: a log step reads back, outside the check
            if device.type == "cuda" and engine.state.step % LOG_EVERY == 0:
                torch.cuda.set_sync_debug_mode("default")

        def on_log(self, engine, record) -> None:
            if "train/loss" in record and engine.state.step >= warmup:
                self.marks.append((engine.state.step, time.perf_counter()))

        def after_fit_step(self, engine) -> None:  # from here to the next log step, any synchronisation raises
            if device.type == "cuda" and engine.state.step >= LOG_EVERY:
                torch.cuda.set_sync_debug_mode("error")
                self.checked += 1

        def after_fit(self, engine) -> None:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")

    clock = Clock()
    start = -(-warmup // LOG_EVERY) * LOG_EVERY
    engine = Engine(
        model=make_model(),
        data={"train": data},
        loss=lm_loss,
        optimizer=optimizer,
        callbacks=[clock],
        config=TrainerConfig(
            steps=start + -(-steps // LOG_EVERY) * LOG_EVERY,
            log_every=LOG_EVERY,
            mixed_precision="bf16",
            device="cpu" if device.type == "cpu" else "auto",
        ),
        data_config=DataConfig(batch_size=shape["batch"], pin_memory=device.type == "cuda"),
    )
    with contextlib.redirect_stdout(io.StringIO()):
        summary = engine.fit()
    if summary["status"] != "completed":
        raise RuntimeError(f"the engine run ended {summary['status']}: {summary['stop_reason']}")
    (first_step, first), (last_step, last) = clock.marks[0], clock.marks[-1]
    return (last - first) / (last_step - first_step), clock.checked


def measure(tiny: bool = False, steps: int = 100, warmup: int = 50, rounds: int = 3) -> dict[str, Any]:
    logging.getLogger("accelengine").disabled = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    data, make_model, shape = make_workload(tiny)
    tokens_per_step = shape["batch"] * shape["context"]
    runs: dict[str, list[float]] = {"hand_written": [], "engine": []}
    checked = 0
    for r in range(rounds):
        order = ["hand_written", "engine"] if r % 2 == 0 else ["engine", "hand_written"]
        for name in order:
            if name == "engine":
                seconds, checked_now = time_engine(data, make_model, shape, device, steps, warmup)
                checked += checked_now
            else:
                seconds = time_hand_written(data, make_model, shape, device, steps, warmup)
            runs[name].append(seconds)
    params = sum(p.numel() for p in make_model().parameters())
    result: dict[str, Any] = {
        f"{name}_tokens_per_s": round(tokens_per_step / statistics.median(v)) for name, v in runs.items()
    }
    result["engine_vs_hand_written"] = round(result["engine_tokens_per_s"] / result["hand_written_tokens_per_s"], 4)
    result["engine_vs_hand_written_paired"] = round(
        statistics.median(h / e for h, e in zip(runs["hand_written"], runs["engine"], strict=True)), 4
    )
    result.update(
        sync_free_steps=checked,
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        params=params,
        tokens_per_step=tokens_per_step,
        steps=steps,
        warmup=warmup,
        rounds=rounds,
        tiny=tiny,
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a small model that runs in seconds on a CPU")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()
    result = measure(args.tiny, args.steps, args.warmup, args.rounds)
    print(json.dumps(result) if args.json else "\n".join(f"{k:>32}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
