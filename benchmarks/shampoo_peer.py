"""A PyTorch peer's Shampoo/SOAP step time and state relative to AdamW, on issue #20's small recsys network.

The network is `benchmarks/shampoo_step_time.py`'s `recsys_small_model` written again in PyTorch: user and
item embedding tables (5,000 x 32 and 2,000 x 32, dense gradients), concatenation, Dense 256-128-1 with
ReLU, binary cross-entropy on logits, batch 512, 64 random batches held in memory. Each optimizer trains
its own copy (same seed); after a warm-up the optimizers are timed in interleaved rounds with rotating
order, each round a whole number of preconditioner periods, and the ratio reported is the median of
same-round ratios to AdamW (wall-clock and process CPU time), as in `shampoo_step_time.py`. Optimizer
state is the bytes of every tensor in `optimizer.state`.

Peers: `torch.optim.AdamW` (the reference), heavyball's `SOAP` (Vyas et al., 2024) and `KLShampoo`
(its Shampoo), preconditioner recomputation every 10 steps, eager (`--compile-mode none`; heavyball
normally fuses its elementwise kernels with `torch.compile`, whose autotuning took minutes here).

The peer lives in a benchmark-only virtual environment, never in the project's dependencies:

    python3.11 -m venv /work/wt/peer-venv
    /work/wt/peer-venv/bin/pip install torch==2.13.0 heavyball   # CPU build; heavyball 3.2.1 was measured
    /work/wt/peer-venv/bin/python benchmarks/shampoo_peer.py
    # ours on the same network, batch and machine, right after:
    .venv/bin/python benchmarks/shampoo_step_time.py --model __main__:recsys_small_model --jit off
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn


class RecsysSmall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.user = nn.Embedding(5000, 32)
        self.item = nn.Embedding(2000, 32)
        self.mlp = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 1))

    def forward(self, user, item):
        return self.mlp(torch.cat([self.user(user), self.item(item)], dim=-1)).squeeze(-1)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        stack = list(state.values()) if isinstance(state, dict) else [state]
        while stack:
            value = stack.pop()
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, (list, tuple)):
                stack.extend(value)
    return total


class TablesApart:
    """A peer optimizer on the network's Dense layers and AdamW on its embedding tables (as `Shampoo()`'s
    default `embedding_tables="grafted"` does), stepped together."""

    def __init__(self, parameters, make_peer):
        parameters = list(parameters)
        tables = [p for p in parameters if p.dim() == 2 and p.shape[0] in (5000, 2000) and p.shape[1] == 32]
        others = [p for p in parameters if all(p is not t for t in tables)]
        self.optimizers = [make_peer(others), torch.optim.AdamW(tables, lr=1e-3)]

    @property
    def state(self):
        return {key: value for optimizer in self.optimizers for key, value in optimizer.state.items()}

    def zero_grad(self, set_to_none=True):
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self):
        for optimizer in self.optimizers:
            optimizer.step()


def make_optimizers(period: int):
    import heavyball

    def soap(p):
        return heavyball.SOAP(p, lr=1e-3, precondition_frequency=period, compile_step=False)

    return {
        f"heavyball SOAP f={period}, tables on AdamW": (lambda p: TablesApart(p, soap), period),
        "adamw": (lambda p: torch.optim.AdamW(p, lr=1e-3), 1),
        f"heavyball SOAP f={period}": (
            lambda p: heavyball.SOAP(p, lr=1e-3, precondition_frequency=period, compile_step=False), period),
        f"heavyball KLShampoo f={period}": (
            lambda p: heavyball.KLShampoo(p, lr=1e-3, precondition_frequency=period, compile_step=False), period),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--period", type=int, default=10, help="preconditioner recomputation period")
    parser.add_argument("--compile-mode", default="none",
                        help="heavyball's torch.compile mode for its fused kernels: 'none' (eager, the default: "
                             "inductor's autotuning takes minutes on a loaded CPU) or e.g. 'default'")
    args = parser.parse_args()
    import heavyball
    import heavyball.utils

    heavyball.utils.compile_mode = None if args.compile_mode == "none" else args.compile_mode
    heavyball.utils.compile_mode_recommended_to_none = heavyball.utils.compile_mode

    print(f"PyTorch {torch.__version__}, heavyball {getattr(heavyball, '__version__', '?')}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randint(0, 5000, (args.batch_size,), generator=generator),
         torch.randint(0, 2000, (args.batch_size,), generator=generator),
         torch.randint(0, 2, (args.batch_size,), generator=generator).float())
        for _ in range(64)
    ]
    loss_fn = nn.BCEWithLogitsLoss()
    entries = {}
    for name, (make, period) in make_optimizers(args.period).items():
        torch.manual_seed(0)
        model = RecsysSmall()
        optimizer = make(model.parameters())
        entries[name] = dict(model=model, optimizer=optimizer, period=period, position=0)

    def train(entry, steps):
        model, optimizer = entry["model"], entry["optimizer"]
        for _ in range(steps):
            user, item, label = batches[entry["position"] % len(batches)]
            entry["position"] += 1
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(user, item), label).backward()
            optimizer.step()

    for name, entry in entries.items():
        started = time.perf_counter()
        train(entry, args.warmup_steps)
        print(f"  warmed up {name} in {time.perf_counter() - started:.1f} s", flush=True)
    names = list(entries)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for round_index in range(args.rounds):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            entry = entries[name]
            steps = max(entry["period"], args.steps)
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            train(entry, steps)
            wall[name].append((time.perf_counter() - start_wall) / steps * 1e3)
            cpu[name].append((time.process_time() - start_cpu) / steps * 1e3)
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    adam_memory = state_bytes(entries["adamw"]["optimizer"])
    print("| optimizer | step (ms, wall) | vs AdamW (wall) | vs AdamW (CPU time) | optimizer state (MB) "
          "| state vs AdamW |")
    print("|---|---|---|---|---|---|")
    for name in names:
        memory = state_bytes(entries[name]["optimizer"])
        wall_ratio = statistics.median(w / a for w, a in zip(wall[name], wall["adamw"], strict=True))
        cpu_ratio = statistics.median(c / a for c, a in zip(cpu[name], cpu["adamw"], strict=True))
        print(f"| {name} | {statistics.median(wall[name]):.2f} | {wall_ratio:.2f}x | {cpu_ratio:.2f}x "
              f"| {memory / 2**20:.2f} | {memory / adam_memory:.2f}x |")


if __name__ == "__main__":
    main()
