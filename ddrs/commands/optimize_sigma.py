"""``ddrs optimize-sigma``: a sigma per input (the paper's Algorithm 1, ddrs_ext.optimize_sigma) for
``ddrs certify --sigma-file``. Its options and, in :func:`run`, its work (torch is imported only
there)."""

from __future__ import annotations

import argparse

from ddrs.docs_links import docs_epilog
from ddrs.noise_options import add_noise_option
from ddrs.options import FORMATS, HelpFormatter, add_model_and_data, count, set_command
from ddrs.sigma_options import OPTIMIZE_WHY, add_sigma_options, optimize_options

EXAMPLES = """
examples:
  ddrs optimize-sigma --checkpoint digits.pt --data digits --out sigma.tsv
  ddrs optimize-sigma --model mymodels:resnet110 --checkpoint ckpt.pth.tar \\
      --data cifar-10-batches-py --skip 20 --paper --out sigma_paper.tsv
  ddrs certify --model mymodels:resnet110 --checkpoint ckpt.pth.tar --data cifar-10-batches-py \\
      --skip 20 --sigma-file sigma_paper.tsv --memory --out certify_paper.tsv
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "optimize-sigma",
        help="optimise a sigma per input (the paper's Algorithm 1) for 'ddrs certify --sigma-file'",
        description="Chooses a sigma per input of --data by maximising a surrogate of its certified "
        "radius (ddrs_ext.optimize_sigma)\nand writes one row per input. The 'surrogate' column is the "
        "paper's surrogate radius sigma/2 (Phi^-1(E_A) - Phi^-1(E_B))\nat the final sigma, estimated by "
        "ddrs_ext.surrogate_radius from --surrogate-samples fresh noise samples.",
        epilog=FORMATS + "\n" + OPTIMIZE_WHY + EXAMPLES + docs_epilog("data-dependent-sigma", "memory", "l1"),
        formatter_class=HelpFormatter,
    )
    add_model_and_data(p)
    add_sigma_options(p, "sigma optimisation")
    p.add_argument(
        "--surrogate-samples", type=count, default=1000, help="noise samples for the 'surrogate' column"
    )
    set_command(p, run="ddrs.commands.optimize_sigma:run", check=check, resumable=True)
    add_noise_option(p)


def check(args: argparse.Namespace) -> None:
    """Resolves the sigma optimisation's settings (``args.optimize_options``)."""
    args.optimize_options = optimize_options(args)


def run(args: argparse.Namespace) -> int:
    """``ddrs optimize-sigma``: one row per selected input (under torchrun, shared out over the processes)."""
    from ddrs import distributed_run

    return distributed_run.command(_optimize)(args)


def _optimize(args: argparse.Namespace) -> int:
    import torch

    from ddrs.job import Job, open_results, run_chunks
    from ddrs.noise_settings import check_resumed_noise, noise_settings, note_checkpoint_noise
    from ddrs.results import SIGMA_COLUMNS
    from ddrs_ext.sigma import optimize_sigma, optimize_theta, surrogate_radius

    options = args.optimize_options
    uniform = args.noise == "uniform"
    check_resumed_noise(args)
    job = Job(args)
    note_checkpoint_noise(args, job.note)
    settings = {
        "command": "optimize-sigma",
        **job.settings,
        "sigma0": args.sigma0,
        **noise_settings(args),
        **options,
        "surrogate_samples": args.surrogate_samples,
    }
    with open_results(args, job, SIGMA_COLUMNS, settings) as out:

        def work(index: torch.Tensor) -> list[dict]:
            x = job.inputs(index.tolist())
            sigma = (optimize_theta if uniform else optimize_sigma)(
                job.model, x, args.sigma0, **options, batch_size=args.batch_size, seed=args.seed, index=index
            )
            surrogate = surrogate_radius(
                job.model,
                x,
                sigma,
                num_samples=args.surrogate_samples,
                clip=options.get("clip"),
                noise=args.noise,
                probabilities=options["probabilities"],
                batch_size=args.batch_size,
                seed=args.seed,
                index=index,
            )
            return [
                {"idx": i, "label": job.labels[i], "sigma": float(sigma[k]), "surrogate": float(surrogate[k])}
                for k, i in enumerate(index.tolist())
            ]

        run_chunks(args, job, out, options["num_samples"], work)
        rows = [out.done[i] for i in job.selected if i in out.done]
        if rows:
            mean_sigma = sum(r["sigma"] for r in rows) / len(rows)
            mean_surrogate = sum(r["surrogate"] for r in rows) / len(rows)
            print(
                f"{args.out}: {len(rows)} inputs, mean sigma {mean_sigma:.4f}, "
                f"mean surrogate {mean_surrogate:.4f}"
            )
    return 0
