"""Do the tokenizer ceilings rise with a longer budget? Each method's tokenizer trained with t2i-full's budget
(the demo's 700 + 80 + 300 = 1080 steps; a baseline's one stage as long), seed 0, measured like the run's
tokenizers (judge, scene CLIP, prompts and held-out renders of a t2i-quick output folder).

    OMP_NUM_THREADS=1 python docs/reproduction-t2i/tokenizer_budget.py RUN_DIR > tokenizer_budget.json
"""

import json
import sys
import time
from pathlib import Path

from aligntok.experiments.pipeline import Progress
from aligntok.experiments.reproduce import seeded_tokenizer, tokenizer_for_method
from aligntok.experiments.reproduce_t2i import _Runner, load_t2i_reproduce_config
from aligntok.models.tokenizer import LatentTokenizer
from aligntok.training.stages import train_tokenizer

run_dir = Path(sys.argv[1])
quick, full = load_t2i_reproduce_config("t2i-quick"), load_t2i_reproduce_config("t2i-full")
runner = _Runner(quick, run_dir, Progress("budget", enabled=False))  # reads the run's judge and scene CLIP back
results = {}
for method in quick.methods:
    started = time.perf_counter()
    outputs = train_tokenizer(tokenizer_for_method(seeded_tokenizer(full.tokenizer, 0), method),
                              run_dir / "tokenizer_budget" / method)
    tokenizer = LatentTokenizer.from_pretrained(outputs[max(outputs)]).eval()
    results[method] = {**runner.tokenizer_metrics(tokenizer), "train_seconds": round(time.perf_counter() - started, 1)}
print(json.dumps(results, indent=2))
