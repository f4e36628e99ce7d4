"""Certify digits inputs over the ranks of a process group with ddrs_ext.distributed, and time it.

    python examples/distributed_certify.py                            # one process
    torchrun --nproc-per-node 2 examples/distributed_certify.py       # two processes, gloo on the CPU
    torchrun --nproc-per-node 4 examples/distributed_certify.py --device cuda   # one GPU per rank, NCCL

Every rank prints nothing but rank 0, which prints the wall time and a digest of the whole result:
the digest is the same whatever the number of processes (the noise of each input is keyed by its
index). The model is the digits CNN with fixed random weights: this measures speed, not accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from datetime import timedelta

import ddrs_ext  # before torch: then its OpenMP threads wait passively (docs/benchmarks.md)

# isort: split
import torch
import torch.distributed as dist

from ddrs_ext.data import load_digits_split
from ddrs_ext.models import digits_cnn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=32, help="test inputs to certify")
    p.add_argument("--samples", type=int, default=20_000, help="n, the estimation samples per input")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda: one device per local rank)")
    args = p.parse_args()

    launched = "RANK" in os.environ  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK
    device = torch.device(args.device)
    if launched:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    rank, world = ddrs_ext.distributed.rank_and_world_size()

    torch.manual_seed(0)
    model = digits_cnn().to(device).eval()
    _, (x, _) = load_digits_split(seed=0)
    x = x[: args.count]

    if launched:
        dist.barrier()
    start = time.perf_counter()
    result = ddrs_ext.distributed.certify(
        model, x, 0.25, n0=100, n=args.samples, alpha=0.001, batch_size=args.batch_size, seed=1, device=device
    )
    seconds = time.perf_counter() - start
    if rank == 0:
        digest = hashlib.sha256()
        for name in ("prediction", "radius", "p_lower", "counts"):
            digest.update(getattr(result, name).numpy().tobytes())
        print(
            f"{world} process(es) x {torch.get_num_threads()} thread(s): {args.count} inputs, "
            f"n={args.samples}: {seconds:.2f} s ({seconds / args.count:.3f} s/input); "
            f"result digest {digest.hexdigest()[:16]}"
        )
    if launched:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
