import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the pure packages (kb_tools, redi_core, redi_demo.dataset/evaluator) import from the repo root
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
