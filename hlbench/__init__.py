"""hlbench: pixel-hardness learning (HL) for semantic segmentation, in plain PyTorch."""
import os
from pathlib import Path

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
# hlbench/conf/config.yaml adds this folder to Hydra's search path (experiment=..., suites/).
os.environ.setdefault("HLBENCH_EXPERIMENTS_DIR", str(EXPERIMENTS_DIR))
