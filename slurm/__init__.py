"""Slurm launchers: submitit (submit.py, sweep.py) and sbatch scripts. They only build commands around main.py."""
