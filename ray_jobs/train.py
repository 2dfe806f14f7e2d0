"""Entrypoint for ``ray job submit``: the same training as ``owl2 train``, on whatever cluster runs the job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python ray_jobs/train.py --config experiments/owl2_7b/pipeline.yaml [key=value ...]

Inside a job, Ray joins the job's cluster (the job server sets RAY_ADDRESS).
"""

import sys

from owl2.cli import add_train_arguments, job_entrypoint, run_train

if __name__ == "__main__":
    sys.exit(job_entrypoint(__doc__.splitlines()[0], add_train_arguments, run_train))
