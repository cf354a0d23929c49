"""Figure `emergence`: how forward traversal emerges under the gradient flow (n = 8, uniform starts).

alpha, beta, gamma against log t; reward and loss; P(forward | move) per position as a heatmap over
position x log t (which positions learn first); expected chain-of-thought length against the
minimal one.  Regenerate: ``gradflow figures emergence`` (or ``python experiments/emergence.py``).
"""

from __future__ import annotations

from gradflow import ChainTask, ModelSpec
from gradflow.flow import FlowParams, simulate
from gradflow.model import default_theta0
from gradflow.plotting import emergence_figure, experiment_parser, save_figure, use_headless_backend

NAME = "emergence"


def main(argv=None) -> dict:
    parser = experiment_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="vertices per chain (default 8)")
    args = parser.parse_args(argv)
    t1 = 1e3 if args.quick else 1e4
    params = FlowParams(ChainTask.uniform(args.n), ModelSpec(), default_theta0(), t1=t1)
    trajectory = simulate(params, progress=False)
    fig, data = emergence_figure(trajectory)
    save_figure(fig, NAME, args.out, data)
    return data


if __name__ == "__main__":
    use_headless_backend()
    main()
