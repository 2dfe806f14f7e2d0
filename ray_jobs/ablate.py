"""Entrypoint for ``ray job submit``: the same ablation as ``owl2 ablate``, on whatever cluster runs the job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python ray_jobs/ablate.py --config experiments/owl2_7b/ablations/vision_lr.yaml [--quick] [key=value ...]
"""

import sys

from owl2.cli import add_ablate_arguments, job_entrypoint, run_ablate_command

if __name__ == "__main__":
    sys.exit(job_entrypoint(__doc__.splitlines()[0], add_ablate_arguments, run_ablate_command))
