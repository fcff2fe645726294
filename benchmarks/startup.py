"""Start-up costs: what `import accelengine` adds to `import torch, accelerate`, and how long the CLI takes from the
command to the first training step of the digits recipe. Each figure is the median of several fresh processes,
alternated so that drift hits every side alike.

    python benchmarks/startup.py [--rounds 7] [--cli-rounds 3] [--no-bare] [--json]

- `import_accelengine_s`: in a fresh process that has imported torch and accelerate, how long `import accelengine`
  then takes (target: at most 0.3 s). `import_accelengine_extra_s` cross-checks it from outside:
  `python -c "import torch, accelerate, accelengine"` minus `python -c "import torch, accelerate"` (noisier: it is
  the difference of two ~2 s process times).
- `cli_to_first_step_s`: from starting `python -m accelengine run recipes/digits.toml` to the end of its first
  optimizer step (a callback added to the recipe prints the time and ends the process there).
- `bare_to_first_step_s`, for scale: a hand-written script doing the same work without accelengine (import torch,
  load the digits through scikit-learn into a HuggingFace table, build the MLP and AdamW, one step). Most of the
  start-up is third-party imports that any such program pays: torch, scikit-learn, `datasets`, and `torch._dynamo`
  (imported by the first optimizer a process builds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

FIRST_STEP = """
import os, time
from accelengine import Callback

class FirstStep(Callback):
    def after_fit_step(self, engine):
        if engine.state.step == 1:
            print(f"FIRST_STEP {time.time()}", flush=True)
            os._exit(0)  # the figure ends here: no need to train on
"""

BARE = """
import time
import torch
import datasets
from sklearn.datasets import load_digits

bunch = load_digits()
table = datasets.Dataset.from_dict({"input": (bunch.data / 16.0).astype("float32"), "label": bunch.target})
table.set_format("torch")
loader = torch.utils.data.DataLoader(table, batch_size=32, shuffle=True)
model = torch.nn.Sequential(
    torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
)
opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
batch = next(iter(loader))
torch.nn.functional.cross_entropy(model(batch["input"]), batch["label"]).backward()
opt.step()
print(f"FIRST_STEP {time.time()}", flush=True)
"""


def _run(args: list[str], cwd: Path = ROOT) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], check=True, capture_output=True, cwd=cwd)
    return time.perf_counter() - start


def _first_step(args: list[str], cwd: Path) -> float:
    """Seconds from starting `python args...` to the FIRST_STEP time it prints."""
    start = time.time()
    out = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True, cwd=cwd).stdout
    return next(float(line.split()[1]) for line in out.splitlines() if line.startswith("FIRST_STEP")) - start


IMPORT_AFTER = (
    "import time, torch, accelerate; t = time.perf_counter(); import accelengine; "
    "print(f'IMPORT {time.perf_counter() - t}')"
)


def import_costs(rounds: int = 7) -> dict[str, float]:
    base, full, inside = [], [], []
    for _ in range(rounds):  # interleaved, so drift hits both alike
        base.append(_run(["-c", "import torch, accelerate"]))
        full.append(_run(["-c", "import torch, accelerate, accelengine"]))
        out = subprocess.run([sys.executable, "-c", IMPORT_AFTER], check=True, capture_output=True, text=True).stdout
        inside.append(float(out.split("IMPORT")[1]))
    b, f = statistics.median(base), statistics.median(full)
    return {
        "import_torch_accelerate_s": round(b, 3),
        "import_accelengine_s": round(statistics.median(inside), 3),
        "import_accelengine_extra_s": round(f - b, 3),
    }


def cli_to_first_step(rounds: int = 3, bare_too: bool = True) -> dict[str, float | None]:
    cli: list[float] = []
    bare: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "first_step.py").write_text(FIRST_STEP)
        (tmp / "bare.py").write_text(BARE)
        recipe = (ROOT / "recipes" / "digits.toml").read_text()
        (tmp / "digits.toml").write_text(recipe + '\n[[callbacks]]\n_component_ = "first_step.FirstStep"\n')
        for i in range(rounds):
            # the recipe's folder is importable for its components: `first_step.FirstStep` is found there
            run = ["-m", "accelengine", "run", str(tmp / "digits.toml"), "--out", str(tmp / f"r{i}")]
            cli.append(_first_step(run, cwd=ROOT))
            if bare_too:
                bare.append(_first_step([str(tmp / "bare.py")], cwd=tmp))
    return {
        "cli_to_first_step_s": round(statistics.median(cli), 3),
        "bare_to_first_step_s": round(statistics.median(bare), 3) if bare else None,
    }


def measure(rounds: int = 7, cli_rounds: int = 3, bare_too: bool = True) -> dict[str, Any]:
    figures = {**import_costs(rounds), **cli_to_first_step(cli_rounds, bare_too)}
    return {**figures, "rounds": rounds, "cli_rounds": cli_rounds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7, help="fresh processes per import figure")
    ap.add_argument("--cli-rounds", type=int, default=3, help="fresh processes per first-step figure")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare script (bare_to_first_step_s is null)")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()
    res = measure(args.rounds, args.cli_rounds, bare_too=not args.no_bare)
    print(json.dumps(res) if args.json else "\n".join(f"{k:>28}: {v}" for k, v in res.items()))


if __name__ == "__main__":
    main()
