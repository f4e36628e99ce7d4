"""``ddrs predict``: the smoothed classifier's prediction per input (Cohen et al.'s PREDICT), or an
abstention. Its options and, in :func:`run`, its work (torch is imported only there)."""

from __future__ import annotations

import argparse

from ddrs.docs_links import docs_epilog
from ddrs.noise_options import add_noise_option
from ddrs.options import (
    FORMATS,
    HelpFormatter,
    add_model_and_data,
    count,
    probability,
    set_command,
)
from ddrs.sigma_options import add_sigma_choice

EXAMPLES = """
examples:
  ddrs predict --checkpoint digits.pt --data digits --sigma 0.25 --out digits_predict.tsv
  ddrs predict --model mymodels:resnet110 --checkpoint ckpt.pth.tar --data cifar-10-batches-py \\
      --sigma 0.25 --skip 20 --N 100000 --out cifar_predict.tsv
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="the smoothed classifier's prediction per input (Cohen et al.'s PREDICT), or an abstention",
        description="Predicts the class of every input of --data with the smoothed version of --model "
        "(Cohen et al.'s PREDICT:\nthe top class among n noisy copies, or an abstention (-1) when a "
        "binomial test of the top two counts\ncannot tell them apart at level alpha; a returned class is "
        "wrong with probability at most alpha).",
        epilog=FORMATS + EXAMPLES + docs_epilog("certify-your-model", "coming-from-cohen"),
        formatter_class=HelpFormatter,
    )
    add_model_and_data(p)
    add_sigma_choice(p, optimize=False)
    g = p.add_argument_group("prediction")
    g.add_argument("--n", "--N", type=count, default=100_000, help="noisy copies per input")
    g.add_argument("--alpha", type=probability, default=0.001, help="failure probability")
    set_command(p, run="ddrs.commands.predict:run", check=None, resumable=True)
    add_noise_option(p)


def run(args: argparse.Namespace) -> int:
    """``ddrs predict``: one row per selected input (under torchrun, shared out over the processes)."""
    from ddrs import distributed_run

    return distributed_run.command(_predict)(args)


def _predict(args: argparse.Namespace) -> int:
    import torch

    from ddrs.input_sigma import Sigma
    from ddrs.job import Job, open_results, run_chunks
    from ddrs.noise_settings import (
        check_resumed_noise,
        check_sigma_file_noise,
        noise_settings,
        note_checkpoint_noise,
    )
    from ddrs.results import PREDICT_COLUMNS
    from ddrs_ext.certification import ABSTAIN, predict

    check_resumed_noise(args)
    check_sigma_file_noise(args)
    job = Job(args)
    note_checkpoint_noise(args, job.note)
    sigma_of = Sigma(args, job)
    settings = {
        "command": "predict",
        **job.settings,
        "sigma": sigma_of.setting,
        **noise_settings(args),
        "n": args.n,
        "alpha": args.alpha,
    }
    with open_results(args, job, PREDICT_COLUMNS, settings) as out:

        def work(index: torch.Tensor) -> list[dict]:
            x = job.inputs(index.tolist())
            sigma = sigma_of(x, index)
            prediction = predict(
                job.model,
                x,
                sigma,
                n=args.n,
                alpha=args.alpha,
                batch_size=args.batch_size,
                num_classes=job.num_classes,
                seed=args.seed,
                index=index,
                noise=args.noise,
            )
            sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(len(index))
            rows = []
            for k, i in enumerate(index.tolist()):
                p = int(prediction[k])
                rows.append(
                    {
                        "idx": i,
                        "label": job.labels[i],
                        "predict": p,
                        "correct": int(p == job.labels[i]),
                        "sigma": float(sigma[k]),
                    }
                )
            return rows

        run_chunks(args, job, out, args.n, work)
        rows = [out.done[i] for i in job.selected if i in out.done]
        if rows:
            correct = sum(r["correct"] for r in rows)
            abstained = sum(r["predict"] == ABSTAIN for r in rows)
            print(
                f"{args.out}: {len(rows)} inputs, accuracy {correct / len(rows):.3f}, {abstained} abstained"
            )
    return 0
