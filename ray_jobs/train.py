"""Entrypoint for ``ray job submit``: the same training as ``owl2 train``, on whatever cluster runs the job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python ray_jobs/train.py --config experiments/owl2_7b/pipeline.yaml [key=value ...]

Inside a job, ``ray.init()`` joins the job's cluster (RAY_ADDRESS is set by the job server).
"""

import argparse
import sys

from owl2.cli import USAGE_ERROR, add_train_arguments, run_train
from owl2.config import ConfigError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    try:
        return run_train(parser.parse_args())
    except ConfigError as error:
        print(f"train: error: {error}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
