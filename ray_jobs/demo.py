"""Entrypoint for ``ray job submit``: the same demo as ``owl2 demo``, on whatever cluster runs the job.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python ray_jobs/demo.py --out /tmp/owl2-demo

Inside a job, Ray joins the job's cluster (the job server sets RAY_ADDRESS).
"""

import sys

from owl2.cli import add_demo_arguments, job_entrypoint, run_demo_command

if __name__ == "__main__":
    sys.exit(job_entrypoint(__doc__.splitlines()[0], add_demo_arguments, run_demo_command))
