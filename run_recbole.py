"""Train and evaluate a model with RecBole, e.g.

    python run_recbole.py --model=AtSpeedR --dataset=amazon-beauty --data_path=../shared/datasets
    python run_recbole.py --model=SASRec --dataset=ml-100k --epochs=5
"""

import sys

import atspeed_rec  # noqa: F401  (applies the RecBole compatibility patches first)
from atspeed_rec.recbole_glue.cli import main

if __name__ == "__main__":
    sys.exit(main())
