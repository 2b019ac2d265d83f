"""`python -m fastvit.train ...` = `fastvit-train ...`; what torchrun starts on every process:

    torchrun --standalone --nproc-per-node 8 -m fastvit.train --data OUT --hours 2 --out runs/x
"""
import sys

from .cli import main

sys.exit(main())
