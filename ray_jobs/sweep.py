"""Entrypoint for ``ray job submit``: the same sweep as ``owl2 sweep``, on whatever cluster runs the job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python ray_jobs/sweep.py --config experiments/sweeps/owl2_7b_decay.yaml [key=value ...]
"""

import sys

from owl2.cli import add_sweep_arguments, job_entrypoint, run_sweep_command

if __name__ == "__main__":
    sys.exit(job_entrypoint(__doc__.splitlines()[0], add_sweep_arguments, run_sweep_command))
